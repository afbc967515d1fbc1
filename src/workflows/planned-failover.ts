import {
  ApplicationFailure,
  CancellationScope,
  condition,
  executeChild,
  isCancellation,
  log,
  setCurrentDetails,
  setHandler,
  upsertSearchAttributes,
  uuid4,
  type ActivityOptions,
} from '@temporalio/workflow';
import type { ReplicationTarget } from '../activities/inventory';
import {
  FailureTypes,
  formatProblems,
  haltedSessionUpdates,
  operatorRequestSchema,
  PLANNED_FAILOVER_DEFAULTS,
  SearchAttributes,
  sessionQueries,
  sessionWorkflowId,
  validate,
  validatePlannedFailoverInput,
  type DowntimeBreakdown,
  type OperatorRequest,
  type PlannedFailoverInput,
  type PlannedFailoverResult,
  type PlannedFailoverSessionInput,
  type PlannedFailoverSessionResult,
  type SessionProgress,
  type SessionReport,
  type SlotLease,
  type VerificationResult,
} from '../contract';
import { checkTransition } from '../domain/replica-state';
import { formatBytes } from '../domain/units';
import {
  control,
  controlOptions,
  copyOptions,
  failureMessage,
  refusedInput,
  waitingOptions,
  showStep,
  withSummary,
  type SessionStep,
} from './common';
import {
  acquireReplica,
  bytesOf,
  copyDisks,
  leaseProxySlots,
  releaseProxySlots,
  releaseReplica,
  reportToReplica,
} from './sessions';

/**
 * Moves running VMs to their replicas with minimum downtime and zero data loss. The request is checked first
 * and every problem named at once, before any VM is touched. The VMs of one job go one after another, each in
 * a session of its own; jobs run side by side, up to maxParallelJobs at a time.
 */
export async function plannedFailover(input: unknown): Promise<PlannedFailoverResult> {
  const request: PlannedFailoverInput = checkInput(input);
  const options = { ...PLANNED_FAILOVER_DEFAULTS, ...request.options };
  const plan = await withSummary(
    control.planPlannedFailover,
    `Check roles, VMs and replicas of ${request.vms.join(', ')}`,
    [{ vms: request.vms, requestedBy: request.requestedBy }],
  );
  if (plan.problems.length > 0) throw refusedInput('The planned failover request', plan.problems);

  const results = new Map<string, PlannedFailoverSessionResult>();
  const showProgress = () =>
    setCurrentDetails(
      plan.lanes
        .map(
          (lane) =>
            `**${lane.job}**: ${lane.vms.map((vm) => `${vm} ${results.get(vm)?.outcome ?? 'pending'}`).join(', ')}`,
        )
        .join('\n\n'),
    );
  showProgress();

  await inParallel(plan.lanes, options.maxParallelJobs, async (lane) => {
    let blockedBy: string | undefined;
    for (const vm of lane.vms) {
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
          staticSummary: `Planned failover of ${vm} (job ${lane.job}), requested by ${request.requestedBy}: ${request.reason}`,
        });
        results.set(vm, result);
        if (result.outcome !== 'failedOver' && result.outcome !== 'forcedFailover') blockedBy = vm;
      } catch (err) {
        if (isCancellation(err)) throw err;
        results.set(vm, { ...notStarted(vm, lane.job, failureMessage(err)), sessionId, outcome: 'failed' });
        blockedBy = vm;
      }
      showProgress();
    }
  });

  const result: PlannedFailoverResult = {
    requestedBy: request.requestedBy,
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
  return result;
}

function checkInput(input: unknown): PlannedFailoverInput {
  const checked = validatePlannedFailoverInput(input);
  if (checked.ok) return checked.value;
  throw refusedInput('The plannedFailover input', checked.problems);
}

function notStarted(vm: string, job: string, detail: string): PlannedFailoverSessionResult {
  return {
    vm,
    job,
    sessionId: '',
    outcome: 'notStarted',
    detail,
    bytesCopied: 0,
    bytesBeforePowerOff: 0,
    bytesAfterPowerOff: 0,
    passesBeforePowerOff: 0,
    helperPoints: [],
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
 * The critical window (source off, replica not yet on) gets a short retry budget: when the final sync cannot
 * finish, the session halts and an operator decides, instead of retrying for hours with the service down.
 */
const criticalRetry = { initialInterval: '1s', backoffCoefficient: 2, maximumInterval: '5s', maximumAttempts: 4 };
const criticalControl: ActivityOptions = { ...controlOptions, retry: criticalRetry };
const criticalCopy: ActivityOptions = { ...copyOptions, retry: criticalRetry };
const criticalWaiting: ActivityOptions = { ...waitingOptions, retry: criticalRetry };

type Decision = { kind: 'retry' | 'abort' | 'forceFailover'; request: OperatorRequest };

/** One VM's planned failover: sync, power off, final sync, verify, fail over, power on. */
export async function plannedFailoverSession(
  input: PlannedFailoverSessionInput,
): Promise<PlannedFailoverSessionResult> {
  const { vm, job, sessionId } = input;
  upsertSearchAttributes([
    { key: SearchAttributes.FailoverVm, value: vm },
    { key: SearchAttributes.FailoverJob, value: job },
  ]);
  const result: PlannedFailoverSessionResult = {
    ...notStarted(vm, job, 'started'),
    sessionId,
    outcome: 'failed',
  };
  const progress: SessionProgress = { vm, step: 'WaitingForReplica', detail: '', halted: null };
  const step: Step = (name, detail) => {
    progress.step = name;
    progress.detail = detail;
    showStep(name, detail);
  };
  setHandler(sessionQueries.progress, () => progress);

  // Operator decisions while halted, by update: validated at once, refused when the session is not halted.
  let decision: Decision | undefined;
  let decisionOutcome: string | undefined;
  for (const kind of ['retry', 'abort', 'forceFailover'] as const) {
    setHandler(
      haltedSessionUpdates[kind],
      async (request) => {
        await withSummary(control.checkOperator, `Check that ${request.requestedBy} may decide`, [
          { user: request.requestedBy, permission: 'failover' },
        ]).catch((err: unknown) => {
          throw ApplicationFailure.create({
            type: FailureTypes.accessDenied,
            message: failureMessage(err),
            nonRetryable: true,
          });
        });
        if (!progress.halted || decision) {
          throw ApplicationFailure.create({
            type: FailureTypes.wrongState,
            message: 'the session is no longer halted',
            nonRetryable: true,
          });
        }
        decision = { kind, request };
        decisionOutcome = undefined;
        await condition(() => decisionOutcome !== undefined);
        return decisionOutcome!;
      },
      {
        validator: (request) => {
          const checked = validate(operatorRequestSchema, request);
          if (!checked.ok) throw new Error(formatProblems(`The ${kind} request`, checked.problems));
          if (!progress.halted)
            throw new Error(`${kind} is only possible while the session is halted; it is at step ${progress.step}`);
        },
      },
    );
  }

  const state = await acquireReplica(vm, job, {
    sessionId,
    kind: 'plannedFailover',
    requestedBy: input.requestedBy,
    reason: input.reason,
  });
  let report: Omit<SessionReport, 'sessionId'> = { outcome: 'failed' };
  try {
    const allowed = checkTransition(state, 'plannedFailover');
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
      { vm, job, fromProduction: true },
    ]);
    const leases = await leaseProxySlots({
      sessionId,
      slots: target.disks.length,
      proxies: target.proxies,
      declared: target.declaredProxies,
      waitLimitSeconds: input.proxyWaitTimeoutSeconds,
    });
    try {
      const outcome = await failOver(input, target, leases, result, step, {
        waitForDecision: async (reason) => {
          progress.halted = { reason, since: new Date().toISOString() };
          step('Halted', `${reason}. Waiting for an operator: retry, abort or forceFailover`);
          await condition(() => decision !== undefined);
          const taken = decision!;
          log.info('Operator decision on halted session', { decision: taken.kind, ...taken.request });
          progress.halted = null;
          return taken;
        },
        done: (outcome) => {
          decisionOutcome = outcome;
          decision = undefined;
        },
      });
      const restorePoints = await withSummary(control.listRestorePoints, 'Read the restore points from the DR host', [
        target.replica,
      ]);
      report = {
        outcome: `${outcome}: ${result.detail}`,
        state: outcome === 'aborted' ? 'Ready' : 'Failover',
        restorePoints,
        downtime: result.downtime,
      };
      result.outcome = outcome;
      return result;
    } finally {
      await releaseProxySlots(sessionId);
    }
  } catch (err) {
    if (!isCancellation(err)) step('Failed', failureMessage(err));
    throw err;
  } finally {
    await releaseReplica(vm, { sessionId, ...report });
  }
}

interface HaltHooks {
  waitForDecision(reason: string): Promise<Decision>;
  done(outcome: string): void;
}

type Step = (name: SessionStep, detail: string) => void;

async function failOver(
  input: PlannedFailoverSessionInput,
  target: ReplicationTarget,
  leases: SlotLease[],
  result: PlannedFailoverSessionResult,
  step: Step,
  halt: HaltHooks,
): Promise<'failedOver' | 'aborted' | 'forcedFailover'> {
  const { vm, sessionId } = input;
  const helper1 = `rp-${sessionId}-helper1`;
  const helper2 = `rp-${sessionId}-helper2`;
  const ref1 = `ref-${sessionId}-1`;
  const ref2 = `ref-${sessionId}-2`;
  const source = target.source;
  const replicaVm = { host: target.replica.host, vm: target.replica.replica };

  // Step 1: copy what is not replicated yet while the VM runs; extra passes, if asked, shrink the last delta.
  step('Syncing', `copying unreplicated changes of ${vm} while it runs (helper restore point 1)`);
  await withSummary(control.beginRestorePoint, 'Open helper restore point 1', [
    {
      replica: target.replica,
      pointId: helper1,
      kind: 'planned-failover-helper',
      metadata: { session: sessionId, sourceReferencePoint: ref1 },
    },
  ]);
  let base = target.baseReferencePointId;
  let previousBytes = Number.POSITIVE_INFINITY;
  for (let pass = 1; ; pass++) {
    const checkpointId = `ckpt-${sessionId}-p${pass}`;
    await withSummary(control.createCheckpoint, `Checkpoint ${vm} (pass ${pass})`, [{ vm: source, checkpointId }]);
    const copies = await copyDisks({
      vm,
      target,
      leases,
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
    step('Syncing', `pass ${pass} copied ${bytes} bytes; another pass while the delta shrinks`);
  }
  const point1 = await withSummary(control.sealRestorePoint, 'Seal helper restore point 1', [
    { replica: target.replica, pointId: helper1 },
  ]);
  result.helperPoints.push(point1.id);
  // Opened before power-off: one round trip less while the workload is down.
  const openHelper2 = (options: ActivityOptions) =>
    withSummary(
      control.beginRestorePoint,
      'Open helper restore point 2',
      [
        {
          replica: target.replica,
          pointId: helper2,
          kind: 'planned-failover-helper',
          metadata: { session: sessionId, sourceReferencePoint: ref2 },
        },
      ],
      options,
    );
  await openHelper2(controlOptions);

  // Step 2: power off the source. From here until the replica runs, the workload is down.
  step('PoweringOffSource', `guest shutdown of ${vm}, forced off after ${input.shutdownTimeoutSeconds} s`);
  const shutdown = await withSummary(
    control.shutDownSource,
    `Shut down ${vm} (forced off after ${input.shutdownTimeoutSeconds} s)`,
    [{ vm: source, timeoutMs: input.shutdownTimeoutSeconds * 1000 }],
    waitingOptions,
  );
  result.sourceShutdown = shutdown.outcome;
  if (shutdown.outcome === 'already-off') log.info('Source VM was already off: power-off step satisfied', { vm });

  // Step 3: the last-minute changes, then proof that nothing was lost. Failures here halt for an operator.
  const syncStartedAt = Date.now();
  let verification: VerificationResult | undefined;
  let forcedBy: OperatorRequest | undefined;
  for (let attempt = 1; ; attempt++) {
    try {
      step('FinalSync', `copying the last changes of ${vm} (helper restore point 2)`);
      const checkpointId = `ckpt-${sessionId}-final`;
      await withSummary(
        control.createCheckpoint,
        `Checkpoint powered-off ${vm}`,
        [{ vm: source, checkpointId }],
        criticalControl,
      );
      if (attempt > 1) await openHelper2(criticalControl); // a retry after a halt: reuses the point if still open
      const copies = await copyDisks({
        vm,
        target,
        leases,
        source: { kind: 'checkpoint', vm: source, checkpointId, baseReferencePointId: ref1 },
        pointId: helper2,
        replicaHeadPointId: helper1,
        options: criticalCopy,
      });
      const point2 = await withSummary(
        control.sealRestorePoint,
        'Seal helper restore point 2',
        [{ replica: target.replica, pointId: helper2 }],
        criticalControl,
      );
      step('Verifying', 'comparing the copied blocks and the guest canary with the source');
      verification = await withSummary(
        control.verifyFinalSync,
        `Verify zero data loss on ${vm}`,
        [
          {
            source,
            checkpointId,
            baseReferencePointId: ref1,
            replica: target.replica,
            pointId: helper2,
            disks: target.disks,
          },
        ],
        criticalWaiting,
      );
      result.verification = verification;
      if (!verification.identical) {
        throw ApplicationFailure.create({
          type: 'VerificationFailed',
          message: `replica differs from the source: ${verification.mismatchedBlocks} block(s), canary ${verification.replicaCanary} vs ${verification.sourceCanary}`,
          nonRetryable: true,
        });
      }
      await withSummary(
        control.promoteCheckpoint,
        'Keep the checkpoint as the next reference point',
        [{ vm: source, checkpointId, referencePointId: ref2 }],
        criticalControl,
      );
      result.helperPoints.push(point2.id);
      result.bytesAfterPowerOff = bytesOf(copies);
      break;
    } catch (err) {
      if (isCancellation(err)) throw err;
      const taken = await halt.waitForDecision(`Final sync of ${vm} failed: ${failureMessage(err)}`);
      if (taken.kind === 'retry') {
        halt.done('retrying the final sync');
        continue;
      }
      if (taken.kind === 'abort') {
        step('Aborting', `powering ${vm} back on; the replica stays Ready with helper restore point 1`);
        await CancellationScope.nonCancellable(async () => {
          await withSummary(control.revertReplica, 'Show helper restore point 1 again', [
            { replica: target.replica, pointId: helper1 },
          ]);
          await withSummary(control.discardCheckpoint, 'Drop the final checkpoint', [
            { vm: source, checkpointId: `ckpt-${sessionId}-final` },
          ]);
          await withSummary(control.powerOnVm, `Power ${vm} back on`, [{ vm: source }], waitingOptions);
        });
        result.detail = `aborted by ${taken.request.requestedBy}: ${taken.request.reason}; ${vm} runs again, replica Ready`;
        halt.done(result.detail);
        return 'aborted';
      }
      await withSummary(control.revertReplica, 'Fail over to helper restore point 1', [
        { replica: target.replica, pointId: helper1 },
      ]);
      result.dataLoss = `changes of ${vm} after helper restore point 1 (${point1.createdAt}) were not replicated and are lost`;
      forcedBy = taken.request;
      break;
    }
  }
  const finalSyncMs = Date.now() - syncStartedAt;

  // Step 4: fail over, through the replica's entity.
  step('Switching', `replica of ${vm} becomes the running copy`);
  const switchStartedAt = Date.now();
  await reportToReplica(vm, { sessionId, state: 'Failover' });
  const switchMs = Date.now() - switchStartedAt;

  // Step 5: power on the replica.
  step('PoweringOnReplica', `booting the replica of ${vm} on ${target.replica.host}`);
  const boot = await withSummary(
    control.powerOnVm,
    `Power on the replica of ${vm}`,
    [{ vm: replicaVm }],
    waitingOptions,
  );

  result.bytesCopied = result.bytesBeforePowerOff + result.bytesAfterPowerOff;
  result.downtime = downtimeOf(shutdown, finalSyncMs, switchMs, boot);
  result.detail = forcedBy
    ? `forced failover to helper restore point 1 by ${forcedBy.requestedBy} (${forcedBy.reason}); ${result.dataLoss}`
    : `downtime ${(result.downtime.totalMs / 1000).toFixed(2)} s, ${formatBytes(result.bytesAfterPowerOff)} copied while off, verified`;
  if (forcedBy) halt.done(result.detail);
  step('Done', result.detail);
  return forcedBy ? 'forcedFailover' : 'failedOver';
}

function downtimeOf(
  shutdown: { startedAt: number; finishedAt: number },
  finalSyncMs: number,
  switchMs: number,
  boot: { startedAt: number; finishedAt: number },
): DowntimeBreakdown {
  const totalMs = boot.finishedAt - shutdown.startedAt;
  const guestShutdownMs = shutdown.finishedAt - shutdown.startedAt;
  const bootMs = boot.finishedAt - boot.startedAt;
  return {
    totalMs,
    guestShutdownMs,
    finalSyncMs,
    switchMs,
    bootMs,
    orchestrationMs: Math.max(0, totalMs - guestShutdownMs - finalSyncMs - switchMs - bootMs),
  };
}
