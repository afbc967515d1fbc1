import { ApplicationFailure, setCurrentDetails, upsertSearchAttributes } from '@temporalio/workflow';
import type { ReplicaDescription } from '../activities/operations';
import {
  FailureTypes,
  SearchAttributes,
  type OperationPayload,
  type ReplicaOperationInput,
  type ReplicaOperationResult,
} from '../contract';
import { formatBytes } from '../domain/units';
import { control, copyOptions, waitingOptions, withSummary } from './common';

type VmRef = { host: string; vm: string };

/**
 * One operation on a replica, run by its entity when the replica is free: every step an activity, so the
 * operation's history shows what was done, and a retried step does nothing twice.
 */
export async function replicaOperation(input: ReplicaOperationInput): Promise<ReplicaOperationResult> {
  const { vm, job, operation } = input;
  upsertSearchAttributes([
    { key: SearchAttributes.FailoverVm, value: vm },
    { key: SearchAttributes.FailoverJob, value: job },
    { key: SearchAttributes.FailoverStep, value: operation },
  ]);
  const step = (detail: string) => setCurrentDetails(`**${operation}** of ${vm}: ${detail}`);
  step('reading the replica from the DR host');
  const replica = await withSummary(control.describeReplica, `Read the replica of ${vm}`, [{ vm, job }]);
  const replicaVm: VmRef = { host: replica.replica.host, vm: replica.replica.replica };
  const finish = async (
    state: ReplicaOperationResult['state'],
    detail: string,
    failbackTo: VmRef | null = null,
    bytesCopied = 0,
  ): Promise<ReplicaOperationResult> => {
    const restorePoints = await withSummary(control.listRestorePoints, 'Read the restore points', [replica.replica]);
    step(`done: ${detail}`);
    return { state, restorePoints, detail, failbackTo, bytesCopied };
  };

  switch (operation) {
    case 'undoFailover': {
      const payload = input.payload as OperationPayload<'undoFailover'>;
      step('powering the replica off and discarding what it wrote since failover');
      await withSummary(control.powerOffVm, `Power off the replica of ${vm}`, [{ vm: replicaVm }]);
      await withSummary(control.discardRunningLayer, 'Discard the changes made since failover', [
        { replica: replica.replica },
      ]);
      let detail = 'replica off, its changes since failover discarded';
      if (payload.powerOnSource) {
        const source = requireSource(replica, vm);
        await withSummary(control.powerOnVm, `Power on ${vm}`, [{ vm: source }], waitingOptions);
        detail += `; ${vm} powered on`;
      }
      return finish('Ready', detail);
    }

    case 'permanentFailover': {
      step('merging every restore point into the replica; it becomes the production VM');
      await withSummary(
        control.consolidateReplica,
        `Make the replica of ${vm} permanent`,
        [{ replica: replica.replica }],
        waitingOptions,
      );
      return finish(
        'PermanentFailover',
        `restore points merged and deleted; the replica is production; job ${job} skips ${vm}`,
      );
    }

    case 'failover': {
      const payload = input.payload as OperationPayload<'failover'>;
      const point = payload.restorePointId
        ? replica.restorePoints.find((p) => p.id === payload.restorePointId)
        : replica.restorePoints.filter((p) => p.createdAt <= payload.at!).at(-1);
      if (!point) {
        throw ApplicationFailure.create({
          type: FailureTypes.invalidInput,
          message: payload.restorePointId
            ? `no restore point '${payload.restorePointId}' (points: ${replica.restorePoints.map((p) => p.id).join(', ')})`
            : `no restore point at or before ${payload.at}`,
          nonRetryable: true,
        });
      }
      step(`reverting the replica to ${point.id} and powering it on`);
      await withSummary(control.powerOffVm, `Make sure the replica of ${vm} is off`, [{ vm: replicaVm }]);
      await withSummary(control.revertReplica, `Revert to ${point.id} (${point.createdAt})`, [
        { replica: replica.replica, pointId: point.id },
      ]);
      await withSummary(control.powerOnVm, `Power on the replica of ${vm}`, [{ vm: replicaVm }], waitingOptions);
      return finish('Failover', `replica running from ${point.id} (${point.createdAt}); ${vm} untouched`);
    }

    case 'failback': {
      const payload = input.payload as OperationPayload<'failback'>;
      const { operationId } = input;
      const target = payload.target;
      let production: VmRef;
      let base: string | null = null;
      if (target === 'original') {
        production = requireSource(replica, vm);
        base = replica.headReferencePointId; // production's own changes since then are tracked from here
      } else if ('restoredVm' in target) {
        production = await withSummary(control.locateProductionVm, `Find ${target.restoredVm}`, [
          { vm: target.restoredVm },
        ]);
      } else {
        production = { host: target.newVm.host, vm: target.newVm.name };
        await withSummary(control.createProductionVm, `Create ${target.newVm.name} on ${target.newVm.host}`, [
          { vm: production, disks: replica.disks },
        ]);
      }
      const protectiveId = `rp-${operationId}-protective`;
      const referencePointId = `ref-${operationId}`;
      const ship = { replica: replica.replica, production, disks: replica.disks, baseReferencePointId: base };

      step(`phase 1: copying to ${production.vm} while the replica keeps running`);
      await withSummary(control.powerOffVm, `Make sure ${production.vm} is off before it is written`, [
        { vm: production },
      ]);
      const phase1 = await withSummary(
        control.shipToProduction,
        `Copy the replica's changes to ${production.vm} (replica running)`,
        [{ ...ship, view: { running: true }, onlyDiffering: false, checkpointId: `ckpt-${operationId}-phase1` }],
        copyOptions,
      );

      step(`phase 2: replica off, protective restore point, copying the rest to ${production.vm}`);
      await withSummary(control.powerOffVm, `Power off the replica of ${vm}`, [{ vm: replicaVm }]);
      await withSummary(control.sealRunningLayer, 'Keep the replica state as a failback-protective restore point', [
        {
          replica: replica.replica,
          pointId: protectiveId,
          kind: 'failback-protective',
          metadata: { operation: operationId, productionVm: production.vm, sourceReferencePoint: referencePointId },
        },
      ]);
      const phase2 = await withSummary(
        control.shipToProduction,
        `Copy the last changes to ${production.vm} (replica off)`,
        [{ ...ship, view: { pointId: protectiveId }, onlyDiffering: true, checkpointId: `ckpt-${operationId}-phase2` }],
        copyOptions,
      );
      step(`verifying ${production.vm} against the protective point`);
      const verified = await withSummary(
        control.verifyProductionMatches,
        `Verify ${production.vm} equals the replica`,
        [
          {
            replica: replica.replica,
            pointId: protectiveId,
            production,
            disks: replica.disks,
            checkpointId: `ckpt-${operationId}-verify`,
          },
        ],
        waitingOptions,
      );
      if (!verified.identical) {
        throw ApplicationFailure.create({
          type: 'VerificationFailed',
          message: `${production.vm} differs from the replica in ${verified.mismatchedBlocks} block(s) after failback`,
          nonRetryable: true,
        });
      }
      // Production's state now equals the protective point: track its changes from here, for the next job run.
      const checkpointId = `ckpt-${operationId}-reference`;
      await withSummary(control.createCheckpoint, `Checkpoint ${production.vm}`, [{ vm: production, checkpointId }]);
      await withSummary(control.promoteCheckpoint, 'Keep it as the reference point of the next job run', [
        { vm: production, checkpointId, referencePointId },
      ]);
      const bytesCopied = phase1.bytesShipped + phase2.bytesShipped;
      let detail = `${formatBytes(bytesCopied)} copied to ${production.vm} (${formatBytes(phase2.bytesShipped)} with the replica off), verified; protective point ${protectiveId}`;
      if (payload.powerOnProduction) {
        step(`powering ${production.vm} on`);
        await withSummary(control.powerOnVm, `Power on ${production.vm}`, [{ vm: production }], waitingOptions);
        detail += `; ${production.vm} powered on`;
      }
      return finish('Failback', detail, production, bytesCopied);
    }

    case 'commitFailback': {
      const to = input.failbackTo;
      const detail =
        to && to.vm !== vm
          ? `failback committed; production is ${to.vm} on ${to.host}: point job ${job} at it to resume replication`
          : 'failback committed; replication resumes from the protective point';
      return finish('Ready', detail);
    }

    case 'undoFailback': {
      const to = input.failbackTo;
      if (to) {
        step(`powering ${to.vm} off`);
        await withSummary(control.powerOffVm, `Power off ${to.vm}`, [{ vm: to }]);
      }
      step('powering the replica on from its pre-failback state');
      await withSummary(control.powerOnVm, `Power on the replica of ${vm}`, [{ vm: replicaVm }], waitingOptions);
      return finish(
        'Failover',
        `${to?.vm ?? 'production'} off; the replica runs again from its failback-protective point`,
      );
    }
  }
}

function requireSource(replica: ReplicaDescription, vm: string): VmRef {
  if (replica.source) return replica.source;
  throw ApplicationFailure.create({
    type: FailureTypes.hypervisor + ':not_found',
    message: `${vm} is on none of the production hosts`,
    nonRetryable: true,
  });
}
