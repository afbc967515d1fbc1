import {
  ApplicationFailure,
  CancellationScope,
  isCancellation,
  log,
  ParentClosePolicy,
  setCurrentDetails,
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
  type SessionReport,
} from '../contract';
import { hostRefusesReplication, jobRunSkipReason } from '../domain/replica-state';
import { checkpointProvenance, PointMetadata } from '../domain/restore-points';
import { formatBytes } from '../domain/units';
import {
  bestEffort,
  control,
  failureMessage,
  refusedInput,
  requestedBy,
  showStep,
  verifyStartRequest,
  verifiedRequesterLine,
  waitingOptions,
  withSummary,
} from './common';
import { recordReplicationSession } from './metrics';
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

/**
 * One run of a replication job: every VM in a session of its own, in parallel as far as proxy slots allow. The
 * requester must be a configured user allowed to replicate (schedules run as the configured `scheduler` user).
 * Terminating or cancelling the run asks its sessions to stop; each gives back what it holds.
 */
export async function replicationJob(input: unknown): Promise<ReplicationJobResult> {
  const checked = validate(replicationJobInputSchema, input);
  if (!checked.ok) throw refusedInput('The replicationJob input', checked.problems);
  const request: ReplicationJobInput = checked.value;
  upsertSearchAttributes([{ key: SearchAttributes.FailoverJob, value: request.job }]);
  const requester = await verifyStartRequest('replicationJob', input, `The run of job ${request.job}`);
  if (!requester)
    await withSummary(control.checkOperator, `Check that ${request.requestedBy} may replicate`, [
      { user: request.requestedBy, permission: 'replicate' },
    ]).catch((err: unknown) => {
      throw refusedInput('The replicationJob input', [{ path: 'requestedBy', message: failureMessage(err) }]);
    });
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
  setCurrentDetails([...verifiedRequesterLine(requester), `Replicating ${vms.join(', ')}`].join('\n\n'));
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
        ...(requester ? { typedSearchAttributes: [requestedBy(requester)] } : {}),
        // A terminated run must not leave sessions cut off while they hold the replica and proxy slots.
        parentClosePolicy: ParentClosePolicy.REQUEST_CANCEL,
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
  return { job: plan.job, ...(requester ? { requester } : {}), sessions };
}

/**
 * One VM's replication session: a new restore point with exactly the blocks changed since the last one. What the
 * DR host shows overrides what the entity said: a replica that runs there, or became production, is never written.
 */
export async function replicationSession(input: ReplicationSessionInput): Promise<ReplicationSessionResult> {
  try {
    const result = await replicateOnce(input);
    recordReplicationSession(input.job, result.outcome, result.copy?.bytesCopied ?? 0);
    return result;
  } catch (err) {
    recordReplicationSession(input.job, isCancellation(err) ? 'cancelled' : 'failed', 0);
    throw err;
  }
}

/** The session's work; replicationSession counts how it ended. */
async function replicateOnce(input: ReplicationSessionInput): Promise<ReplicationSessionResult> {
  const { vm, job, sessionId } = input;
  upsertSearchAttributes([
    { key: SearchAttributes.FailoverVm, value: vm },
    { key: SearchAttributes.FailoverJob, value: job },
  ]);
  let report: Omit<SessionReport, 'sessionId'> = { outcome: 'failed' };
  const skipped = (detail: string): ReplicationSessionResult => {
    showStep('Skipped', detail);
    report = { ...report, outcome: `skipped: ${detail}` };
    return { vm, sessionId, outcome: 'skipped', detail };
  };
  let grant;
  try {
    grant = await acquireReplica(
      vm,
      job,
      { sessionId, kind: 'jobRun', requestedBy: input.requestedBy, reason: input.reason },
      input.proxyWaitTimeoutSeconds,
    );
  } catch (err) {
    if (err instanceof ApplicationFailure && err.type === FailureTypes.replicaBusy) return skipped(err.message);
    throw err;
  }
  try {
    const skip = jobRunSkipReason(grant.state);
    if (skip) return skipped(skip);
    showStep('Preparing', `finding ${vm} and its replica`);
    const target = await withSummary(control.prepareReplication, `Find ${vm} and its replica`, [
      { vm, job, productionVm: grant.productionVm },
    ]);
    const refused = hostRefusesReplication(target.host);
    if (refused) {
      report = { state: refused.state, restorePoints: target.restorePoints };
      return skipped(refused.reason);
    }
    if (target.dataSource === 'backup' && !target.backup) {
      report = { state: 'Ready', restorePoints: target.restorePoints };
      return skipped('no backup point is newer than the replica');
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
    const fromBackup = target.dataSource === 'backup' ? target.backup : null;
    try {
      showStep('Syncing', `copying changed blocks of ${target.disks.length} disk(s) to ${target.replica.host}`);
      let provenance: Record<string, string>;
      if (fromBackup) {
        provenance = {
          [PointMetadata.sourceKind]: 'backup',
          [PointMetadata.sourceBackup]: fromBackup.id,
          [PointMetadata.sourceTime]: fromBackup.createdAt,
          [PointMetadata.sourceVm]: target.source.vm,
        };
      } else {
        const checkpoint = await withSummary(control.createCheckpoint, `Checkpoint ${vm} for a consistent read`, [
          { vm: target.source, checkpointId },
        ]);
        provenance = checkpointProvenance(target.source, checkpoint, referencePointId);
      }
      await withSummary(control.beginRestorePoint, `Open restore point ${pointId}`, [
        { replica: target.replica, pointId, kind: 'regular', metadata: { [PointMetadata.session]: sessionId } },
      ]);
      const source: CopySource = fromBackup
        ? { kind: 'backup', backupId: fromBackup.id }
        : { kind: 'checkpoint', vm: target.source, checkpointId, baseReferencePointId: target.baseReferencePointId };
      const copies = await copyDisks({ vm, target, leases, source, pointId, replicaHeadPointId: target.headPointId });
      const point = await withSummary(control.sealRestorePoint, `Seal restore point ${pointId}`, [
        { replica: target.replica, pointId, metadata: provenance },
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
      // Nothing half-done stays behind: the checkpoint's copy-on-write data, the open point's blocks.
      await CancellationScope.nonCancellable(async () => {
        if (!fromBackup)
          await bestEffort('Dropping the checkpoint of the failed run', () =>
            withSummary(control.discardCheckpoint, 'Drop the checkpoint of the failed run', [
              { vm: target.source, checkpointId },
            ]),
          );
        await bestEffort('Dropping the unfinished restore point', () =>
          withSummary(control.discardRestorePoint, 'Drop the unfinished restore point', [
            { replica: target.replica, pointId },
          ]),
        );
      });
      throw err;
    } finally {
      await releaseProxySlots(sessionId);
    }
  } catch (err) {
    if (isCancellation(err)) showStep('Cancelled', 'the run was cancelled; nothing half-done was kept');
    else showStep('Failed', failureMessage(err));
    throw err;
  } finally {
    await releaseReplica(vm, { sessionId, ...report });
  }
}
