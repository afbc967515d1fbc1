import { proxyActivities, setCurrentDetails, upsertSearchAttributes, type ActivityOptions } from '@temporalio/workflow';
import type { Activities } from '../activities';
import { SearchAttributes } from '../contract';

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
  | 'Switching'
  | 'PoweringOnReplica'
  | 'Retention'
  | 'Done'
  | 'Skipped'
  | 'Failed';

/** Control calls to a hypervisor: short, retried with backoff while the host is unreachable. */
export const controlOptions: ActivityOptions = {
  startToCloseTimeout: '2 minutes',
  retry: { initialInterval: '1s', backoffCoefficient: 2, maximumInterval: '30s', maximumAttempts: 10 },
};

/** Copies run long and heartbeat; a missed heartbeat means the proxy died, and the retry resumes. */
export const copyOptions: ActivityOptions = {
  startToCloseTimeout: '24 hours',
  heartbeatTimeout: '30s',
  retry: { initialInterval: '1s', backoffCoefficient: 2, maximumInterval: '30s', maximumAttempts: 20 },
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

/** The message of the deepest cause: "Activity task failed" says less than what the activity said. */
export function failureMessage(err: unknown): string {
  let deepest: unknown = err;
  while (deepest instanceof Error && deepest.cause instanceof Error) deepest = deepest.cause;
  return deepest instanceof Error ? deepest.message : String(deepest);
}
