import { ApplicationFailure } from '@temporalio/activity';
import { isHypervisorError } from '../hypervisor/errors';
import { FailureTypes } from '../contract';

/**
 * Maps hypervisor errors onto Temporal's retry rules: an unreachable or failing host is retried by the
 * activity's policy; a missing object, a conflict or a bad request is final and says so.
 */
export function asActivityFailure(err: unknown): unknown {
  if (!isHypervisorError(err)) return err;
  return ApplicationFailure.create({
    type: `${FailureTypes.hypervisor}:${err.code}`,
    message: err.message,
    nonRetryable: !err.retryable,
    cause: err,
  });
}

/** Runs an activity body so that every hypervisor error leaves it in the form the retry policy understands. */
export async function withHypervisorFailures<T>(body: () => Promise<T>): Promise<T> {
  try {
    return await body();
  } catch (err) {
    throw asActivityFailure(err);
  }
}
