// The gauges the orchestration worker samples, without a server: what they count, that a failed sample (the server
// away) neither stops them nor changes the values, and that a stop ends them.
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, it } from 'node:test';
import type { Client } from '@temporalio/client';
import type { MetricMeter } from '@temporalio/common';
import { MetricNames } from '../../src/contract';
import { HALTED_SESSIONS_QUERY, publishHaltedSessions, publishProxySlots } from '../../src/metrics';

describe('the halted-sessions gauge', () => {
  it('counts the halted sessions in visibility, goes on after a failed count, and stops', async () => {
    const answers: (number | Error)[] = [2, new Error('server unavailable'), 1, 0];
    const queries: string[] = [];
    const client = {
      options: { namespace: 'dr' },
      workflow: {
        async count(query: string) {
          queries.push(query);
          const answer = answers.shift() ?? 0;
          if (answer instanceof Error) throw answer;
          return { count: answer };
        },
      },
    } as unknown as Client;
    const set: number[] = [];
    const created: { name: string; tags: object }[] = [];
    const meter = {
      withTags: (tags: object) => ({
        createGauge: (name: string) => {
          created.push({ name, tags });
          return { set: (value: number) => set.push(value) };
        },
      }),
    } as unknown as MetricMeter;

    const stop = publishHaltedSessions(client, meter, 5);
    for (let waited = 0; answers.length > 0 && waited < 2_000; waited += 5) await sleep(5);
    assert.deepEqual(answers, [], 'stopped counting after the failed count');
    await sleep(20);
    stop();
    const counted = queries.length;
    await sleep(30);

    assert.deepEqual(created, [{ name: MetricNames.sessionsHalted, tags: { namespace: 'dr' } }]);
    assert.match(HALTED_SESSIONS_QUERY, /WorkflowType="plannedFailoverSession"/);
    assert.match(HALTED_SESSIONS_QUERY, /ExecutionStatus="Running"/);
    assert.match(HALTED_SESSIONS_QUERY, /FailoverStep="Halted"/);
    assert.ok(queries.every((q) => q === HALTED_SESSIONS_QUERY));
    assert.deepEqual(set.slice(0, 3), [2, 1, 0], 'the failed count set nothing');
    assert.ok(set.slice(3).every((v) => v === 0));
    assert.equal(queries.length, counted, 'counted again after the stop');
  });

  it('proxy slots: leased, offered and waited for as the registry answers, whichever worker runs it (m14)', async () => {
    const view = (leased: number, online: boolean, waiting: number) => ({
      proxies: [
        {
          name: 'proxy01',
          slots: 2,
          enabled: true,
          online,
          leasedTo: Array.from({ length: leased }, (_, i) => `s${i}`),
        },
        { name: 'proxy02', slots: 4, enabled: false, online: true, leasedTo: [] },
      ],
      waiting: waiting > 0 ? [{ sessionId: 'w', slots: waiting }] : [],
      lastRejection: null,
    });
    const answers: (ReturnType<typeof view> | Error)[] = [
      view(1, true, 0),
      new Error('no registry yet'),
      view(2, false, 3),
    ];
    const queried: string[] = [];
    const client = {
      options: { namespace: 'dr' },
      workflow: {
        getHandle: (id: string) => ({
          async query() {
            queried.push(id);
            const answer = answers.shift() ?? view(0, true, 0);
            if (answer instanceof Error) throw answer;
            return answer;
          },
        }),
      },
    } as unknown as Client;
    const set: string[] = [];
    const meter = {
      withTags: () => ({
        createGauge: (name: string) => ({
          set: (value: number, tags?: { proxy?: string }) =>
            set.push(`${name}${tags?.proxy ? `/${tags.proxy}` : ''}=${value}`),
        }),
      }),
    } as unknown as MetricMeter;
    const stop = publishProxySlots(client, meter, 5);
    for (let waited = 0; answers.length > 0 && waited < 2_000; waited += 5) await sleep(5);
    stop();
    assert.ok(queried.every((id) => id === 'proxy-slots'));
    assert.deepEqual(set.slice(0, 10), [
      `${MetricNames.slotsInUse}/proxy01=1`,
      `${MetricNames.slotsCapacity}/proxy01=2`,
      `${MetricNames.slotsInUse}/proxy02=0`,
      `${MetricNames.slotsCapacity}/proxy02=0`,
      `${MetricNames.slotsWaiting}=0`,
      // The failed query set nothing; then proxy01 offline with both its slots still leased, 3 slots waited for.
      `${MetricNames.slotsInUse}/proxy01=2`,
      `${MetricNames.slotsCapacity}/proxy01=0`,
      `${MetricNames.slotsInUse}/proxy02=0`,
      `${MetricNames.slotsCapacity}/proxy02=0`,
      `${MetricNames.slotsWaiting}=3`,
    ]);
  });
});
