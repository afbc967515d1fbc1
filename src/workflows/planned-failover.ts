import {
  ApplicationFailure,
  CancellationScope,
  executeChild,
  isCancellation,
  log,
  ParentClosePolicy,
  patched,
  setCurrentDetails,
  setHandler,
  upsertSearchAttributes,
  uuid4,
  type ActivityOptions,
} from '@temporalio/workflow';
import type { ReplicationTarget } from '../activities/inventory';
import {
  FailureTypes,
  formatRequester,
  PLANNED_FAILOVER_DEFAULTS,
  SearchAttributes,
  sessionQueries,
  sessionWorkflowId,
  validatePlannedFailoverInput,
  type DowntimeBreakdown,
  type FullVerification,
  type OperatorRequest,
  type PlannedFailoverInput,
  type PlannedFailoverOutcome,
  type PlannedFailoverResult,
  type PlannedFailoverSessionInput,
  type PlannedFailoverSessionResult,
  type RestorePointSummary,
  type SessionProgress,
  type SessionReport,
  type SlotLease,
} from '../contract';
import { forceTarget, replicaMayRun, retryFrom, type WindowStep } from '../domain/critical-window';
import { checkTransition, hostRefusesReplication } from '../domain/replica-state';
import { checkpointProvenance, PointMetadata } from '../domain/restore-points';
import { formatBytes } from '../domain/units';
import {
  bestEffort,
  control,
  controlOptions,
  copyOptions,
  failureMessage,
  persistentOptions,
  refusedInput,
  requestedBy,
  showStep,
  verifyStartRequest,
  verifiedRequesterLine,
  waitingOptions,
  withSummary,
  type SessionStep,
} from './common';
import { HaltDesk, type TakenDecision } from './halts';
import { recordPlannedFailoverSession } from './metrics';
import {
  acquireReplica,
  bytesOf,
  copyDisks,
  leaseProxySlots,
  releaseProxySlots,
  releaseReplica,
  reportToReplica,
  storedProofOf,
} from './sessions';

/**
 * Moves running VMs to their replicas with minimum downtime and zero data loss. The request is checked first
 * and every problem named at once, before any VM is touched. The VMs of one job go one after another, each in
 * a session of its own; jobs run side by side, up to maxParallelJobs at a time. Cancelling it (or terminating
 * it) asks each running session to stop: one that has not powered its source off yet stops cleanly, one inside
 * its critical window halts there for an operator; VMs not started yet are not started.
 */
export async function plannedFailover(input: unknown): Promise<PlannedFailoverResult> {
  const request: PlannedFailoverInput = checkInput(input);
  const requester = await verifyStartRequest('plannedFailover', input, 'The planned failover request');
  const options = { ...PLANNED_FAILOVER_DEFAULTS, ...request.options };
  let cancelled = false;
  CancellationScope.current().cancelRequested.catch(() => (cancelled = true));
  const plan = await withSummary(
    control.planPlannedFailover,
    `Check roles, VMs and replicas of ${request.vms.join(', ')}`,
    [{ vms: request.vms, requestedBy: request.requestedBy }],
  );
  if (plan.problems.length > 0) throw refusedInput('The planned failover request', plan.problems);

  const results = new Map<string, PlannedFailoverSessionResult>();
  const showProgress = () =>
    setCurrentDetails(
      [
        ...verifiedRequesterLine(requester),
        ...plan.lanes.map(
          (lane) =>
            `**${lane.job}**: ${lane.vms.map((vm) => `${vm} ${results.get(vm)?.outcome ?? 'pending'}`).join(', ')}`,
        ),
      ].join('\n\n'),
    );
  showProgress();

  await inParallel(plan.lanes, options.maxParallelJobs, async (lane) => {
    let blockedBy: string | undefined;
    for (const vm of lane.vms) {
      if (cancelled) {
        results.set(vm, notStarted(vm, lane.job, 'not started: the planned failover was cancelled', 'cancelled'));
        continue;
      }
      if (blockedBy) {
        results.set(vm, notStarted(vm, lane.job, `not started: ${blockedBy} did not fail over`));
        continue;
      }
      const sessionId = uuid4();
      const args: [PlannedFailoverSessionInput] = [
        {
          sessionId,
          vm,
          job: lane.job,
          requestedBy: request.requestedBy,
          reason: request.reason,
          shutdownTimeoutSeconds: options.shutdownTimeoutSeconds,
          proxyWaitTimeoutSeconds: options.proxyWaitTimeoutSeconds,
          preSyncMaxPasses: options.preSyncMaxPasses,
          preSyncTargetBytes: options.preSyncTargetBytes,
        },
      ];
      try {
        const result = await executeChild(plannedFailoverSession, {
          workflowId: sessionWorkflowId(vm, sessionId),
          args,
          staticSummary: `Planned failover of ${vm} (job ${lane.job}), requested by ${requester ? formatRequester(requester) : request.requestedBy}: ${request.reason}`,
          ...(requester ? { typedSearchAttributes: [requestedBy(requester)] } : {}),
          // Terminating this workflow must not cut a session off inside its critical window (source off, replica
          // not yet on): the session is asked to stop, and halts there for an operator if it cannot stop cleanly.
          parentClosePolicy: ParentClosePolicy.REQUEST_CANCEL,
        });
        results.set(vm, result);
        if (result.outcome !== 'failedOver' && result.outcome !== 'forcedFailover') blockedBy = vm;
      } catch (err) {
        const outcome: PlannedFailoverOutcome = isCancellation(err) ? 'cancelled' : 'failed';
        const detail = isCancellation(err)
          ? 'cancelled before its critical window: the source kept running'
          : failureMessage(err);
        results.set(vm, { ...notStarted(vm, lane.job, detail, outcome), sessionId });
        blockedBy = vm;
      }
      showProgress();
    }
  });

  const result: PlannedFailoverResult = {
    requestedBy: request.requestedBy,
    ...(requester ? { requester } : {}),
    reason: request.reason,
    sessions: request.vms.map((vm) => results.get(vm)!),
  };
  const incomplete = result.sessions.filter((s) => s.outcome !== 'failedOver');
  if (incomplete.length > 0) {
    // Not every VM moved cleanly: the workflow fails, so the Web UI and scripts see it, and carries the outcome.
    throw ApplicationFailure.create({
      type: FailureTypes.plannedFailoverIncomplete,
      message: `Planned failover incomplete: ${incomplete.map((s) => `${s.vm} ${s.outcome} (${s.detail})`).join('; ')}`,
      details: [result],
      nonRetryable: true,
    });
  }
  const unproven = result.sessions.filter((s) => s.fullVerification?.identical !== true);
  if (unproven.length > 0) {
    throw ApplicationFailure.create({
      type: FailureTypes.zeroDataLossUnproven,
      message: `Every VM failed over, but zero data loss is not proven for ${unproven
        .map((s) => `${s.vm} (${describeFull(s.fullVerification)})`)
        .join('; ')}`,
      details: [result],
      nonRetryable: true,
    });
  }
  return result;
}

function describeFull(full: FullVerification | undefined): string {
  if (!full) return 'no whole-disk comparison';
  if (full.identical === false) return `${full.mismatchedBlocks} block(s) differ from the powered-off source`;
  return `the whole-disk comparison could not run: ${full.error ?? 'unknown'}`;
}

function checkInput(input: unknown): PlannedFailoverInput {
  const checked = validatePlannedFailoverInput(input);
  if (checked.ok) return checked.value;
  throw refusedInput('The plannedFailover input', checked.problems);
}

function notStarted(
  vm: string,
  job: string,
  detail: string,
  outcome: PlannedFailoverOutcome = 'notStarted',
): PlannedFailoverSessionResult {
  return {
    vm,
    job,
    sessionId: '',
    outcome,
    detail,
    bytesCopied: 0,
    bytesBeforePowerOff: 0,
    bytesAfterPowerOff: 0,
    passesBeforePowerOff: 0,
    helperPoints: [],
    halts: [],
  };
}

/** Runs `task` for every item, at most `limit` at a time. */
async function inParallel<T>(items: readonly T[], limit: number, task: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < items.length) await task(items[next++]!);
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
}

/**
 * The critical window (source off, replica not yet on) gets a short retry budget and a bound on how long an
 * activity may wait for a worker: when a step cannot finish, the session halts and an operator decides, instead
 * of retrying for hours, or waiting for a proxy that is down, with the service down.
 */
const criticalRetry = { initialInterval: '1s', backoffCoefficient: 2, maximumInterval: '5s', maximumAttempts: 4 };
const WINDOW_PICKUP = '30s';
const critical = (options: ActivityOptions): ActivityOptions => ({
  ...options,
  scheduleToStartTimeout: WINDOW_PICKUP,
  retry: criticalRetry,
});
const criticalControl = critical(controlOptions);
/**
 * A copy heartbeats every 2 s. In the window a lost one (its proxy died, or its completion was lost to a Temporal
 * server that went down meanwhile) is retried after 8 s instead of the 20 s a copy outside the window may take.
 */
const criticalCopy: ActivityOptions = { ...critical(copyOptions), heartbeatTimeout: '8s' };
const criticalWaiting = critical(waitingOptions);

type Step = (name: SessionStep, detail: string) => void;

/** The session's proxy slots: leased for the copies, given back while the session is halted. */
class Slots {
  private leases: SlotLease[] | null = null;

  constructor(
    private readonly sessionId: string,
    private readonly target: ReplicationTarget,
    private readonly waitLimitSeconds: number,
  ) {}

  async lease(): Promise<SlotLease[]> {
    this.leases ??= await leaseProxySlots({
      sessionId: this.sessionId,
      slots: this.target.disks.length,
      proxies: this.target.proxies,
      declared: this.target.declaredProxies,
      waitLimitSeconds: this.waitLimitSeconds,
    });
    return this.leases;
  }

  async release(): Promise<void> {
    if (this.leases === null) return;
    this.leases = null;
    await releaseProxySlots(this.sessionId);
  }
}

/** One VM's planned failover: sync, power off, final sync, verify, fail over, power on, then verify every block. */
export async function plannedFailoverSession(
  input: PlannedFailoverSessionInput,
): Promise<PlannedFailoverSessionResult> {
  const { vm, job, sessionId } = input;
  upsertSearchAttributes([
    { key: SearchAttributes.FailoverVm, value: vm },
    { key: SearchAttributes.FailoverJob, value: job },
  ]);
  const result: PlannedFailoverSessionResult = { ...notStarted(vm, job, 'started'), sessionId, outcome: 'failed' };
  const progress: SessionProgress = { vm, step: 'WaitingForReplica', detail: '', halted: null };
  const step: Step = (name, detail) => {
    progress.step = name;
    progress.detail = detail;
    showStep(name, detail);
  };
  setHandler(sessionQueries.progress, () => progress);
  const desk = new HaltDesk(progress, result.halts, step);
  const cancel = { requested: false };
  CancellationScope.current().cancelRequested.catch(() => (cancel.requested = true));

  let report: Omit<SessionReport, 'sessionId'> = { outcome: 'failed' };
  try {
    const grant = await acquireReplica(
      vm,
      job,
      { sessionId, kind: 'plannedFailover', requestedBy: input.requestedBy, reason: input.reason },
      input.proxyWaitTimeoutSeconds,
    );
    const allowed = checkTransition(grant.state, 'plannedFailover');
    if (!allowed.allowed) {
      throw ApplicationFailure.create({
        type: FailureTypes.wrongState,
        message: `${vm}: ${allowed.reason}`,
        nonRetryable: true,
      });
    }
    step('Preparing', `finding ${vm} and its replica`);
    // Data always comes from production, even when the job replicates from backups.
    const target = await withSummary(control.prepareReplication, `Find ${vm} and its replica`, [
      { vm, job, fromProduction: true, productionVm: grant.productionVm },
    ]);
    const refused = hostRefusesReplication(target.host);
    if (refused) {
      report = { outcome: `refused: ${refused.reason}`, state: refused.state };
      throw ApplicationFailure.create({
        type: FailureTypes.wrongState,
        message: `${vm}: ${refused.reason}`,
        nonRetryable: true,
      });
    }
    const slots = new Slots(sessionId, target, input.proxyWaitTimeoutSeconds);
    try {
      const { outcome, restorePoints } = await failOver(input, target, slots, result, step, desk, cancel);
      report = {
        outcome: `${outcome}: ${result.detail}`,
        state: outcome === 'aborted' ? 'Ready' : 'Failover',
        restorePoints,
        downtime: result.downtime,
        verification: result.fullVerification,
      };
      result.outcome = outcome;
      return result;
    } finally {
      await slots.release();
    }
  } catch (err) {
    if (isCancellation(err)) {
      result.outcome = 'cancelled';
      result.detail = 'cancelled before its critical window: the source kept running';
      step('Cancelled', result.detail);
    } else {
      result.detail = failureMessage(err);
      step('Failed', result.detail);
    }
    throw err;
  } finally {
    recordPlannedFailoverSession(result);
    await releaseReplica(vm, { sessionId, ...report });
    await CancellationScope.nonCancellable(() => desk.close(`the session ended: ${result.outcome}`));
  }
}

/** Times parts of the downtime on the workflow's clock (the Temporal server's), halts apart. */
class WindowClock {
  readonly parts = { finalSyncMs: 0, switchMs: 0, haltedMs: 0 };

  async time<T>(part: keyof WindowClock['parts'], work: () => Promise<T>): Promise<T> {
    const started = Date.now();
    try {
      return await work();
    } finally {
      this.parts[part] += Date.now() - started;
    }
  }
}

async function failOver(
  input: PlannedFailoverSessionInput,
  target: ReplicationTarget,
  slots: Slots,
  result: PlannedFailoverSessionResult,
  step: Step,
  desk: HaltDesk,
  cancel: { requested: boolean },
): Promise<{ outcome: 'failedOver' | 'aborted' | 'forcedFailover'; restorePoints: RestorePointSummary[] }> {
  const { vm, sessionId } = input;
  const helper1 = `rp-${sessionId}-helper1`;
  const helper2 = `rp-${sessionId}-helper2`;
  const ref1 = `ref-${sessionId}-1`;
  const source = target.source;
  const provenance = (checkpoint: { id: string; createdAt: string }, referencePointId: string) =>
    checkpointProvenance(source, checkpoint, referencePointId);
  const created: string[] = [];
  let helper1Sealed = false;
  try {
    // Step 1: copy what is not replicated yet while the VM runs; extra passes, if asked, shrink the last delta.
    await slots.lease();
    step('Syncing', `copying unreplicated changes of ${vm} while it runs (helper restore point 1)`);
    await openHelperPoint(target, sessionId, helper1, 'Open helper restore point 1');
    let base = target.baseReferencePointId;
    let previousBytes = Number.POSITIVE_INFINITY;
    let lastCheckpoint: { id: string; createdAt: string };
    for (let pass = 1; ; pass++) {
      const checkpointId = `ckpt-${sessionId}-p${pass}`;
      created.push(checkpointId);
      lastCheckpoint = await withSummary(control.createCheckpoint, `Checkpoint ${vm} (pass ${pass})`, [
        { vm: source, checkpointId },
      ]);
      const copies = await copyDisks({
        vm,
        target,
        leases: await slots.lease(),
        source: { kind: 'checkpoint', vm: source, checkpointId, baseReferencePointId: base },
        pointId: helper1,
        replicaHeadPointId: target.headPointId,
      });
      const bytes = bytesOf(copies);
      result.bytesBeforePowerOff += bytes;
      result.passesBeforePowerOff = pass;
      const last = pass > input.preSyncMaxPasses || bytes <= input.preSyncTargetBytes || bytes >= previousBytes;
      const referencePointId = last ? ref1 : `ref-${sessionId}-p${pass}`;
      await withSummary(control.promoteCheckpoint, 'Keep the checkpoint as the next reference point', [
        { vm: source, checkpointId, referencePointId },
      ]);
      base = referencePointId;
      if (last) break;
      previousBytes = bytes;
      step('Syncing', `pass ${pass} copied ${formatBytes(bytes)}; another pass while the delta shrinks`);
    }
    await withSummary(control.sealRestorePoint, 'Seal helper restore point 1', [
      { replica: target.replica, pointId: helper1, metadata: provenance(lastCheckpoint, ref1) },
    ]);
    helper1Sealed = true;
    result.helperPoints.push(helper1);
    // Opened before power-off: one round trip less while the workload is down.
    await openHelperPoint(target, sessionId, helper2, 'Open helper restore point 2');
  } catch (err) {
    // Before the window the source still runs: leave nothing half-done behind on either host.
    await CancellationScope.nonCancellable(async () => {
      for (const checkpointId of created)
        await bestEffort(`Dropping checkpoint ${checkpointId}`, () =>
          withSummary(control.discardCheckpoint, 'Drop the checkpoint of the stopped session', [
            { vm: source, checkpointId },
          ]),
        );
      for (const pointId of helper1Sealed ? [helper2] : [helper1, helper2])
        await bestEffort(`Dropping ${pointId}`, () =>
          withSummary(control.discardRestorePoint, 'Drop the unfinished helper restore point', [
            { replica: target.replica, pointId },
          ]),
        );
    });
    throw err;
  }

  // From the source's power-off until the replica runs, nothing may cancel a step half-way: a cancellation
  // halts the window at the next step for an operator instead, and everything after it records the move.
  return CancellationScope.nonCancellable(async () => {
    const outcome = await criticalWindow({
      input,
      target,
      slots,
      result,
      step,
      desk,
      cancel,
      helper1,
      helper2,
      ref1,
      provenance,
    });
    const restorePoints = await withSummary(control.listRestorePoints, 'Read the restore points from the DR host', [
      target.replica,
    ]);
    return { outcome, restorePoints };
  });
}

/** Opens a helper restore point of the session on the replica (idempotent on the host). */
const openHelperPoint = (
  target: ReplicationTarget,
  sessionId: string,
  pointId: string,
  summary: string,
  options: ActivityOptions = controlOptions,
) =>
  withSummary(
    control.beginRestorePoint,
    summary,
    [
      {
        replica: target.replica,
        pointId,
        kind: 'planned-failover-helper',
        metadata: { [PointMetadata.session]: sessionId },
      },
    ],
    options,
  );

interface WindowContext {
  input: PlannedFailoverSessionInput;
  target: ReplicationTarget;
  slots: Slots;
  result: PlannedFailoverSessionResult;
  step: Step;
  desk: HaltDesk;
  cancel: { requested: boolean };
  helper1: string;
  helper2: string;
  /** The reference point taken with helper point 1: the final sync copies what changed since. */
  ref1: string;
  provenance: (checkpoint: { id: string; createdAt: string }, referencePointId: string) => Record<string, string>;
}

async function criticalWindow(w: WindowContext): Promise<'failedOver' | 'aborted' | 'forcedFailover'> {
  const { input, target, slots, result, step, desk, helper2 } = w;
  const { vm, sessionId } = input;
  const source = target.source;
  const replicaVm = { host: target.replica.host, vm: target.replica.replica };
  const checkpointId = `ckpt-${sessionId}-final`;
  const ref2 = `ref-${sessionId}-2`;
  const clock = new WindowClock();
  const downtimeStartedAt = Date.now();

  let at: WindowStep = 'powerOff';
  let checkpoint: { id: string; createdAt: string } | undefined;
  let shutdown:
    { outcome: 'shut-down' | 'forced-off' | 'already-off'; startedAt: number; finishedAt: number } | undefined;
  let boot: { startedAt: number; finishedAt: number } | undefined;
  let forced: { point: 'helper1' | 'helper2'; by: OperatorRequest } | undefined;
  let helper2DroppedBeforePowerOn = false;
  let cancellationHalted = false;
  /** The last copy's proof, taken by the DR host as it stored the blocks; the verification then reads the canaries. */
  let storedProof: ReturnType<typeof storedProofOf>;

  while (boot === undefined) {
    let mismatch = false;
    try {
      if (w.cancel.requested && !cancellationHalted) {
        cancellationHalted = true;
        throw ApplicationFailure.create({
          type: 'CancellationRequested',
          message: 'a cancellation was requested (Web UI, CLI or the parent workflow); the window cannot stop half-way',
        });
      }
      switch (at) {
        case 'powerOff':
          // Step 2: power off the source. From here until the replica runs, the workload is down.
          step('PoweringOffSource', `guest shutdown of ${vm}, forced off after ${input.shutdownTimeoutSeconds} s`);
          shutdown = await withSummary(
            control.shutDownSource,
            `Shut down ${vm} (forced off after ${input.shutdownTimeoutSeconds} s)`,
            [{ vm: source, timeoutMs: input.shutdownTimeoutSeconds * 1000 }],
            criticalWaiting,
          );
          result.sourceShutdown = shutdown.outcome;
          if (shutdown.outcome === 'already-off')
            log.info('Source VM was already off: power-off step satisfied', { vm });
          at = 'checkpoint';
          break;
        case 'checkpoint':
          // Step 3: the last-minute changes, then proof that nothing was lost, before anything else happens. The
          // host keeps a view it still has; after a halt it is taken again only of a source that is still off.
          step('FinalSync', `copying the last changes of ${vm} (helper restore point 2)`);
          checkpoint = await clock.time('finalSyncMs', () =>
            withSummary(
              control.createCheckpoint,
              `Checkpoint powered-off ${vm}`,
              [{ vm: source, checkpointId, ...(result.halts.length > 0 ? { sourceOff: true } : {}) }],
              criticalControl,
            ),
          );
          at = 'copy';
          break;
        case 'copy': {
          step('FinalSync', `copying the last changes of ${vm} (helper restore point 2)`);
          const copies = await clock.time('finalSyncMs', async () => {
            const leases = await slots.lease();
            // Opened before power-off. After a halt it is opened again, in case someone dropped it meanwhile (a
            // sealed point is never copied into: the seal comes after the verification). The 0.2.0 release opened
            // it again before every copy: a session it started has no marker and goes on doing so.
            const reopenOnlyAfterHalt = patched('helper2-reopened-only-after-halt');
            if (result.halts.length > 0 || !reopenOnlyAfterHalt)
              await openHelperPoint(target, sessionId, helper2, 'Open helper restore point 2 again', criticalControl);
            return copyDisks({
              vm,
              target,
              leases,
              source: { kind: 'checkpoint', vm: source, checkpointId, baseReferencePointId: w.ref1 },
              pointId: helper2,
              replicaHeadPointId: w.helper1,
              // The proof costs what the bytes cost: no second pass over either side in the window.
              verify: patched('final-sync-verified-as-stored'),
              options: criticalCopy,
            });
          });
          result.bytesAfterPowerOff = bytesOf(copies);
          storedProof = storedProofOf(copies);
          at = 'verify';
          break;
        }
        case 'verify': {
          step('Verifying', 'comparing the copied blocks and the guest canary with the source');
          const verification = await clock.time('finalSyncMs', () =>
            withSummary(
              control.verifyFinalSync,
              `Verify zero data loss on ${vm}`,
              [
                {
                  source,
                  checkpointId,
                  baseReferencePointId: w.ref1,
                  replica: target.replica,
                  pointId: helper2,
                  disks: target.disks,
                  ...(storedProof ? { copied: storedProof } : {}),
                },
              ],
              criticalWaiting,
            ),
          );
          result.verification = verification;
          if (!verification.identical) {
            mismatch = true;
            throw ApplicationFailure.create({
              type: FailureTypes.verificationFailed,
              message: `helper restore point 2 differs from the source: ${verification.mismatchedBlocks} block(s), canary ${verification.replicaCanary} vs ${verification.sourceCanary}`,
              nonRetryable: true,
            });
          }
          at = 'seal';
          break;
        }
        case 'seal':
          // Sealed only once verified: a sealed helper point 2 is a proven copy of the source at power-off.
          await clock.time('finalSyncMs', () =>
            withSummary(
              control.sealRestorePoint,
              'Seal the verified helper restore point 2',
              [{ replica: target.replica, pointId: helper2, metadata: w.provenance(checkpoint!, ref2) }],
              criticalControl,
            ),
          );
          result.helperPoints.push(helper2);
          at = 'switch';
          break;
        case 'switch':
          // Step 4: fail over, through the replica's entity.
          step('Switching', `replica of ${vm} becomes the running copy`);
          await clock.time('switchMs', () => reportToReplica(vm, { sessionId, state: 'Failover' }));
          at = 'powerOn';
          break;
        case 'powerOn':
          // Step 5: power on the replica.
          step('PoweringOnReplica', `booting the replica of ${vm} on ${target.replica.host}`);
          // The source is off: the replica is the machine now, with its network identity (MAC addresses).
          boot = await withSummary(
            control.powerOnVm,
            `Power on the replica of ${vm}`,
            [{ vm: replicaVm, sourceOff: true }],
            criticalWaiting,
          );
          break;
      }
    } catch (err) {
      // A halt may last days: nobody else waits for this session's proxy slots meanwhile.
      await slots.release();
      const failed = at;
      let reason =
        err instanceof ApplicationFailure && err.type === 'CancellationRequested'
          ? err.message
          : `${failed} failed: ${failureMessage(err)}`;
      for (;;) {
        const decision = await clock.time('haltedMs', () => desk.halt(failed, reason));
        if (decision.kind === 'retry') {
          // A copy or verification may have failed because the source's final view is gone (on KVM, the paused
          // QEMU that serves it died): the retry takes the checkpoint again, which the host keeps if it still can.
          at = retryFrom(failed, mismatch, patched('retry-takes-final-checkpoint-again'));
          desk.settle(`retrying from ${at}`);
          break;
        }
        if (decision.kind === 'abort') {
          const aborted = await abort(w, failed, decision, checkpointId, ref2);
          if (aborted === true) return 'aborted';
          reason = aborted;
          continue;
        }
        const sealed = await helper2Sealed(w);
        if (sealed === undefined) {
          reason = 'forceFailover could not read the DR host to tell which helper restore point is verified';
          continue;
        }
        const forceTo = forceTarget(failed, sealed);
        // Nothing boots on top of a half-written point (a host refuses to): the unverified helper point 2 goes first.
        if (forceTo.point === 'helper1' && patched('force-to-helper1-drops-helper2-first')) {
          const dropped = await dropUnverifiedHelper2(w, criticalControl).then(
            () => true,
            (err: unknown) => {
              reason = `forceFailover could not drop the unverified helper restore point 2: ${failureMessage(err)}`;
              return false;
            },
          );
          if (!dropped) continue;
          helper2DroppedBeforePowerOn = true;
        }
        forced = { point: forceTo.point, by: decision.request };
        if (forceTo.point === 'helper1')
          result.dataLoss = `changes of ${vm} after helper restore point 1 were not replicated and are lost${shutdown ? '' : `; ${vm} was not confirmed off`}`;
        else if (!result.helperPoints.includes(helper2)) result.helperPoints.push(helper2);
        at = forceTo.from;
        break;
      }
    }
  }
  const downtimeEndedAt = Date.now();
  await slots.release();
  result.bytesCopied = result.bytesBeforePowerOff + result.bytesAfterPowerOff;
  result.downtime = downtimeOf(downtimeEndedAt - downtimeStartedAt, shutdown, boot, clock.parts);

  // After the window: the replica runs, the move is done; what follows records it and proves it.
  if (forced?.point === 'helper1') {
    result.fullVerification = {
      identical: null,
      blocksCompared: 0,
      mismatchedBlocks: 0,
      covered: 'nothing: forced failover to helper restore point 1, which is older than the source at power-off',
    };
    if (!helper2DroppedBeforePowerOn)
      await bestEffort('Dropping the unverified helper restore point 2', () =>
        dropUnverifiedHelper2(w, persistentOptions),
      );
    await bestEffort('Dropping the final checkpoint', () =>
      withSummary(
        control.discardCheckpoint,
        'Drop the final checkpoint',
        [{ vm: source, checkpointId }],
        persistentOptions,
      ),
    );
  } else {
    await verifyAllBlocks(w, checkpointId, ref2);
  }

  const full = result.fullVerification!;
  if (forced) {
    result.detail = `forced failover to helper restore point ${forced.point === 'helper1' ? 1 : 2} by ${forced.by.requestedBy} (${forced.by.reason}); ${result.dataLoss ?? 'nothing was lost: helper restore point 2 was verified'}`;
    desk.settle(result.detail);
  } else {
    result.detail = `downtime ${(result.downtime.totalMs / 1000).toFixed(2)} s, ${formatBytes(result.bytesAfterPowerOff)} copied while off, verified`;
    if (full.identical === true) result.detail += `; every block compared: identical`;
  }
  if (full.identical === false) {
    result.detail += `; WHOLE-DISK COMPARISON: ${full.mismatchedBlocks} block(s) of helper restore point 2 differ from the powered-off source`;
    step('VerificationMismatch', result.detail);
  } else if (full.identical === null && !forced) {
    step('Unverified', `${result.detail}; the whole-disk comparison could not run: ${full.error ?? 'unknown'}`);
  } else {
    step('Done', result.detail);
  }
  return forced ? 'forcedFailover' : 'failedOver';
}

/** The newest helper point is verified exactly when the DR host shows it sealed; undefined if the host cannot say. */
async function helper2Sealed(w: WindowContext): Promise<boolean | undefined> {
  try {
    const points = await withSummary(
      control.listRestorePoints,
      'Which helper point is verified?',
      [w.target.replica],
      criticalControl,
    );
    return points.some((p) => p.id === w.helper2);
  } catch (err) {
    log.warn('Could not read the restore points of the DR host', { error: failureMessage(err) });
    return undefined;
  }
}

/**
 * Abort: production first. The source is powered back on before anything is asked of the DR host (whose failure
 * is the usual reason for the halt); the decision's update returns once it runs. Then the DR side is put back,
 * retried for as long as the host stays away: a replica that may have started is powered off and its writes
 * dropped; a verified helper point 2 stays (it equals the source at power-off) and its checkpoint becomes the
 * reference point, else the point and the checkpoint are dropped.
 */
async function abort(
  w: WindowContext,
  failed: WindowStep,
  decision: TakenDecision,
  checkpointId: string,
  ref2: string,
): Promise<true | string> {
  const { input, target, result, step, desk } = w;
  const { vm } = input;
  const replicaVm = { host: target.replica.host, vm: target.replica.replica };
  step('Aborting', `powering ${vm} back on; the replica stays Ready`);
  let note = '';
  if (replicaMayRun(failed)) {
    try {
      await withSummary(
        control.powerOffVm,
        `Make sure the replica of ${vm} is off`,
        [{ vm: replicaVm }],
        criticalControl,
      );
    } catch (err) {
      note = `; the replica could not be confirmed off (${failureMessage(err)}): it is powered off as soon as ${target.replica.host} answers`;
    }
  }
  // Powering the source on ends its final view (on KVM, the paused start that serves it): once helper point 2 is
  // known verified, its checkpoint becomes the reference point first, so that the next job run tracks from it.
  let tracked = false;
  if (result.helperPoints.includes(w.helper2) && patched('abort-keeps-final-checkpoint-before-source-power-on'))
    tracked = await promoteFinalCheckpoint(w, checkpointId, ref2, criticalControl).then(
      () => true,
      (err: unknown) => {
        log.warn('The final checkpoint could not become the reference point before the source powers on', {
          vm,
          error: failureMessage(err),
        });
        return false;
      },
    );
  try {
    await withSummary(control.powerOnVm, `Power ${vm} back on`, [{ vm: target.source }], waitingOptions);
  } catch (err) {
    return `abort could not power ${vm} back on: ${failureMessage(err)}`;
  }
  result.detail = `aborted by ${decision.request.requestedBy}: ${decision.request.reason}; ${vm} runs again, replica Ready${note}`;
  desk.settle(result.detail);

  step('Aborting', `${vm} runs again; putting the DR side back`);
  const left: string[] = [];
  const dr = async (what: string, call: () => Promise<unknown>) => {
    try {
      await call();
    } catch (err) {
      left.push(`${what} (${failureMessage(err)})`);
    }
  };
  if (replicaMayRun(failed)) {
    await dr('powering the replica off', () =>
      withSummary(control.powerOffVm, `Power off the replica of ${vm}`, [{ vm: replicaVm }], persistentOptions),
    );
    await dr('dropping what the replica wrote', () =>
      withSummary(
        control.discardRunningLayer,
        'Discard what the replica wrote',
        [{ replica: target.replica }],
        persistentOptions,
      ),
    );
  }
  const sealed = await withSummary(
    control.listRestorePoints,
    'Which helper point is verified?',
    [target.replica],
    persistentOptions,
  )
    .then((points) => points.some((p) => p.id === w.helper2))
    .catch((err: unknown) => {
      left.push(`reading the restore points (${failureMessage(err)})`);
      return false;
    });
  if (sealed) {
    if (!result.helperPoints.includes(w.helper2)) result.helperPoints.push(w.helper2);
    if (!tracked)
      await dr('keeping the final checkpoint as the reference point', () =>
        promoteFinalCheckpoint(w, checkpointId, ref2, persistentOptions),
      );
  } else {
    await dr('dropping the unverified helper restore point 2', () => dropUnverifiedHelper2(w, persistentOptions));
    await dr('dropping the final checkpoint', () =>
      withSummary(
        control.discardCheckpoint,
        'Drop the final checkpoint',
        [{ vm: target.source, checkpointId }],
        persistentOptions,
      ),
    );
  }
  if (left.length > 0) result.detail += `; left for the next job run: ${left.join(', ')}`;
  step('Aborted', result.detail);
  return true;
}

const dropUnverifiedHelper2 = (w: WindowContext, options: ActivityOptions) =>
  withSummary(
    control.discardRestorePoint,
    'Drop the unverified helper restore point 2',
    [{ replica: w.target.replica, pointId: w.helper2 }],
    options,
  );

/** The powered-off source's final checkpoint becomes the reference point the next job run tracks from. */
const promoteFinalCheckpoint = (w: WindowContext, checkpointId: string, ref2: string, options: ActivityOptions) =>
  withSummary(
    control.promoteCheckpoint,
    'Keep the final checkpoint as the next reference point',
    [{ vm: w.target.source, checkpointId, referencePointId: ref2 }],
    options,
  );

/**
 * Zero data loss, proven for every block: helper point 2 against the powered-off source's final checkpoint, both
 * frozen, so the replica's downtime is over already. Only a proven point's checkpoint becomes the reference point:
 * after a mismatch, the next job run compares digests and heals the replica.
 */
async function verifyAllBlocks(w: WindowContext, checkpointId: string, ref2: string): Promise<void> {
  const { input, target, result, step } = w;
  step('VerifyingAllBlocks', `comparing every block of helper restore point 2 with the powered-off ${input.vm}`);
  try {
    result.fullVerification = await withSummary(
      control.verifyWholeDisks,
      `Compare every block of ${input.vm} with helper restore point 2`,
      [{ source: target.source, checkpointId, replica: target.replica, pointId: w.helper2, disks: target.disks }],
      waitingOptions,
    );
  } catch (err) {
    result.fullVerification = {
      identical: null,
      blocksCompared: 0,
      mismatchedBlocks: 0,
      covered: 'nothing: the comparison could not run',
      error: failureMessage(err),
    };
  }
  if (result.fullVerification.identical === true) {
    await bestEffort('Keeping the final checkpoint as the reference point', () =>
      promoteFinalCheckpoint(w, checkpointId, ref2, waitingOptions),
    );
  } else {
    log.error('Zero data loss not proven for the planned failover', { vm: input.vm, ...result.fullVerification });
    await bestEffort('Dropping the final checkpoint', () =>
      withSummary(control.discardCheckpoint, 'Drop the final checkpoint', [{ vm: target.source, checkpointId }]),
    );
  }
}

/**
 * The downtime and its parts. The total is timed on the workflow's clock (the server's), from the moment the
 * shutdown was scheduled until the replica's boot was reported; shutdown and boot are durations measured by the
 * activities on their own machine, so no two clocks are ever subtracted from one another.
 */
function downtimeOf(
  totalMs: number,
  shutdown: { startedAt: number; finishedAt: number } | undefined,
  boot: { startedAt: number; finishedAt: number },
  parts: { finalSyncMs: number; switchMs: number; haltedMs: number },
): DowntimeBreakdown {
  const guestShutdownMs = shutdown ? shutdown.finishedAt - shutdown.startedAt : 0;
  const bootMs = boot.finishedAt - boot.startedAt;
  return {
    totalMs,
    guestShutdownMs,
    ...parts,
    bootMs,
    orchestrationMs: totalMs - guestShutdownMs - parts.finalSyncMs - parts.switchMs - parts.haltedMs - bootMs,
  };
}
