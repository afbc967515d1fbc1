import { ApplicationFailure, Context } from '@temporalio/activity';
import { WithStartWorkflowOperation, type Client } from '@temporalio/client';
import { msToNumber } from '@temporalio/common/lib/time';
import type { Configuration } from '../config/schema';
import {
  claimNonceUpdate,
  FailureTypes,
  isSigned,
  REQUEST_NONCES_WORKFLOW_ID,
  requestToSign,
  TASK_QUEUE,
  WorkflowTypes,
  type RequestToVerify,
  type VerifiedRequester,
} from '../contract';
import { checkAccess, permissionFor } from '../domain/roles';
import { keyId, signatureMatches } from '../identity/keys';
import { jobScheduleId, scheduleEvery } from '../schedules';

/** A request signed a little ahead of the receiving server's clock is still accepted (clocks drift). */
const CLOCK_SKEW_MS = 60_000;

/** How long a scheduled run waits for its schedule to list it: the schedule records a start just after making it. */
const SCHEDULE_LISTING_WAIT_MS = 10_000;

const refuse = (type: string, message: string) => ApplicationFailure.create({ type, message, nonRetryable: true });
const notVerified = (message: string) => refuse(FailureTypes.requestNotVerified, message);

/**
 * Verifies who asked, before a workflow touches anything: the signature against the requester's keys in the
 * configuration as it is now (so a rotated key or a removed user takes effect on the next request), the time it was
 * signed against when the workflow received it, the requester's roles, and last that its nonce was never used for
 * this target (claimed in the request-nonces registry, so a refused request leaves its nonce unused).
 */
export function createRequestActivities(configuration: () => Configuration, client: Client) {
  /** Claims the nonce for its target; the same claimer again (an activity retry) is no replay. */
  async function claimNonce(input: RequestToVerify, nonce: string, keepUntil: number): Promise<void> {
    const result = await client.workflow.executeUpdateWithStart(claimNonceUpdate, {
      args: [{ target: input.target, nonce, claimer: input.claimer, keepUntil }],
      startWorkflowOperation: new WithStartWorkflowOperation(WorkflowTypes.requestNonces, {
        workflowId: REQUEST_NONCES_WORKFLOW_ID,
        taskQueue: TASK_QUEUE,
        workflowIdConflictPolicy: 'USE_EXISTING',
        args: [{}],
        staticSummary: 'Nonces of signed requests, kept while the requests could still be accepted',
      }),
    });
    if (!result.claimed)
      throw notVerified(
        `nonce: replayed: ${nonce} was already used for ${input.target} (by ${result.claimedBy}); sign the request again`,
      );
  }

  /** A scheduled job run proves itself by its schedule: the schedule the configuration names lists this very run. */
  async function startedByItsSchedule(config: Configuration, job: string): Promise<void> {
    const configured = config.jobs.find((j) => j.name === job)?.schedule;
    if (!configured) throw notVerified(`schedule: job '${job}' has no schedule in the configuration`);
    const scheduleId = jobScheduleId(job);
    const { workflowId, runId } = Context.current().info.workflowExecution!;
    const deadline = Date.now() + SCHEDULE_LISTING_WAIT_MS;
    for (;;) {
      const schedule = await client.schedule.getHandle(scheduleId).describe();
      const intervals = schedule.spec.intervals ?? [];
      if (intervals.length !== 1 || msToNumber(intervals[0]!.every) !== scheduleEvery(configured.every))
        throw notVerified(`schedule: ${scheduleId} does not run every ${configured.every} as the configuration says`);
      const runs = [...schedule.info.runningActions, ...schedule.info.recentActions.map((r) => r.action)];
      if (runs.some((a) => a.workflow.workflowId === workflowId && a.workflow.firstExecutionRunId === runId)) return;
      if (Date.now() > deadline)
        throw notVerified(
          `schedule: ${workflowId} was not started by schedule ${scheduleId}: a scheduled run cannot be replayed`,
        );
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
  }

  return {
    async verifyRequest(input: RequestToVerify): Promise<VerifiedRequester> {
      const config = configuration();
      const claimed = input.request.requestedBy;
      const requestedBy = typeof claimed === 'string' ? claimed : '';
      const user = config.users.find((u) => u.name === requestedBy);
      if (!user) throw refuse(FailureTypes.accessDenied, `requestedBy: unknown user '${requestedBy}'`);
      const access = checkAccess(user.name, user.roles, permissionFor(input.operation));
      if (!isSigned(input.request)) {
        if (!config.requests.allowUnsigned)
          throw notVerified(
            `signature: unsigned: this orchestrator accepts only signed requests; sign it with ` +
              `\`failover sign ${input.operation}${input.target === input.operation ? '' : ` --workflow-id ${input.target}`}\` ` +
              `(the project CLI signs by itself)`,
          );
        if (!access.allowed) throw refuse(FailureTypes.accessDenied, `requestedBy: ${access.reason}`);
        return { user: user.name, keyId: null };
      }
      const request = input.request as Record<string, unknown> & { issuedAt: string; nonce: string; signature: string };
      const message = requestToSign(input.operation, input.target, request);
      const key = user.keys.find((line) => signatureMatches(message, request.signature, line));
      if (!key) {
        const other = config.users.find(
          (u) => u !== user && u.keys.some((l) => signatureMatches(message, request.signature, l)),
        );
        throw notVerified(
          other
            ? `signature: signed with a key of '${other.name}', not of '${user.name}'`
            : `signature: does not match the request with any key of '${user.name}': tampered, signed for another operation or target, or with a key the configuration no longer lists`,
        );
      }
      const validMs = config.requests.validityMinutes * 60_000;
      const scheduled = typeof request.schedule === 'string';
      const service = config.scheduledRuns?.requestedBy === user.name;
      if (scheduled !== service)
        throw notVerified(
          service
            ? `requestedBy: '${user.name}' is the service identity of scheduled runs and makes no other request`
            : `schedule: '${user.name}' is not the service identity of scheduled runs`,
        );
      if (scheduled) {
        await startedByItsSchedule(config, String(request.job));
      } else {
        const issuedAt = Date.parse(request.issuedAt);
        if (issuedAt > input.receivedAt + CLOCK_SKEW_MS)
          throw notVerified(
            `issuedAt: in the future: signed at ${request.issuedAt}, received at ${new Date(input.receivedAt).toISOString()} (check the signer's clock)`,
          );
        if (input.receivedAt - issuedAt > validMs)
          throw notVerified(
            `issuedAt: expired: signed at ${request.issuedAt}, received at ${new Date(input.receivedAt).toISOString()}; requests are valid for ${config.requests.validityMinutes} minutes`,
          );
      }
      if (!access.allowed) throw refuse(FailureTypes.accessDenied, `requestedBy: ${access.reason}`);
      // A scheduled run's request is its schedule's, the same every time: the schedule's listing is its proof.
      if (!scheduled)
        await claimNonce(input, request.nonce, Date.parse(request.issuedAt) + 2 * validMs + CLOCK_SKEW_MS);
      return { user: user.name, keyId: keyId(key) };
    },
  };
}
