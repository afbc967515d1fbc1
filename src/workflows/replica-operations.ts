import {
  ApplicationFailure,
  CancellationScope,
  patched,
  proxyActivities,
  setCurrentDetails,
  upsertSearchAttributes,
} from '@temporalio/workflow';
import type { Activities } from '../activities';
import type { ReplicaDescription, ShipResult } from '../activities/operations';
import {
  FailureTypes,
  SearchAttributes,
  type OperationPayload,
  type ReplicaOperationInput,
  type ReplicaOperationResult,
  type VmLocation,
} from '../contract';
import { stateFromHost } from '../domain/replica-state';
import { PointMetadata, pointAtOrBefore, pointsAfterHead } from '../domain/restore-points';
import { formatBytes } from '../domain/units';
import { bestEffort, control, copyOptions, failureMessage, waitingOptions, withSummary } from './common';
import { leaseProxySlots, releaseProxySlots } from './sessions';

/** A production VM's guest is given this long to shut down before a failback or undo powers it off. */
const PRODUCTION_SHUTDOWN_MS = 300_000;
const PROXY_WAIT_SECONDS = 3600;

/**
 * One operation on a replica, run by its entity when the replica is free: every step an activity, so the
 * operation's history shows what was done, and a retried step does nothing twice. What the DR host shows is
 * checked first: an operation that would harm a replica in another state than its entity believes is refused.
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
  const replica = await withSummary(control.describeReplica, `Read the replica of ${vm}`, [
    { vm, job, productionVm: input.productionVm },
  ]);
  const replicaVm: VmLocation = { host: replica.replica.host, vm: replica.replica.replica };
  const onHost = stateFromHost(replica.host, input.state === 'Failback' ? 'Failback' : null);
  const refuseUnless = (wanted: string, ok: boolean) => {
    if (ok) return;
    throw ApplicationFailure.create({
      type: FailureTypes.wrongState,
      message: `${operation} needs the replica ${wanted} on ${replica.replica.host}, but the host shows it ${onHost} (${replica.host.powerState}, ${replica.host.hasRunningLayer ? 'a' : 'no'} running layer); nothing was changed`,
      nonRetryable: true,
    });
  };
  const finish = async (
    state: ReplicaOperationResult['state'],
    detail: string,
    extra: Partial<
      Pick<ReplicaOperationResult, 'failbackTo' | 'productionVm' | 'bytesCopied' | 'productionBytesOverwritten'>
    > = {},
  ): Promise<ReplicaOperationResult> => {
    const restorePoints = await withSummary(control.listRestorePoints, 'Read the restore points', [replica.replica]);
    step(`done: ${detail}`);
    // The state this operation left, searchable: what an entity that lost its state rebuilds it from.
    upsertSearchAttributes([{ key: SearchAttributes.ReplicaState, value: state }]);
    return {
      state,
      restorePoints,
      detail,
      failbackTo: null,
      productionVm: input.productionVm,
      bytesCopied: 0,
      ...extra,
    };
  };

  switch (operation) {
    case 'undoFailover': {
      const payload = input.payload as OperationPayload<'undoFailover'>;
      const torn = input.unfinishedFailback;
      if (payload.powerOnSource && torn) {
        // Checked before anything is touched: the replica keeps running, a failback can still finish the job.
        throw ApplicationFailure.create({
          type: FailureTypes.wrongState,
          message: `undoFailover would power on ${torn.vm}, which failback ${torn.operationId} may have partly overwritten before it stopped (${torn.at}): run failback again to finish it, or undoFailover with powerOnSource=false to discard the replica's changes and leave ${torn.vm} off`,
          nonRetryable: true,
        });
      }
      step('powering the replica off and discarding what it wrote since failover');
      await withSummary(control.powerOffVm, `Power off the replica of ${vm}`, [{ vm: replicaVm }]);
      await withSummary(control.discardRunningLayer, 'Discard the changes made since failover', [
        { replica: replica.replica },
      ]);
      let detail = 'replica off, its changes since failover discarded';
      if (torn && !payload.powerOnSource)
        detail += `; ${torn.vm} stays off: failback ${torn.operationId} may have partly overwritten it`;
      if (payload.powerOnSource) {
        const source = requireSource(replica, vm);
        await withSummary(control.powerOnVm, `Power on ${source.vm}`, [{ vm: source }], waitingOptions);
        detail += `; ${source.vm} powered on`;
      }
      return finish('Ready', detail);
    }

    case 'permanentFailover': {
      refuseUnless('failed over', onHost === 'Failover');
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
      refuseUnless('off with no running layer', onHost === 'Ready');
      const payload = input.payload as OperationPayload<'failover'>;
      const point = payload.restorePointId
        ? replica.restorePoints.find((p) => p.id === payload.restorePointId)
        : pointAtOrBefore(replica.restorePoints, payload.at!);
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
      // 0.2.0 refused here, so the failback that an attention asked for could never finish (found by the suite).
      const resumeFrom = patched('failback-resumes-from-its-protective-point')
        ? (replica.sealedProtectivePoint ?? null)
        : null;
      refuseUnless('failed over', onHost === 'Failover' || resumeFrom !== null);
      return failback(input, replica, replicaVm, step, finish, resumeFrom);
    }

    case 'commitFailback': {
      const to = input.failbackTo;
      // Production now runs where the failback went: job runs and planned failovers read that VM from now on.
      const productionVm = to && to.vm !== vm ? to : null;
      const detail = productionVm
        ? `failback committed; production is ${productionVm.vm} on ${productionVm.host}, which job ${job} replicates from now on`
        : 'failback committed; replication resumes from the protective point';
      return finish('Ready', detail, { productionVm });
    }

    case 'undoFailback': {
      const to = input.failbackTo;
      if (to) {
        step(`shutting ${to.vm} down`);
        await withSummary(
          control.shutDownSource,
          `Shut ${to.vm} down (forced off after ${PRODUCTION_SHUTDOWN_MS / 1000} s)`,
          [{ vm: to, timeoutMs: PRODUCTION_SHUTDOWN_MS }],
          waitingOptions,
        );
      }
      step('powering the replica on from its pre-failback state');
      // With production shut down, the replica is the machine again, MAC addresses and all.
      await withSummary(
        control.powerOnVm,
        `Power on the replica of ${vm}`,
        [{ vm: replicaVm, sourceOff: to !== null }],
        waitingOptions,
      );
      return finish(
        'Failover',
        `${to?.vm ?? 'production'} off; the replica runs again from its failback-protective point`,
      );
    }
  }
}

type Finish = (
  state: ReplicaOperationResult['state'],
  detail: string,
  extra?: Partial<
    Pick<ReplicaOperationResult, 'failbackTo' | 'productionVm' | 'bytesCopied' | 'productionBytesOverwritten'>
  >,
) => Promise<ReplicaOperationResult>;

/**
 * Failback: the replica's data goes back to production, in two phases so that the replica runs during the long
 * one. A production VM that is running is only overwritten when the request confirms it, after a guest shutdown;
 * what it wrote since the failover is recorded as overwritten. Every write carries the operation's fence, and the
 * fence moves on before the verification, so no writer given up for dead can change production after it. If
 * anything fails once the replica was powered off, the replica runs again from where it was, and failback can be
 * sent again. A failback stopped with no chance to clean up (terminated) after it sealed its protective point
 * leaves the replica off on that point: the next one resumes from it, with only the short second phase.
 */
async function failback(
  input: ReplicaOperationInput,
  replica: ReplicaDescription,
  replicaVm: VmLocation,
  step: (detail: string) => void,
  finish: Finish,
  resumeFrom: NonNullable<ReplicaDescription['sealedProtectivePoint']> | null,
): Promise<ReplicaOperationResult> {
  const { vm, operationId } = input;
  const payload = input.payload as OperationPayload<'failback'>;
  const target = payload.target;
  let production: VmLocation;
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
      { vm: production, disks: replica.disks, replica: replica.replica },
    ]);
  }

  const power = await withSummary(control.powerStateOf, `Read the power state of ${production.vm}`, [
    { vm: production },
  ]);
  const productionRan = power !== 'Off';
  if (productionRan && !payload.confirm) {
    throw ApplicationFailure.create({
      type: FailureTypes.wrongState,
      message: `${production.vm} is ${power}: failing back overwrites what it wrote since the failover. Send the failback again with "confirm": true to shut its guest down and overwrite it; nothing was changed`,
      nonRetryable: true,
    });
  }
  if (productionRan) {
    step(`shutting ${production.vm} down (confirmed: its writes since the failover are overwritten)`);
    await withSummary(
      control.shutDownSource,
      `Shut ${production.vm} down (forced off after ${PRODUCTION_SHUTDOWN_MS / 1000} s)`,
      [{ vm: production, timeoutMs: PRODUCTION_SHUTDOWN_MS }],
      waitingOptions,
    );
  }

  const protectiveId = resumeFrom?.id ?? `rp-${operationId}-protective`;
  // The point names the reference point it was sealed for: the next job run tracks production's changes from it.
  const sameProduction = resumeFrom?.production.host === production.host && resumeFrom.production.vm === production.vm;
  const referencePointId = (sameProduction ? resumeFrom?.referencePointId : null) ?? `ref-${operationId}`;
  const shipFence = `${operationId}-ship`;
  await withSummary(control.fenceWrites, `Let only this failback write to ${production.vm}`, [
    { vm: production, token: shipFence },
  ]);
  const leases = await leaseProxySlots({
    sessionId: operationId,
    slots: replica.disks.length,
    proxies: replica.proxies,
    declared: replica.declaredProxies,
    waitLimitSeconds: PROXY_WAIT_SECONDS,
  });
  // The data moves on a proxy, like every copy; one slot per disk leased, one activity ships every disk.
  const onProxy = proxyActivities<Activities>({ ...copyOptions, taskQueue: leases[0]!.taskQueue });
  const ship = (phase: 1 | 2) =>
    withSummary(
      onProxy.shipToProduction,
      phase === 1
        ? `Copy the replica's changes to ${production.vm} (replica running) via ${leases[0]!.proxy}`
        : `Copy the last changes to ${production.vm} (replica off) via ${leases[0]!.proxy}`,
      [
        {
          replica: replica.replica,
          production,
          disks: replica.disks,
          baseReferencePointId: base,
          view: phase === 1 ? { running: true } : { pointId: protectiveId },
          onlyDiffering: phase === 2,
          checkpointId: `ckpt-${operationId}-phase${phase}`,
          fence: shipFence,
        },
      ],
      { ...copyOptions, taskQueue: leases[0]!.taskQueue },
    );

  // After a regular failover to an older point, the points newer than it go with the seal (review m13): said so.
  const dropped = resumeFrom ? [] : pointsAfterHead(replica.restorePoints, replica.headPointId).map((p) => p.id);
  // Resumed, the replica is off already: if this failback fails too, it runs again from its protective point.
  let replicaStopped = resumeFrom !== null;
  let productionPoweredOn = false;
  try {
    let phase1: Pick<ShipResult, 'bytesShipped' | 'productionChangedBytes'> = {
      bytesShipped: 0,
      productionChangedBytes: null,
    };
    if (resumeFrom) {
      step(`resuming from protective point ${protectiveId}: copying what differs to ${production.vm}`);
    } else {
      step(`phase 1: copying to ${production.vm} while the replica keeps running`);
      phase1 = await ship(1);

      step(`phase 2: replica off, protective restore point, copying the rest to ${production.vm}`);
      replicaStopped = true;
      await withSummary(control.powerOffVm, `Power off the replica of ${vm}`, [{ vm: replicaVm }]);
      await withSummary(control.sealRunningLayer, 'Keep the replica state as a failback-protective restore point', [
        {
          replica: replica.replica,
          pointId: protectiveId,
          kind: 'failback-protective',
          metadata: {
            [PointMetadata.session]: operationId,
            [PointMetadata.sourceKind]: 'replica',
            [PointMetadata.sourceHost]: replica.replica.host,
            [PointMetadata.sourceVm]: replica.replica.replica,
            [PointMetadata.productionVm]: production.vm,
            [PointMetadata.productionHost]: production.host,
            [PointMetadata.sourceReferencePoint]: referencePointId,
          },
        },
      ]);
    }
    const phase2 = await ship(2);
    await releaseProxySlots(operationId);

    step(`verifying ${production.vm} against the protective point`);
    await withSummary(control.fenceWrites, `Refuse every earlier writer to ${production.vm}`, [
      { vm: production, token: `${operationId}-verified` },
    ]);
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
        type: FailureTypes.verificationFailed,
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
    let productionBytesOverwritten: number | undefined;
    if (productionRan) {
      productionBytesOverwritten = phase1.productionChangedBytes ?? bytesCopied;
      detail += `; ${production.vm} had run since the failover: ${formatBytes(productionBytesOverwritten)} it wrote were overwritten (confirmed by ${input.payload.requestedBy})`;
    }
    if (dropped.length > 0)
      detail += `; restore point(s) ${dropped.join(', ')}, newer than ${replica.headPointId} that the replica ran from, dropped: the protective point follows ${replica.headPointId}`;
    if (payload.powerOnProduction) {
      step(`powering ${production.vm} on`);
      productionPoweredOn = true;
      await withSummary(control.powerOnVm, `Power on ${production.vm}`, [{ vm: production }], waitingOptions);
      detail += `; ${production.vm} powered on`;
    }
    return finish('Failback', detail, {
      failbackTo: production,
      bytesCopied,
      ...(productionBytesOverwritten !== undefined ? { productionBytesOverwritten } : {}),
    });
  } catch (err) {
    const restarted = await CancellationScope.nonCancellable(async () => {
      await releaseProxySlots(operationId);
      // The service must not stay down: the replica runs again from where it stopped (its protective point,
      // or its running layer if the seal had not happened), and a new failback starts over.
      if (!replicaStopped) return false;
      return bestEffort(`Restarting the replica of ${vm} after the failed failback`, () =>
        withSummary(
          control.powerOnVm,
          `Power the replica of ${vm} on again`,
          // Production stays off (unless its own power-on was asked): the replica serves as the machine again.
          [{ vm: replicaVm, sourceOff: !productionPoweredOn }],
          waitingOptions,
        ),
      );
    });
    // Its own message, not a cause: the entity reports the deepest cause, and this one says what was put back.
    throw ApplicationFailure.create({
      type: FailureTypes.hypervisor,
      message: `${failureMessage(err)}${restarted ? '; the replica was powered on again and serves as before' : ''}`,
      nonRetryable: true,
    });
  }
}

function requireSource(replica: ReplicaDescription, vm: string): VmLocation {
  if (replica.source) return replica.source;
  throw ApplicationFailure.create({
    type: FailureTypes.hypervisor + ':not_found',
    message: `${vm} is on none of the production hosts`,
    nonRetryable: true,
  });
}
