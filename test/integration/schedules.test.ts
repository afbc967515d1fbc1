import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { jobScheduleId, SCHEDULER_USER, syncJobSchedules } from '../../src/schedules';
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
    const result = (await o.client.workflow.getHandle(runId).result()) as { sessions: { outcome: string }[] };
    assert.equal(result.sessions[0]!.outcome, 'replicated');
    const history = await o.client.workflow.getHandle(runId).fetchHistory();
    assert.match(JSON.stringify(history.events?.[0]), new RegExp(SCHEDULER_USER));

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
