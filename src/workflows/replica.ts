import {
  allHandlersFinished,
  ApplicationFailure,
  condition,
  continueAsNew,
  executeChild,
  getExternalWorkflowHandle,
  isCancellation,
  log,
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
  type OperationName,
  type AnyOperationPayload,
  type OperationOutcome,
  type QueuedOperation,
  type RejectionRecord,
  type ReplicaEntityInput,
  type ReplicaOperationInput,
  type ReplicaView,
  type SessionReport,
} from '../contract';
import { checkTransition } from '../domain/replica-state';
import { control, failureMessage, withSummary } from './common';
import { replicaOperation } from './replica-operations';

/**
 * The entity of one replica (id replica/<vm>): the owner of its state and restore-point list, and of the rule
 * that one session or operation at a time works on it, across every worker. Sessions and operations queue in
 * the order they ask. Operations (undo, failback, ...) arrive as signals or updates; an update's caller gets
 * the outcome or the rejection, a rejected signal is recorded in the state and in the history.
 */
export async function replica(input: ReplicaEntityInput): Promise<void> {
  const { queuedOperations = [], ...carriedView } = input.carried ?? {};
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
    failbackTo: null,
    ...carriedView,
  };
  const operations = new Map(queuedOperations.map((q) => [q.operationId, q]));
  const outcomes = new Map<string, OperationOutcome | { rejected: string }>();
  let granted = view.currentSession !== null; // a session carried over was already told

  const publish = () => {
    upsertSearchAttributes([
      { key: SearchAttributes.FailoverVm, value: view.vm },
      { key: SearchAttributes.FailoverJob, value: view.job },
      { key: SearchAttributes.ReplicaState, value: view.state },
    ]);
    const current = view.currentSession ? `${view.currentSession.kind} by ${view.currentSession.requestedBy}` : 'idle';
    setCurrentDetails(
      `**${view.state}**, ${view.restorePoints.length} restore point(s); ${current}; ${view.waitingSessions.length} waiting`,
    );
  };

  const apply = (report: SessionReport) => {
    if (report.state) view.state = report.state;
    if (report.restorePoints) view.restorePoints = report.restorePoints;
    if (report.downtime) view.lastDowntime = report.downtime;
  };

  const reject = (operation: string, requestedBy: string, reason: string) => {
    const record: RejectionRecord = { at: new Date().toISOString(), operation, requestedBy, reason };
    view.lastRejection = record;
    upsertMemo({ lastRejection: record }); // a WorkflowPropertiesModified event: the rejection is in the history
    log.warn('Request refused', { ...record });
  };

  setHandler(replicaSignals.requestSession, (session) => {
    if (view.currentSession?.sessionId === session.sessionId)
      granted = false; // a retried request: grant again
    else if (!view.waitingSessions.some((s) => s.sessionId === session.sessionId)) view.waitingSessions.push(session);
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
    const { workflowId: _, ...session } = view.currentSession;
    view.lastRun = { ...session, at: new Date().toISOString(), outcome: report.outcome ?? 'released' };
    view.currentSession = null;
    granted = false;
  });

  setHandler(replicaQueries.state, () => view);

  /** Checks an operation request now; the state is checked again when its turn comes. */
  const check = (name: OperationName, payload: unknown): { problem: string } | { payload: AnyOperationPayload } => {
    const checked = validate(operationSchemas[name], payload);
    if (!checked.ok) return { problem: formatProblems(`The ${name} request`, checked.problems) };
    const transition = checkTransition(view.state, name);
    if (!transition.allowed) return { problem: transition.reason };
    return { payload: checked.value };
  };

  const enqueue = (name: OperationName, payload: unknown, viaUpdate: boolean): string => {
    const operationId = uuid4();
    const { requestedBy = '', reason = '' } = (payload ?? {}) as { requestedBy?: string; reason?: string };
    operations.set(operationId, { operationId, operation: name, payload, viaUpdate });
    view.waitingSessions.push({
      sessionId: operationId,
      workflowId: operationWorkflowId(view.vm, name, operationId),
      kind: name,
      requestedBy,
      reason,
    });
    return operationId;
  };

  for (const name of OperationNames) {
    setHandler(operationSignals[name], (payload) => {
      const checked = check(name, payload);
      const requestedBy = (payload as { requestedBy?: unknown } | null)?.requestedBy;
      if ('problem' in checked)
        return reject(name, typeof requestedBy === 'string' ? requestedBy : '(unknown)', checked.problem);
      enqueue(name, payload, false);
    });
    setHandler(
      operationUpdates[name],
      async (payload) => {
        const operationId = enqueue(name, payload, true);
        await condition(() => outcomes.has(operationId));
        const outcome = outcomes.get(operationId)!;
        outcomes.delete(operationId);
        if ('rejected' in outcome) {
          throw ApplicationFailure.create({
            type: FailureTypes.wrongState,
            message: outcome.rejected,
            nonRetryable: true,
          });
        }
        return outcome;
      },
      {
        // Refused at once, before anything is queued or written to the history.
        validator: (payload) => {
          const checked = check(name, payload);
          if ('problem' in checked) throw new Error(checked.problem);
        },
      },
    );
  }

  /** Runs one queued operation as a child workflow of its own; its history holds every step. */
  async function runOperation(queued: QueuedOperation): Promise<void> {
    const { operation, payload, operationId } = queued;
    const session = view.currentSession!;
    const finish = (outcome: OperationOutcome | { rejected: string }, runOutcome: string) => {
      if ('rejected' in outcome) reject(operation, session.requestedBy, outcome.rejected);
      if (queued.viaUpdate) outcomes.set(operationId, outcome);
      view.lastRun = { ...session, at: new Date().toISOString(), outcome: runOutcome };
    };
    const checked = check(operation, payload);
    if ('problem' in checked) return finish({ rejected: checked.problem }, `refused: ${checked.problem}`);
    try {
      await withSummary(control.checkOperator, `Check that ${session.requestedBy} may ${operation}`, [
        { user: session.requestedBy, permission: 'failover' },
      ]);
    } catch (err) {
      const reason = failureMessage(err);
      return finish({ rejected: reason }, `refused: ${reason}`);
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
      },
    ];
    try {
      const result = await executeChild(replicaOperation, {
        workflowId: session.workflowId,
        args,
        staticSummary: `${operation} of ${view.vm}, requested by ${session.requestedBy}: ${session.reason}`,
      });
      view.state = result.state;
      view.restorePoints = result.restorePoints;
      view.failbackTo = result.failbackTo;
      finish(
        {
          operation,
          state: result.state,
          detail: result.detail,
          bytesCopied: result.bytesCopied,
          workflowId: session.workflowId,
        },
        `${operation}: ${result.detail}`,
      );
    } catch (err) {
      if (isCancellation(err)) throw err;
      // The operation's own history says which step failed; the state stays what it was before it.
      const reason = `${operation} failed: ${failureMessage(err)}`;
      finish({ rejected: reason }, reason);
    }
  }

  publish();
  for (;;) {
    await condition(
      () =>
        (view.currentSession === null && view.waitingSessions.length > 0) ||
        (view.currentSession !== null && !granted) ||
        workflowInfo().continueAsNewSuggested,
    );
    if (view.currentSession === null && view.waitingSessions.length > 0) {
      view.currentSession = view.waitingSessions.shift()!;
    }
    const current = view.currentSession;
    if (current !== null && !granted) {
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
          await getExternalWorkflowHandle(current.workflowId).signal(sessionGrantedSignal, { state: view.state });
        } catch (err) {
          log.warn('Session to grant the replica to is gone', { sessionId: current.sessionId, error: String(err) });
          if (view.currentSession?.sessionId === current.sessionId) view.currentSession = null;
        }
      }
    }
    publish();
    if (workflowInfo().continueAsNewSuggested) {
      // The queue and the current holder travel with the new run; the holder was already told.
      await condition(allHandlersFinished);
      const { vm, job, ...carried } = view;
      return continueAsNew<typeof replica>({
        vm,
        job,
        carried: { ...carried, queuedOperations: [...operations.values()] },
      });
    }
  }
}
