import {
  ScheduleNotFoundError,
  ScheduleOverlapPolicy,
  type Client,
  type ScheduleOptionsAction,
} from '@temporalio/client';
import type { KeyObject } from 'node:crypto';
import type { Configuration, JobConfig } from './config/schema';
import { requestTarget, TASK_QUEUE, WorkflowTypes, type ReplicationJobInput } from './contract';
import { durationMs } from './domain/units';
import { loadUserKey, publicKeyLine, signRequest } from './identity/keys';

/** Schedules of replication jobs have ids of their own prefix, so a sync knows which ones it owns. */
export const jobScheduleId = (job: string): string => `job-schedule/${job}`;
const PREFIX = 'job-schedule/';

/** A configured schedule's interval (`15m`, `1h`, ...) in milliseconds. */
export const scheduleEvery = (every: string): number => durationMs(every);

/**
 * A job's scheduled run, requested by the configuration's service identity and signed with its key once for the
 * schedule: every run carries the same request, and proves it is the schedule's own by the schedule listing it.
 */
function action(job: JobConfig, service: { user: string; key: KeyObject | null }): ScheduleOptionsAction {
  const request: ReplicationJobInput = {
    job: job.name,
    requestedBy: service.user,
    reason: `scheduled run every ${job.schedule!.every}`,
    schedule: jobScheduleId(job.name),
  };
  const operation = WorkflowTypes.replicationJob;
  const input = service.key ? signRequest(operation, requestTarget(operation), request, service.key) : request;
  return {
    type: 'startWorkflow',
    workflowType: WorkflowTypes.replicationJob,
    taskQueue: TASK_QUEUE,
    workflowId: `job/${job.name}/scheduled`,
    args: [input],
    staticSummary: `Scheduled run of replication job ${job.name}, requested by ${service.user}`,
  };
}

/** The service identity's private key, refused unless the configuration lists its public half for the service. */
function serviceKey(config: Configuration, file: string): KeyObject {
  const key = loadUserKey(file);
  const user = config.scheduledRuns!.requestedBy;
  if (!config.users.find((u) => u.name === user)?.keys.includes(publicKeyLine(key)))
    throw new Error(
      `${file} is not a key of '${user}': the configuration does not list its public key ${publicKeyLine(key)}`,
    );
  return key;
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
  const runs = config.scheduledRuns;
  const service = runs ? { user: runs.requestedBy, key: runs.key ? serviceKey(config, runs.key) : null } : null;
  for (const [scheduleId, job] of wanted) {
    const spec = { intervals: [{ every: job.schedule!.every }] };
    const policies = { overlap: ScheduleOverlapPolicy.SKIP, catchupWindow: '1 minute' };
    if (existing.has(scheduleId)) {
      if (mode === 'createOnly') continue;
      await client.schedule
        .getHandle(scheduleId)
        .update((previous) => ({ ...previous, spec, action: action(job, service!), policies }));
      result.updated.push(scheduleId);
    } else {
      await client.schedule.create({ scheduleId, spec, action: action(job, service!), policies });
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
