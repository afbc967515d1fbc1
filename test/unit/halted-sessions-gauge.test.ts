// The halted-sessions gauge without a server: what it counts, that a failed count (the server away) neither stops
// it nor changes the value, and that a stop ends it.
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, it } from 'node:test';
import type { Client } from '@temporalio/client';
import type { MetricMeter } from '@temporalio/common';
import { MetricNames } from '../../src/contract';
import { HALTED_SESSIONS_QUERY, publishHaltedSessions } from '../../src/metrics';

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
});
