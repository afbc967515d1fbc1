import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import { WorkflowFailedError, type Client } from '@temporalio/client';
import { ApplicationFailure } from '@temporalio/common';
import { FailureTypes, TASK_QUEUE, WorkflowTypes } from '../../src/contract';
import { startOrchestrator, temporal, testConfiguration, type TestOrchestrator } from '../harness';
import { smallEstate } from '../lab/helpers';

describe('plannedFailover refuses bad input at once, against a real server', () => {
  const taskQueue = TASK_QUEUE;
  let orchestrator: TestOrchestrator;
  let client: Client;

  before(async () => {
    orchestrator = await startOrchestrator({ estate: smallEstate(), configure: (url) => testConfiguration(url, {}) });
    client = orchestrator.client;
  });

  after(() => orchestrator.close());

  async function failureOf(input: unknown): Promise<ApplicationFailure> {
    const err = await client.workflow
      .execute(WorkflowTypes.plannedFailover, { taskQueue, workflowId: `pf-${randomUUID()}`, args: [input] })
      .then(
        () => assert.fail('the workflow should have failed'),
        (e: unknown) => e,
      );
    assert.ok(err instanceof WorkflowFailedError, `expected WorkflowFailedError, got ${String(err)}`);
    assert.ok(err.cause instanceof ApplicationFailure);
    return err.cause;
  }

  it('fails non-retryably, naming every problem, in one workflow task', async () => {
    const workflowId = `pf-${randomUUID()}`;
    const handle = await client.workflow.start(WorkflowTypes.plannedFailover, {
      taskQueue,
      workflowId,
      args: [{ vms: ['sql01', 'sql01'], requestedBy: '' }],
    });
    const err: unknown = await handle.result().then(
      () => undefined,
      (e: unknown) => e,
    );
    assert.ok(err instanceof WorkflowFailedError && err.cause instanceof ApplicationFailure);
    const failure = err.cause;
    assert.equal(failure.type, FailureTypes.invalidInput);
    assert.equal(failure.nonRetryable, true);
    assert.match(failure.message, /vms\[1\]: 'sql01' is already named at vms\[0\]/);
    assert.match(failure.message, /reason: is required/);
    assert.match(failure.message, /requestedBy: must not be empty/);
    assert.deepEqual(failure.details?.[0], [
      { path: 'reason', message: 'is required' },
      { path: 'requestedBy', message: 'must not be empty' },
      { path: 'vms[1]', message: "'sql01' is already named at vms[0]" },
    ]);
    // Failing at once: no activity, timer or child was scheduled, and the first workflow task ended it.
    const history = await handle.fetchHistory();
    const types = (history.events ?? []).map((e) => e.eventType);
    assert.equal(types.length, 5, `unexpected history: ${types.join(', ')}`);
  });

  it('refuses unknown options and wrong types', async () => {
    const failure = await failureOf({ vms: 'sql01', reason: 'r', requestedBy: 'a', options: { fast: true } });
    assert.equal(failure.type, FailureTypes.invalidInput);
    assert.match(failure.message, /vms: must be a list of VM names/);
    assert.match(failure.message, /options\.fast: is not a known field/);
  });

  it('checks a well-formed request against the site before touching anything', async () => {
    const failure = await failureOf({ vms: ['sql01'], reason: 'maintenance', requestedBy: 'alice' });
    assert.equal(failure.type, FailureTypes.invalidInput);
    assert.equal(failure.nonRetryable, true);
    assert.match(failure.message, /vms\[0\]: 'sql01' is in no replication job/);
  });

  it('ends a start from the Temporal CLI with {"vms":[]} in a failed workflow naming the problem', async () => {
    const workflowId = `pf-cli-${randomUUID()}`;
    const ns = orchestrator.namespace;
    await temporal(
      ns,
      'workflow',
      'start',
      '--task-queue',
      taskQueue,
      '--type',
      'plannedFailover',
      '--workflow-id',
      workflowId,
      '--input',
      '{"vms":[]}',
    );
    const result = await temporal(ns, 'workflow', 'result', '--workflow-id', workflowId, '--output', 'json').then(
      () => assert.fail('temporal workflow result should exit non-zero for a failed workflow'),
      (e: { stdout: string; stderr: string }) => e.stdout + e.stderr,
    );
    assert.match(result, /vms: must name at least one VM/);
    const described = await temporal(ns, 'workflow', 'describe', '--workflow-id', workflowId, '--output', 'json');
    assert.match(described.stdout, /WORKFLOW_EXECUTION_STATUS_FAILED/);
  });
});
