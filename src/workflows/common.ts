import {
  ApplicationFailure,
  log,
  patched,
  proxyActivities,
  setCurrentDetails,
  upsertSearchAttributes,
  workflowInfo,
  type ActivityOptions,
} from '@temporalio/workflow';
import type { Activities } from '../activities';
import {
  FailureTypes,
  formatProblems,
  formatRequester,
  requestTarget,
  SearchAttributes,
  type InputProblem,
  type SignedOperation,
  type VerifiedRequester,
} from '../contract';

/** Steps a session shows in FailoverStep and in the Web UI's current details. */
export type SessionStep =
  | 'WaitingForReplica'
  | 'Preparing'
  | 'WaitingForProxy'
  | 'Syncing'
  | 'PoweringOffSource'
  | 'FinalSync'
  | 'Verifying'
  | 'Halted'
  | 'Aborting'
  | 'Aborted'
  | 'Switching'
  | 'PoweringOnReplica'
  | 'VerifyingAllBlocks'
  | 'VerificationMismatch'
  | 'Unverified'
  | 'Retention'
  | 'Done'
  | 'Skipped'
  | 'Cancelled'
  | 'Failed';

/**
 * An activity that no worker picks up within this long fails instead of waiting in its task queue for good (a
 * proxy or orchestration worker that is down). A schedule-to-start timeout is not retried: the caller decides.
 */
const PICKUP = '5 minutes';

/** Quick control calls to a hypervisor: retried with backoff while the host is unreachable; a call lost with
 * its worker is retried after 45 s at most. */
export const controlOptions: ActivityOptions = {
  startToCloseTimeout: '45s',
  scheduleToStartTimeout: PICKUP,
  retry: { initialInterval: '1s', backoffCoefficient: 2, maximumInterval: '30s', maximumAttempts: 10 },
};

/** Calls that wait on the hypervisor (guest shutdown, boot, verification, merges) heartbeat while they wait, so a
 * dead worker is noticed in 10 s however long the wait may be. */
export const waitingOptions: ActivityOptions = {
  ...controlOptions,
  startToCloseTimeout: '2 hours',
  heartbeatTimeout: '10s',
};

/** Copies run long and heartbeat their resume point; a missed heartbeat means the proxy died, and the retry
 * resumes from it. */
export const copyOptions: ActivityOptions = {
  startToCloseTimeout: '24 hours',
  scheduleToStartTimeout: PICKUP,
  heartbeatTimeout: '20s',
  retry: { initialInterval: '1s', backoffCoefficient: 2, maximumInterval: '30s', maximumAttempts: 20 },
};

/**
 * Work that must get done however long a host stays away, such as giving the DR host back what an aborted
 * failover left there: retried for about a day, at most every five minutes.
 */
export const persistentOptions: ActivityOptions = {
  ...waitingOptions,
  retry: { initialInterval: '5s', backoffCoefficient: 2, maximumInterval: '5 minutes', maximumAttempts: 300 },
};

export const control = proxyActivities<Activities>(controlOptions);

/** Runs an activity with a human summary, which the Web UI shows on its row in the history. */
export function withSummary<A extends unknown[], R>(
  activity: { executeWithOptions(options: ActivityOptions, args: A): Promise<R> },
  summary: string,
  args: A,
  options: ActivityOptions = controlOptions,
): Promise<R> {
  return activity.executeWithOptions({ ...options, summary }, args);
}

/** Workflows that verify signed requests (verifyRequest) rather than only the roles of the name a request gives. */
export const SIGNED_REQUESTS_PATCH = 'signed-requests';

/**
 * Verifies who asked, in an activity, before anything is touched: signature, time, roles and nonce (see
 * verifyRequest). The refusal it throws is non-retryable and says why; the verified requester is in the history.
 */
export function verifyRequester(
  operation: SignedOperation,
  target: string,
  request: unknown,
  receivedAt: number,
  claimer: string,
): Promise<VerifiedRequester> {
  const requestedBy = (request as { requestedBy?: unknown } | null)?.requestedBy;
  return withSummary(control.verifyRequest, `Verify that ${String(requestedBy)} asked for ${operation} (${target})`, [
    { operation, target, request: request as Record<string, unknown>, receivedAt, claimer },
  ]);
}

/**
 * Verifies the request that started this workflow (received when the workflow started; the workflow run it started
 * claims its nonce) and records the verified requester in the FailoverRequestedBy search attribute. A refusal fails
 * the workflow with the reason. Undefined in a run that predates signed requests (it checked roles only).
 */
export async function verifyStartRequest(
  operation: SignedOperation,
  request: unknown,
  what: string,
): Promise<VerifiedRequester | undefined> {
  if (!patched(SIGNED_REQUESTS_PATCH)) return undefined;
  const info = workflowInfo();
  const claimer = `${info.workflowId}/${info.firstExecutionRunId}`;
  let requester: VerifiedRequester;
  try {
    requester = await verifyRequester(operation, requestTarget(operation), request, info.startTime.getTime(), claimer);
  } catch (err) {
    throw refusedRequest(what, err);
  }
  upsertSearchAttributes([{ key: SearchAttributes.FailoverRequestedBy, value: requester.user }]);
  return requester;
}

/**
 * The line of a workflow's current details that names who asked, as verified: its start's summary is the starter's
 * own claim. Empty in a run that predates signed requests.
 */
export const verifiedRequesterLine = (requester: VerifiedRequester | undefined): string[] => {
  if (!requester) return [];
  return [
    requester.keyId
      ? `Requested by ${formatRequester(requester)}, verified`
      : `Requested by ${requester.user}, unsigned: accepted only because requests.allowUnsigned is on`,
  ];
};

/** The search attribute that lists a workflow under its verified requester, for a child's start options. */
export const requestedBy = (requester: VerifiedRequester) => ({
  key: SearchAttributes.FailoverRequestedBy,
  value: requester.user,
});

/** A request whose requester was not verified: the refusal's own type (RequestNotVerified, AccessDenied) and why. */
export function refusedRequest(what: string, err: unknown): ApplicationFailure {
  return ApplicationFailure.create({
    type: refusalType(err),
    message: `${what} was refused: ${failureMessage(err)}`,
    nonRetryable: true,
  });
}

export function showStep(step: SessionStep, details: string): void {
  upsertSearchAttributes([{ key: SearchAttributes.FailoverStep, value: step }]);
  setCurrentDetails(`**${step}**: ${details}`);
}

/**
 * Runs an activity, logging and swallowing its failure: for clean-up that must not turn a result into a failure.
 * Resolves to whether it succeeded.
 */
export async function bestEffort(what: string, call: () => Promise<unknown>): Promise<boolean> {
  try {
    await call();
    return true;
  } catch (err) {
    log.warn(`${what} failed; left for later`, { error: failureMessage(err) });
    return false;
  }
}

/** The message of the deepest cause: "Activity task failed" says less than what the activity said. */
export function failureMessage(err: unknown): string {
  let deepest: unknown = err;
  while (deepest instanceof Error && deepest.cause instanceof Error) deepest = deepest.cause;
  return deepest instanceof Error ? deepest.message : String(deepest);
}

/** True when an operation failed with a refusal it raises before it changes anything (wrong state, bad input). */
export function refusedBeforeStart(err: unknown): boolean {
  const before = new Set<string>([
    FailureTypes.wrongState,
    FailureTypes.invalidInput,
    FailureTypes.accessDenied,
    FailureTypes.requestNotVerified,
  ]);
  for (let f: unknown = err; f instanceof Error; f = f.cause)
    if (f instanceof ApplicationFailure && f.type && before.has(f.type)) return true;
  return false;
}

/** The type of the refusal an activity raised (AccessDenied, RequestNotVerified, ...), AccessDenied when none. */
export function refusalType(err: unknown): string {
  for (let f: unknown = err; f instanceof Error; f = f.cause)
    if (f instanceof ApplicationFailure && f.type) return f.type;
  return FailureTypes.accessDenied;
}

/** A request refused before anything is touched: non-retryable, naming every problem, with them as details. */
export function refusedInput(what: string, problems: InputProblem[]): ApplicationFailure {
  return ApplicationFailure.create({
    type: FailureTypes.invalidInput,
    message: formatProblems(what, problems),
    details: [problems],
    nonRetryable: true,
  });
}
