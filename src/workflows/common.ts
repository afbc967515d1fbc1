import {
  ApplicationFailure,
  log,
  proxyActivities,
  setCurrentDetails,
  upsertSearchAttributes,
  type ActivityOptions,
} from '@temporalio/workflow';
import type { Activities } from '../activities';
import { FailureTypes, formatProblems, SearchAttributes, type InputProblem } from '../contract';

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
  const before = new Set<string>([FailureTypes.wrongState, FailureTypes.invalidInput, FailureTypes.accessDenied]);
  for (let f: unknown = err; f instanceof Error; f = f.cause)
    if (f instanceof ApplicationFailure && f.type && before.has(f.type)) return true;
  return false;
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
