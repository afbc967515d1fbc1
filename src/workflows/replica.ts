import {
  allHandlersFinished,
  condition,
  continueAsNew,
  getExternalWorkflowHandle,
  log,
  setCurrentDetails,
  setHandler,
  upsertSearchAttributes,
  workflowInfo,
} from '@temporalio/workflow';
import {
  replicaQueries,
  replicaSignals,
  SearchAttributes,
  sessionGrantedSignal,
  type ReplicaEntityInput,
  type ReplicaView,
  type SessionReport,
} from '../contract';

/**
 * The entity of one replica (id replica/<vm>): the owner of its state and restore-point list, and of the rule
 * that one session at a time works on it, across every worker. Sessions queue in the order they ask.
 */
export async function replica(input: ReplicaEntityInput): Promise<void> {
  const view: ReplicaView = {
    vm: input.vm,
    job: input.job,
    state: 'Unseeded',
    restorePoints: [],
    currentSession: null,
    waitingSessions: [],
    lastRun: null,
    lastRejection: null,
    ...input.carried,
  };
  let granted = view.currentSession !== null; // a session carried over was already told

  const publish = () => {
    upsertSearchAttributes([
      { key: SearchAttributes.FailoverVm, value: view.vm },
      { key: SearchAttributes.FailoverJob, value: view.job },
      { key: SearchAttributes.ReplicaState, value: view.state },
    ]);
    const session = view.currentSession
      ? `session ${view.currentSession.sessionId} (${view.currentSession.kind})`
      : 'idle';
    setCurrentDetails(
      `**${view.state}**, ${view.restorePoints.length} restore point(s); ${session}; ${view.waitingSessions.length} waiting`,
    );
  };

  const apply = (report: SessionReport) => {
    if (report.state) view.state = report.state;
    if (report.restorePoints) view.restorePoints = report.restorePoints;
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
    view.lastRun = { sessionId: report.sessionId, at: new Date().toISOString(), outcome: report.outcome ?? 'released' };
    view.currentSession = null;
    granted = false;
  });

  setHandler(replicaQueries.state, () => view);

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
    if (view.currentSession !== null && !granted) {
      const session = view.currentSession;
      granted = true;
      try {
        await getExternalWorkflowHandle(session.workflowId).signal(sessionGrantedSignal, { state: view.state });
      } catch (err) {
        log.warn('Session to grant the replica to is gone', { sessionId: session.sessionId, error: String(err) });
        if (view.currentSession?.sessionId === session.sessionId) view.currentSession = null;
      }
    }
    publish();
    if (workflowInfo().continueAsNewSuggested) {
      // The queue and the current holder travel with the new run; the holder was already told.
      await condition(allHandlersFinished);
      const { vm, job, ...carried } = view;
      return continueAsNew<typeof replica>({ vm, job, carried });
    }
  }
}
