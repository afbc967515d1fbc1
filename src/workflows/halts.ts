// A halted critical window and the operator decisions on it (updates retry, abort, forceFailover). Each halt is
// numbered; a decision applies to the halt that was current when it arrived, and its update always returns: with
// what the decision led to, or with the next halt that overtook it.
import {
  allHandlersFinished,
  ApplicationFailure,
  CancellationScope,
  condition,
  log,
  patched,
  setHandler,
  uuid4,
  workflowInfo,
} from '@temporalio/workflow';
import {
  FailureTypes,
  formatProblems,
  haltedSessionUpdates,
  operatorRequestSchema,
  validate,
  type HaltRecord,
  type OperatorRequest,
  type SessionProgress,
  type VerifiedRequester,
} from '../contract';
import type { Decision } from '../domain/critical-window';
import {
  control,
  failureMessage,
  refusalType,
  SIGNED_REQUESTS_PATCH,
  verifyRequester,
  withSummary,
  type SessionStep,
} from './common';
import { recordHalt, recordHaltDecision } from './metrics';

export interface TakenDecision {
  kind: Decision;
  request: OperatorRequest;
  /** Who was verified to have sent it (absent in sessions that predate signed requests). */
  requester?: VerifiedRequester;
}

export class HaltDesk {
  private current: HaltRecord | null = null;
  private decision: (TakenDecision & { haltId: number }) | null = null;
  /** The decided halt whose outcome the decision's update still waits for. */
  private unsettled: HaltRecord | null = null;
  private readonly answers = new Map<number, string>();

  constructor(
    private readonly progress: SessionProgress,
    private readonly records: HaltRecord[],
    private readonly show: (step: SessionStep, detail: string) => void,
  ) {
    for (const kind of ['retry', 'abort', 'forceFailover'] as const) {
      // A decision is what ends a halt that a cancellation caused: it must not be cancelled with the session.
      setHandler(
        haltedSessionUpdates[kind],
        (request) => CancellationScope.nonCancellable(() => this.decide(kind, request)),
        {
          validator: (request) => {
            const checked = validate(operatorRequestSchema, request);
            if (!checked.ok)
              throw ApplicationFailure.create({
                type: FailureTypes.invalidInput,
                message: formatProblems(`The ${kind} request`, checked.problems),
                nonRetryable: true,
              });
            if (!this.current)
              throw ApplicationFailure.create({
                type: FailureTypes.wrongState,
                message: `${kind} is only possible while the session is halted; it is at step ${this.progress.step}`,
                nonRetryable: true,
              });
          },
        },
      );
    }
  }

  private async decide(kind: Decision, request: OperatorRequest): Promise<string> {
    const haltId = this.current!.id; // the halt this decision was sent for, taken before anything is awaited
    const receivedAt = Date.now();
    let requester: VerifiedRequester | undefined;
    try {
      if (patched(SIGNED_REQUESTS_PATCH))
        requester = await verifyRequester(kind, workflowInfo().workflowId, request, receivedAt, `decision ${uuid4()}`);
      else
        await withSummary(control.checkOperator, `Check that ${request.requestedBy} may decide`, [
          { user: request.requestedBy, permission: 'failover' },
        ]);
    } catch (err) {
      // The refusal names its field (requestedBy, signature, issuedAt, nonce) itself.
      throw ApplicationFailure.create({ type: refusalType(err), message: failureMessage(err), nonRetryable: true });
    }
    if (this.current?.id !== haltId || this.decision !== null) {
      throw ApplicationFailure.create({
        type: FailureTypes.wrongState,
        message: `halt #${haltId} this ${kind} was sent for was already decided${this.current ? `; the session is halted again (#${this.current.id}): decide that one` : ''}`,
        nonRetryable: true,
      });
    }
    this.decision = { kind, request, haltId, ...(requester ? { requester } : {}) };
    await condition(() => this.answers.has(haltId));
    return this.answers.get(haltId)!;
  }

  /** Halts the window at `step` and waits, with no time limit, for an operator's decision. */
  async halt(step: string, reason: string): Promise<TakenDecision> {
    this.settle(`the session halted again at ${step}: ${reason}`);
    const record: HaltRecord = { id: this.records.length + 1, step, reason, since: new Date().toISOString() };
    this.records.push(record);
    this.current = record;
    this.progress.halted = { id: record.id, step, reason, since: record.since };
    this.show('Halted', `#${record.id} at ${step}: ${reason}. Waiting for an operator: retry, abort or forceFailover`);
    log.warn('Critical window halted', { haltId: record.id, step, reason });
    recordHalt(step);
    await condition(() => this.decision?.haltId === record.id);
    const { kind, request, requester } = this.decision!;
    record.decision = kind;
    record.decidedBy = request.requestedBy;
    if (requester) record.decidedWithKey = requester.keyId;
    record.decisionReason = request.reason;
    log.info('Operator decision on halted session', { haltId: record.id, decision: kind, ...request });
    recordHaltDecision(kind);
    this.current = null;
    this.decision = null;
    this.progress.halted = null;
    this.unsettled = record;
    return { kind, request, ...(requester ? { requester } : {}) };
  }

  /** Answers the update of the last decision with what it led to. */
  settle(outcome: string): void {
    const record = this.unsettled;
    if (!record) return;
    record.outcome = outcome;
    this.answers.set(record.id, outcome);
    this.unsettled = null;
  }

  /** Before the session returns: no decision update is left waiting. */
  async close(outcome: string): Promise<void> {
    this.settle(outcome);
    await condition(allHandlersFinished);
  }
}
