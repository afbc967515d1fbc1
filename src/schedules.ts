import {
  ScheduleNotFoundError,
  ScheduleOverlapPolicy,
  type Client,
  type ScheduleOptionsAction,
} from '@temporalio/client';
import { SCHEDULER_USER, type Configuration, type JobConfig } from './config/schema';
import { TASK_QUEUE, WorkflowTypes, type ReplicationJobInput } from './contract';

/** Schedules of replication jobs have ids of their own prefix, so a sync knows which ones it owns. */
export const jobScheduleId = (job: string): string => `job-schedule/${job}`;
const PREFIX = 'job-schedule/';

export { SCHEDULER_USER };

function action(job: JobConfig): ScheduleOptionsAction {
  const input: ReplicationJobInput = {
    job: job.name,
    requestedBy: SCHEDULER_USER,
    reason: `scheduled run every ${job.schedule!.every}`,
  };
  return {
    type: 'startWorkflow',
    workflowType: WorkflowTypes.replicationJob,
    taskQueue: TASK_QUEUE,
    workflowId: `job/${job.name}/scheduled`,
    args: [input],
    staticSummary: `Scheduled run of replication job ${job.name}`,
  };
}

export interface ScheduleSync {
  created: string[];
  updated: string[];
  deleted: string[];
}

/**
 * Makes the Temporal Schedules of replication jobs match the configuration: one per job with a schedule,
 * none for the others. A run still going when the next is due is skipped, not stacked. `createOnly` (what a
 * worker does at start-up) only creates the missing ones: a worker started with an older configuration must
 * neither undo newer schedules nor delete them; making them match is the operator's `failover schedules`.
 */
export async function syncJobSchedules(
  client: Client,
  config: Configuration,
  mode: 'match' | 'createOnly' = 'match',
): Promise<ScheduleSync> {
  const wanted = new Map(config.jobs.filter((j) => j.schedule).map((j) => [jobScheduleId(j.name), j]));
  const existing = new Set<string>();
  for await (const s of client.schedule.list()) if (s.scheduleId.startsWith(PREFIX)) existing.add(s.scheduleId);
  const result: ScheduleSync = { created: [], updated: [], deleted: [] };
  for (const [scheduleId, job] of wanted) {
    const spec = { intervals: [{ every: job.schedule!.every }] };
    const policies = { overlap: ScheduleOverlapPolicy.SKIP, catchupWindow: '1 minute' };
    if (existing.has(scheduleId)) {
      if (mode === 'createOnly') continue;
      await client.schedule
        .getHandle(scheduleId)
        .update((previous) => ({ ...previous, spec, action: action(job), policies }));
      result.updated.push(scheduleId);
    } else {
      await client.schedule.create({ scheduleId, spec, action: action(job), policies });
      result.created.push(scheduleId);
    }
  }
  for (const scheduleId of existing) {
    if (wanted.has(scheduleId) || mode === 'createOnly') continue;
    await client.schedule
      .getHandle(scheduleId)
      .delete()
      .catch((err: unknown) => {
        if (!(err instanceof ScheduleNotFoundError)) throw err;
      });
    result.deleted.push(scheduleId);
  }
  return result;
}
