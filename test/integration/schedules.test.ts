import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { randomUUID } from 'node:crypto';
import { SearchAttributes, TASK_QUEUE, WorkflowTypes, type ReplicationJobResult } from '../../src/contract';
import { jobScheduleId, syncJobSchedules } from '../../src/schedules';
import { startOrchestrator, testConfiguration, type TestOrchestrator } from '../harness';
import { DR, smallEstate } from '../lab/helpers';

describe('job schedules are Temporal Schedules kept in step with the configuration', () => {
  let o: TestOrchestrator;
  const configure = (url: string, every?: string) =>
    testConfiguration(url, {
      jobs: [{ name: 'nightly', vms: ['vm1'], targetHost: DR, ...(every ? { schedule: { every } } : {}) }],
    });

  before(async () => {
    o = await startOrchestrator({ estate: smallEstate({ writeRate: 0 }), configure: (url) => configure(url, '1h') });
  });
  after(() => o?.close());

  it('creates, runs, updates and deletes the schedule as the configuration says', async () => {
    assert.deepEqual(await syncJobSchedules(o.client, o.config), {
      created: [jobScheduleId('nightly')],
      updated: [],
      deleted: [],
    });
    const handle = o.client.schedule.getHandle(jobScheduleId('nightly'));
    const described = await handle.describe();
    assert.equal(described.spec.intervals?.[0]?.every, 3_600_000);
    assert.equal(described.action.type, 'startWorkflow');

    // A run on demand through the schedule: a real job run, recorded as the scheduler's.
    await handle.trigger();
    let runId: string | undefined;
    for (let i = 0; i < 100 && !runId; i++) {
      runId = (await handle.describe()).info.recentActions[0]?.action.workflow.workflowId;
      if (!runId) await new Promise((r) => setTimeout(r, 100));
    }
    assert.ok(runId, 'the schedule started a run');
    const run = o.client.workflow.getHandle(runId);
    const result = (await run.result()) as ReplicationJobResult;
    assert.equal(result.sessions[0]!.outcome, 'replicated');
    // Verified as the service identity, by its key: the schedule's request is signed once, and the run is the
    // schedule's own (the schedule lists it).
    assert.equal((await run.describe()).typedSearchAttributes.get(SearchAttributes.FailoverRequestedBy), 'scheduler');
    assert.equal(result.requester?.user, 'scheduler');
    assert.match(result.requester?.keyId ?? '', /^SHA256:/);

    // The same signed request, started by anyone but the schedule, is refused: it cannot be replayed.
    const input: unknown = described.action.type === 'startWorkflow' ? described.action.args?.[0] : undefined;
    assert.ok(input && typeof input === 'object' && 'signature' in input, 'the schedule carries a signed request');
    const replay = await o.unsignedClient.workflow.start(WorkflowTypes.replicationJob, {
      taskQueue: TASK_QUEUE,
      workflowId: `job/nightly/replay-${randomUUID()}`,
      args: [input],
    });
    await assert.rejects(replay.result(), (err: Error & { cause?: Error }) => {
      assert.match(
        err.cause?.message ?? '',
        /was not started by schedule job-schedule\/nightly: a scheduled run cannot be replayed/,
      );
      return true;
    });

    const url = o.config.hosts[0]!.adapter.url;
    assert.deepEqual(await syncJobSchedules(o.client, configure(url, '30m')), {
      created: [],
      updated: [jobScheduleId('nightly')],
      deleted: [],
    });
    assert.equal((await handle.describe()).spec.intervals?.[0]?.every, 1_800_000);
    // A worker started with an older configuration creates what is missing only: it neither undoes the newer
    // schedule nor deletes it.
    assert.deepEqual(await syncJobSchedules(o.client, configure(url, '1h'), 'createOnly'), {
      created: [],
      updated: [],
      deleted: [],
    });
    assert.deepEqual(await syncJobSchedules(o.client, configure(url), 'createOnly'), {
      created: [],
      updated: [],
      deleted: [],
    });
    assert.equal((await handle.describe()).spec.intervals?.[0]?.every, 1_800_000, 'still the newer schedule');
    assert.deepEqual(await syncJobSchedules(o.client, configure(url)), {
      created: [],
      updated: [],
      deleted: [jobScheduleId('nightly')],
    });
    await assert.rejects(handle.describe());
  });
});
