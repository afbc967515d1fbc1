import {
  ApplicationFailure,
  CancellationScope,
  log,
  startChild,
  upsertSearchAttributes,
  uuid4,
} from '@temporalio/workflow';
import type { CopySource } from '../activities/replication';
import {
  FailureTypes,
  replicationJobInputSchema,
  SearchAttributes,
  sessionWorkflowId,
  validate,
  type ReplicationJobInput,
  type ReplicationJobResult,
  type ReplicationSessionInput,
  type ReplicationSessionResult,
  type RestorePointSummary,
} from '../contract';
import { jobRunSkipReason } from '../domain/replica-state';
import { formatBytes } from '../domain/units';
import { control, failureMessage, refusedInput, showStep, waitingOptions, withSummary } from './common';
import {
  acquireReplica,
  bytesOf,
  copyDisks,
  leaseProxySlots,
  releaseProxySlots,
  releaseReplica,
  reportToReplica,
} from './sessions';

const DEFAULT_PROXY_WAIT_SECONDS = 3600;

/** One run of a replication job: every VM in a session of its own, in parallel as far as proxy slots allow. */
export async function replicationJob(input: unknown): Promise<ReplicationJobResult> {
  const checked = validate(replicationJobInputSchema, input);
  if (!checked.ok) throw refusedInput('The replicationJob input', checked.problems);
  const request: ReplicationJobInput = checked.value;
  upsertSearchAttributes([{ key: SearchAttributes.FailoverJob, value: request.job }]);
  const plan = await withSummary(control.planJob, `Read job ${request.job} from the configuration`, [request.job]);
  const unknown = (request.vms ?? []).filter((vm) => !plan.vms.includes(vm));
  if (unknown.length > 0) {
    throw ApplicationFailure.create({
      type: FailureTypes.invalidInput,
      message: `Not in job ${plan.job}: ${unknown.join(', ')}`,
      nonRetryable: true,
    });
  }
  const vms = request.vms ? plan.vms.filter((vm) => request.vms!.includes(vm)) : plan.vms;
  const children = await Promise.all(
    vms.map((vm) => {
      const sessionId = uuid4();
      const args: [ReplicationSessionInput] = [
        {
          sessionId,
          vm,
          job: plan.job,
          requestedBy: request.requestedBy,
          reason: request.reason ?? 'replication job run',
          proxyWaitTimeoutSeconds: request.options?.proxyWaitTimeoutSeconds ?? DEFAULT_PROXY_WAIT_SECONDS,
        },
      ];
      return startChild(replicationSession, {
        workflowId: sessionWorkflowId(vm, sessionId),
        args,
        staticSummary: `Replicate ${vm} (job ${plan.job})`,
      });
    }),
  );
  const settled = await Promise.allSettled(children.map((c) => c.result()));
  const sessions = settled.map((s, i): ReplicationSessionResult => {
    if (s.status === 'fulfilled') return s.value;
    const vm = vms[i]!;
    return { vm, sessionId: children[i]!.workflowId, outcome: 'failed', detail: failureMessage(s.reason) };
  });
  log.info('Job run finished', { job: plan.job, outcomes: sessions.map((s) => `${s.vm}:${s.outcome}`) });
  return { job: plan.job, sessions };
}

/** One VM's replication session: a new restore point with exactly the blocks changed since the last one. */
export async function replicationSession(input: ReplicationSessionInput): Promise<ReplicationSessionResult> {
  const { vm, job, sessionId } = input;
  upsertSearchAttributes([
    { key: SearchAttributes.FailoverVm, value: vm },
    { key: SearchAttributes.FailoverJob, value: job },
  ]);
  const state = await acquireReplica(vm, job, {
    sessionId,
    kind: 'jobRun',
    requestedBy: input.requestedBy,
    reason: input.reason,
  });
  let report: { outcome: string; state?: 'Ready'; restorePoints?: RestorePointSummary[] } = { outcome: 'failed' };
  try {
    const skip = jobRunSkipReason(state);
    if (skip) {
      showStep('Skipped', skip);
      report = { outcome: `skipped: ${skip}` };
      return { vm, sessionId, outcome: 'skipped', detail: skip };
    }
    showStep('Preparing', `finding ${vm} and its replica`);
    const target = await withSummary(control.prepareReplication, `Find ${vm} and its replica`, [{ vm, job }]);
    if (target.dataSource === 'backup' && !target.backup) {
      const detail = 'no backup point is newer than the replica';
      showStep('Skipped', detail);
      report = { outcome: `skipped: ${detail}`, state: 'Ready', restorePoints: target.restorePoints };
      return { vm, sessionId, outcome: 'skipped', detail };
    }
    const leases = await leaseProxySlots({
      sessionId,
      slots: target.disks.length,
      proxies: target.proxies,
      declared: target.declaredProxies,
      waitLimitSeconds: input.proxyWaitTimeoutSeconds,
    });
    const checkpointId = `ckpt-${sessionId}`;
    const referencePointId = `ref-${sessionId}`;
    const pointId = `rp-${sessionId}`;
    const fromBackup = target.dataSource === 'backup' && target.backup;
    try {
      showStep('Syncing', `copying changed blocks of ${target.disks.length} disk(s) to ${target.replica.host}`);
      if (!fromBackup) {
        await withSummary(control.createCheckpoint, `Checkpoint ${vm} for a consistent read`, [
          { vm: target.source, checkpointId },
        ]);
      }
      const metadata: Record<string, string> = fromBackup
        ? { session: sessionId, sourceBackup: fromBackup.id, sourceBackupTime: fromBackup.createdAt }
        : { session: sessionId, sourceReferencePoint: referencePointId };
      await withSummary(control.beginRestorePoint, `Open restore point ${pointId}`, [
        { replica: target.replica, pointId, kind: 'regular', metadata },
      ]);
      const source: CopySource = fromBackup
        ? { kind: 'backup', backupId: fromBackup.id }
        : { kind: 'checkpoint', vm: target.source, checkpointId, baseReferencePointId: target.baseReferencePointId };
      const copies = await copyDisks({ vm, target, leases, source, pointId, replicaHeadPointId: target.headPointId });
      const point = await withSummary(control.sealRestorePoint, `Seal restore point ${pointId}`, [
        { replica: target.replica, pointId },
      ]);
      if (!fromBackup) {
        await withSummary(control.promoteCheckpoint, 'Keep the checkpoint as the next reference point', [
          { vm: target.source, checkpointId, referencePointId },
        ]);
      }
      showStep('Retention', `keeping ${target.restorePointsToKeep} restore point(s)`);
      const restorePoints = await withSummary(
        control.applyRetention,
        `Keep ${target.restorePointsToKeep} restore points`,
        [{ replica: target.replica, keep: target.restorePointsToKeep }],
        waitingOptions,
      );
      const bytesCopied = bytesOf(copies);
      const modes = Object.fromEntries(copies.map((c) => [c.disk, c.mode]));
      const transports = Object.fromEntries(copies.map((c) => [c.disk, c.transport]));
      report = { outcome: `replicated ${formatBytes(bytesCopied)} into ${pointId}`, state: 'Ready', restorePoints };
      await reportToReplica(vm, { sessionId, ...report });
      showStep('Done', `restore point ${pointId}: ${formatBytes(bytesCopied)} copied`);
      return {
        vm,
        sessionId,
        outcome: 'replicated',
        detail: `${formatBytes(bytesCopied)} copied`,
        restorePoint: point,
        copy: { bytesCopied, modes, transports },
      };
    } catch (err) {
      if (!fromBackup) {
        await CancellationScope.nonCancellable(() =>
          withSummary(control.discardCheckpoint, 'Drop the checkpoint of the failed run', [
            { vm: target.source, checkpointId },
          ]),
        ).catch(() => undefined);
      }
      throw err;
    } finally {
      await releaseProxySlots(sessionId);
    }
  } catch (err) {
    showStep('Failed', failureMessage(err));
    throw err;
  } finally {
    await releaseReplica(vm, { sessionId, ...report });
  }
}
