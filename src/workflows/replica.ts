import {
  allHandlersFinished,
  ApplicationFailure,
  condition,
  continueAsNew,
  executeChild,
  getExternalWorkflowHandle,
  isCancellation,
  log,
  ParentClosePolicy,
  patched,
  setCurrentDetails,
  setHandler,
  upsertMemo,
  upsertSearchAttributes,
  uuid4,
  workflowInfo,
} from '@temporalio/workflow';
import {
  FailureTypes,
  formatProblems,
  formatRequester,
  operationSchemas,
  operationSignals,
  operationUpdates,
  OperationNames,
  operationWorkflowId,
  replicaQueries,
  replicaSignals,
  SearchAttributes,
  sessionGrantedSignal,
  validate,
  type AnyOperationPayload,
  type OperationName,
  type OperationOutcome,
  type OperationPayload,
  type QueuedOperation,
  type RejectionRecord,
  type ReplicaEntityInput,
  type ReplicaOperationInput,
  type ReplicaView,
  type SessionReport,
  type VerifiedRequester,
} from '../contract';
import { checkTransition } from '../domain/replica-state';
import {
  control,
  failureMessage,
  persistentOptions,
  refusalType,
  refusedBeforeStart,
  requestedBy,
  SIGNED_REQUESTS_PATCH,
  verifyRequester,
  withSummary,
} from './common';
import { HolderWatch } from './holders';
import { replicaOperation } from './replica-operations';

/** An operation refused, with the failure type its update caller gets. */
type Refusal = { refused: string; type: string };

/**
 * How far past the server's continue-as-new suggestion the entity lets its history grow while an update waits
 * for an operation queued behind a long holder (a session halted for days). Beyond it, the waiting updates are
 * answered that their operation stays queued, and the entity continues as new with the queue.
 */
const ROLL_OVER_AFTER_EVENTS = 2000;

/**
 * The entity of one replica (id replica/<vm>): the owner of its state and restore-point list, and of the rule
 * that one session or operation at a time works on it, across every worker. Sessions and operations queue in
 * the order they ask. Operations (undo, failback, ...) arrive as signals or updates; an update's caller gets
 * the outcome or the refusal, a refused signal is recorded in the state and in the history.
 *
 * It never trusts its memory alone: started without state (first use, or again after it was terminated), it
 * rebuilds the state from what the DR host holds and from Temporal's histories; while sessions wait, it checks
 * that its holder still runs and takes the replica back (and rebuilds) when it does not.
 */
export async function replica(input: ReplicaEntityInput): Promise<void> {
  const { queuedOperations = [], holderAdopted = false, ...carriedView } = input.carried ?? {};
  const view: ReplicaView = {
    vm: input.vm,
    job: input.job,
    state: 'Unseeded',
    restorePoints: [],
    currentSession: null,
    waitingSessions: [],
    lastRun: null,
    lastRejection: null,
    lastDowntime: null,
    lastVerification: null,
    failbackTo: null,
    productionVm: null,
    attention: null,
    ...carriedView,
  };
  const operations = new Map(queuedOperations.map((q) => [q.operationId, q]));
  const outcomes = new Map<string, OperationOutcome | Refusal>();
  let granted = view.currentSession !== null; // a session carried over was already told
  /** The holder was found running by a rebuild, not granted by this entity: watched until it ends. */
  let adopted = holderAdopted;
  let rollingOver = false;
  let suggestedAt: number | undefined;
  /** Until the state is rebuilt, requests are checked against their schema only, and against the state after. */
  let rebuilding = input.carried === undefined;
  const watch = new HolderWatch();

  const publish = () => {
    upsertSearchAttributes([
      { key: SearchAttributes.FailoverVm, value: view.vm },
      { key: SearchAttributes.FailoverJob, value: view.job },
      { key: SearchAttributes.ReplicaState, value: view.state },
    ]);
    const current = view.currentSession ? `${view.currentSession.kind} by ${view.currentSession.requestedBy}` : 'idle';
    setCurrentDetails(
      `**${view.state}**, ${view.restorePoints.length} restore point(s); ${current}; ${view.waitingSessions.length} waiting` +
        (view.attention ? `\n\n**Attention**: ${view.attention}` : ''),
    );
  };

  const apply = (report: SessionReport) => {
    if (report.state) view.state = report.state;
    if (report.restorePoints) view.restorePoints = report.restorePoints;
    if (report.downtime) view.lastDowntime = report.downtime;
    if (report.verification) view.lastVerification = { ...report.verification, sessionId: report.sessionId };
  };

  const reject = (operation: string, requestedBy: string, reason: string) => {
    const record: RejectionRecord = { at: new Date().toISOString(), operation, requestedBy, reason };
    view.lastRejection = record;
    upsertMemo({ lastRejection: record }); // a WorkflowPropertiesModified event: the rejection is in the history
    log.warn('Request refused', { ...record });
  };

  const releaseCurrent = (outcome: string) => {
    const current = view.currentSession;
    if (!current) return;
    const { workflowId: _, ...session } = current;
    view.lastRun = { ...session, at: new Date().toISOString(), outcome };
    view.currentSession = null;
    granted = false;
    adopted = false;
  };

  setHandler(replicaSignals.requestSession, ({ job, ...session }) => {
    view.job = job; // the configuration owns which job a VM is in; the newest request says it
    if (view.currentSession?.sessionId === session.sessionId) {
      granted = false; // a repeated request: grant again
      adopted = false;
    } else if (!view.waitingSessions.some((s) => s.sessionId === session.sessionId)) {
      view.waitingSessions.push(session);
    }
  });

  setHandler(replicaSignals.reportSession, (report) => {
    if (view.currentSession?.sessionId !== report.sessionId) {
      return log.warn('Report from a session that does not hold the replica, ignored', { sessionId: report.sessionId });
    }
    apply(report);
    publish();
  });

  setHandler(replicaSignals.releaseSession, (report) => {
    const i = view.waitingSessions.findIndex((s) => s.sessionId === report.sessionId);
    if (i >= 0) view.waitingSessions.splice(i, 1); // gave up before its turn
    if (view.currentSession?.sessionId !== report.sessionId) return;
    apply(report);
    releaseCurrent(report.outcome ?? 'released');
  });

  setHandler(replicaQueries.state, () => view);

  /** Checks an operation request now; the state is checked again when its turn comes. */
  const check = (name: OperationName, payload: unknown): Refusal | { payload: AnyOperationPayload } => {
    const checked = validate(operationSchemas[name], payload);
    if (!checked.ok)
      return { refused: formatProblems(`The ${name} request`, checked.problems), type: FailureTypes.invalidInput };
    if (rebuilding) return { payload: checked.value };
    const transition = checkTransition(view.state, name);
    if (!transition.allowed) return { refused: transition.reason, type: FailureTypes.wrongState };
    return { payload: checked.value };
  };

  const enqueue = (name: OperationName, payload: unknown, viaUpdate: boolean): QueuedOperation => {
    const operationId = uuid4();
    const { requestedBy = '', reason = '' } = (payload ?? {}) as { requestedBy?: string; reason?: string };
    const queued: QueuedOperation = { operationId, operation: name, payload, viaUpdate, receivedAt: Date.now() };
    operations.set(operationId, queued);
    view.waitingSessions.push({
      sessionId: operationId,
      workflowId: operationWorkflowId(view.vm, name, operationId),
      kind: name,
      requestedBy,
      reason,
    });
    return queued;
  };

  for (const name of OperationNames) {
    setHandler(operationSignals[name], (payload) => {
      const checked = check(name, payload);
      const requestedBy = (payload as { requestedBy?: unknown } | null)?.requestedBy;
      if ('refused' in checked)
        return reject(name, typeof requestedBy === 'string' ? requestedBy : '(unknown)', checked.refused);
      enqueue(name, payload, false);
    });
    setHandler(
      operationUpdates[name],
      async (payload) => {
        if (rebuilding) {
          await condition(() => !rebuilding);
          const checked = check(name, payload);
          if ('refused' in checked)
            throw ApplicationFailure.create({ type: checked.type, message: checked.refused, nonRetryable: true });
        }
        const queued = enqueue(name, payload, true);
        await condition(() => outcomes.has(queued.operationId) || rollingOver);
        const outcome = outcomes.get(queued.operationId);
        if (!outcome) {
          queued.viaUpdate = false; // it travels with the queue; nobody waits for it any more
          throw ApplicationFailure.create({
            type: FailureTypes.stillQueued,
            message: `${name} is still queued behind ${view.currentSession?.kind ?? 'another session'} of ${view.vm}; its outcome will be in lastRun of the state query`,
            nonRetryable: true,
          });
        }
        outcomes.delete(queued.operationId);
        if ('refused' in outcome)
          throw ApplicationFailure.create({ type: outcome.type, message: outcome.refused, nonRetryable: true });
        return outcome;
      },
      {
        // Refused at once, before anything is queued or written to the history; a non-retryable failure that
        // names the field or the state.
        validator: (payload) => {
          const checked = check(name, payload);
          if ('refused' in checked)
            throw ApplicationFailure.create({ type: checked.type, message: checked.refused, nonRetryable: true });
        },
      },
    );
  }

  /** Runs one queued operation as a child workflow of its own; its history holds every step. */
  async function runOperation(queued: QueuedOperation): Promise<void> {
    const { operation, payload, operationId } = queued;
    const session = view.currentSession!;
    const finish = (outcome: OperationOutcome | Refusal, runOutcome: string) => {
      if ('refused' in outcome) reject(operation, session.requestedBy, outcome.refused);
      if (queued.viaUpdate) outcomes.set(operationId, outcome);
      view.lastRun = { ...session, at: new Date().toISOString(), outcome: runOutcome };
    };
    const checked = check(operation, payload);
    if ('refused' in checked) return finish(checked, `refused: ${checked.refused}`);
    let requester: VerifiedRequester | undefined;
    try {
      if (patched(SIGNED_REQUESTS_PATCH)) {
        // Queued by a version that kept no receipt time: judged as received now.
        const receivedAt = queued.receivedAt ?? Date.now();
        requester = await verifyRequester(operation, workflowInfo().workflowId, payload, receivedAt, operationId);
      } else
        await withSummary(control.checkOperator, `Check that ${session.requestedBy} may ${operation}`, [
          { user: session.requestedBy, permission: 'failover' },
        ]);
    } catch (err) {
      const reason = failureMessage(err);
      return finish({ refused: reason, type: refusalType(err) }, `refused: ${reason}`);
    }
    const args: [ReplicaOperationInput] = [
      {
        operationId,
        vm: view.vm,
        job: view.job,
        operation,
        payload: checked.payload,
        state: view.state,
        failbackTo: view.failbackTo,
        productionVm: view.productionVm,
        unfinishedFailback: view.unfinishedFailback ?? null,
      },
    ];
    try {
      const result = await executeChild(replicaOperation, {
        workflowId: session.workflowId,
        args,
        staticSummary: `${operation} of ${view.vm}, requested by ${requester ? formatRequester(requester) : session.requestedBy}: ${session.reason}`,
        ...(requester ? { typedSearchAttributes: [requestedBy(requester)] } : {}),
        // An operation once started is finished, even if this entity is terminated meanwhile: a failback cut off
        // half-way would leave production half-written. A new entity finds it running and waits for it.
        parentClosePolicy: ParentClosePolicy.ABANDON,
      });
      view.state = result.state;
      view.restorePoints = result.restorePoints;
      view.failbackTo = result.failbackTo;
      view.productionVm = result.productionVm;
      if ((operation === 'failback' || operation === 'undoFailover') && view.unfinishedFailback) {
        view.unfinishedFailback = null;
        view.attention = null;
      }
      finish(
        {
          operation,
          state: result.state,
          detail: result.detail,
          bytesCopied: result.bytesCopied,
          ...(result.productionBytesOverwritten !== undefined
            ? { productionBytesOverwritten: result.productionBytesOverwritten }
            : {}),
          workflowId: session.workflowId,
        },
        `${operation}: ${result.detail}`,
      );
    } catch (err) {
      if (isCancellation(err)) throw err;
      // The operation's own history says which step failed; its clean-up left the replica as the state says.
      const reason = `${operation} failed: ${failureMessage(err)}`;
      const target = (checked.payload as OperationPayload<'failback'>).target;
      if (operation === 'failback' && target === 'original' && !refusedBeforeStart(err)) {
        // It may have written to production before it stopped: booting that VM would run a torn mix of old data
        // and the replica's (the fault suite found undoFailover doing so).
        const production = view.productionVm?.vm ?? view.vm;
        view.unfinishedFailback = { operationId, vm: production, at: new Date().toISOString() };
        view.attention = `failback ${operationId} stopped before it finished: ${production}'s disks may be partly overwritten; run failback again to finish it (undoFailover leaves ${production} off meanwhile)`;
      }
      finish({ refused: reason, type: FailureTypes.hypervisor }, reason);
    }
  }

  /** The state from the DR host and the histories, when this entity has none or its holder vanished. */
  async function rebuild(why: string): Promise<void> {
    const rebuilt = await withSummary(
      control.rebuildReplicaState,
      `Rebuild the state of ${view.vm} from the DR host (${why})`,
      [{ vm: view.vm, job: view.job }],
      // The entity serves nobody until it knows its state, however long the DR host is away (no attempt limit).
      { ...persistentOptions, retry: { initialInterval: '5s', backoffCoefficient: 2, maximumInterval: '1 minute' } },
    );
    log.info('Replica state rebuilt', { vm: view.vm, why, state: rebuilt.state, evidence: rebuilt.evidence });
    view.state = rebuilt.state;
    view.restorePoints = rebuilt.restorePoints;
    view.failbackTo = rebuilt.failbackTo;
    view.productionVm = rebuilt.productionVm;
    view.attention = rebuilt.attention;
    upsertMemo({ rebuilt: { why, at: new Date().toISOString(), state: rebuilt.state, evidence: rebuilt.evidence } });
    const holder = rebuilt.holder;
    if (view.currentSession === null && holder && !view.waitingSessions.some((s) => s.sessionId === holder.sessionId)) {
      view.currentSession = holder;
      granted = true;
      adopted = true;
      watch.reset();
    }
  }

  /** Takes the replica back from a holder that no longer runs. */
  async function checkHolder(): Promise<void> {
    const holder = view.currentSession;
    if (holder === null) return; // released while the check was due
    const gone = await withSummary(control.workflowsNotRunning, `Check that ${holder.workflowId} still runs`, [
      { workflowIds: [holder.workflowId] },
    ]);
    watch.checked(gone.length === 0);
    if (gone.length === 0 || view.currentSession?.sessionId !== holder.sessionId) return;
    log.warn('Holder of the replica is no longer running; the replica is taken back', { ...holder });
    releaseCurrent(`taken back: ${holder.workflowId} ended without giving the replica back`);
    await rebuild(`${holder.kind} ${holder.workflowId} ended without giving the replica back`);
  }

  const runnable = () =>
    (view.currentSession === null && view.waitingSessions.length > 0) ||
    (view.currentSession !== null && !granted && !adopted);
  const canContinueAsNew = () => workflowInfo().continueAsNewSuggested && allHandlersFinished();
  // 0.2.0 watched a granted holder only while someone waited: a dead one stayed currentSession (and a source it
  // left off went unreported) until the next request. Runs started before keep that rule.
  const watchEveryHolder = patched('replica-watch-every-holder');
  const watching = () =>
    view.currentSession !== null && (watchEveryHolder || adopted || view.waitingSessions.length > 0);
  const rollOverDue = () => {
    const info = workflowInfo();
    if (rollingOver || !info.continueAsNewSuggested) return false;
    suggestedAt ??= info.historyLength; // when this run was first told: deterministic, like the history itself
    return info.historyLength > suggestedAt + ROLL_OVER_AFTER_EVENTS;
  };

  if (rebuilding) {
    await rebuild('started without state');
    rebuilding = false;
  }
  publish();
  for (;;) {
    // Someone starting (or ending) to wait changes whether the holder is watched: the wait restarts then.
    const watched = watching();
    const checkDue =
      (await condition(
        () => runnable() || canContinueAsNew() || rollOverDue() || watching() !== watched,
        watched ? watch.nextCheckMs() : undefined,
      )) === false;
    if (rollOverDue()) {
      // Updates waiting for operations queued behind a long holder would keep the history growing for good.
      rollingOver = true;
      continue;
    }
    if (checkDue) {
      await checkHolder();
      publish();
      continue;
    }
    if (!runnable() && canContinueAsNew()) {
      // The queue and the current holder travel with the new run; the holder was already told.
      const { vm, job, ...carried } = view;
      return continueAsNew<typeof replica>({
        vm,
        job,
        carried: { ...carried, queuedOperations: [...operations.values()], holderAdopted: adopted },
      });
    }
    if (view.currentSession === null && view.waitingSessions.length > 0) {
      view.currentSession = view.waitingSessions.shift()!;
      watch.reset();
    }
    const current = view.currentSession;
    if (current !== null && !granted && !adopted) {
      granted = true;
      const queued = operations.get(current.sessionId);
      if (queued) {
        publish();
        await runOperation(queued);
        operations.delete(current.sessionId);
        view.currentSession = null;
        granted = false;
      } else {
        try {
          await getExternalWorkflowHandle(current.workflowId).signal(sessionGrantedSignal, {
            state: view.state,
            productionVm: view.productionVm,
          });
        } catch (err) {
          log.warn('Session to grant the replica to is gone', { sessionId: current.sessionId, error: String(err) });
          if (view.currentSession?.sessionId === current.sessionId) view.currentSession = null;
          granted = false;
        }
      }
    }
    publish();
  }
}
