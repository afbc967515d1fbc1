import { ApplicationFailure, log } from '@temporalio/workflow';
import { FailureTypes, formatProblems, validatePlannedFailoverInput, type PlannedFailoverInput } from '../contract';

/**
 * Moves running VMs to their replicas with minimum downtime and zero data loss.
 * The input is checked first, and every problem is named at once, before any VM is touched.
 */
export async function plannedFailover(input: unknown): Promise<never> {
  const request: PlannedFailoverInput = checkInput(input);
  log.info('Planned failover requested', {
    vms: request.vms,
    requestedBy: request.requestedBy,
    reason: request.reason,
  });
  // The per-VM steps (sync, power off, final sync, fail over, power on) need the replication layer first.
  throw ApplicationFailure.create({
    type: FailureTypes.notYetSupported,
    message: `The request for ${request.vms.join(', ')} is valid, but this build cannot run failover steps yet`,
    nonRetryable: true,
  });
}

function checkInput(input: unknown): PlannedFailoverInput {
  const checked = validatePlannedFailoverInput(input);
  if (checked.ok) return checked.value;
  throw ApplicationFailure.create({
    type: FailureTypes.invalidInput,
    message: formatProblems('The plannedFailover input', checked.problems),
    details: [checked.problems],
    nonRetryable: true,
  });
}
