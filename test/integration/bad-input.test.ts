// Every case of the bad-input matrix (test/bad-input-matrix.ts) against a real server and lab: refused with an
// error that names the field and says what is wrong, and nothing changed on the hosts, in the entities or in the
// halted session. Also checks that docs/bad-input.md shows the same table.
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { WorkflowFailedError, WorkflowUpdateFailedError, type WorkflowHandle } from '@temporalio/client';
import { ApplicationFailure } from '@temporalio/common';
import { EstateError, parseEstate } from '../../lab/estate';
import { replicaNameOf } from '../../src/activities/inventory';
import { startReplicationJob } from '../../src/client';
import { ConfigurationError, parseConfiguration } from '../../src/config/load';
import {
  FailureTypes,
  haltedSessionUpdates,
  operationSignals,
  operationUpdates,
  PROXY_REGISTRY_WORKFLOW_ID,
  proxyQueries,
  proxySignals,
  replicaWorkflowId,
  sessionQueries,
  TASK_QUEUE,
  WorkflowTypes,
  type OperationName,
  type SignedOperation,
} from '../../src/contract';
import { signRequest } from '../../src/identity/keys';
import { BAD_INPUT_CASES, renderBadInputTable, type Send, type Signing } from '../bad-input-matrix';
import { entityState, haltedSession } from '../failover-helpers';
import { operatorEnv, startOrchestrator, testConfiguration, within, type TestOrchestrator } from '../harness';
import { testKey } from '../keys';
import { DR, estateOf, MiB, PROD } from '../lab/helpers';
import { runScript } from '../processes';
import { rawRequest } from '../tls';

/** A refused request is bad input, or a requester without the role. */
const REFUSED_TYPES: readonly string[] = [
  FailureTypes.invalidInput,
  FailureTypes.accessDenied,
  FailureTypes.requestNotVerified,
];
const DISKS = [{ id: 'os', size: 2 * MiB }];
const VMS = ['vm1', 'vm2'];
/** Halted in its critical window for the decision cases. */
const HALTED = 'vm1';
/** Ready, for the operation cases. */
const READY = 'vm2';

/** What a refusal said: the error text and, where the entry point has one, the field it names on its own. */
interface Refusal {
  message: string;
  field?: string;
}

/** A file's parse refused with its own error class. */
function refusedFile(parse: () => unknown, refusal: new (...args: never[]) => Error): Refusal {
  try {
    parse();
  } catch (err) {
    assert.ok(err instanceof refusal, String(err));
    return { message: err.message };
  }
  return assert.fail('the file was accepted');
}

describe('the bad-input matrix: every entry point refuses, naming the field, and changes nothing', () => {
  let o: TestOrchestrator;
  let halted: WorkflowHandle;

  before(async () => {
    o = await startOrchestrator({
      // The guest shutdown lasts long enough for the test to see the session at PoweringOffSource and set its fault.
      estate: estateOf(VMS, DISKS, { writeRate: 0, shutdownMs: 2000, bootMs: 100 }),
      configure: (url) =>
        testConfiguration(url, { jobs: VMS.map((vm) => ({ name: `job-${vm}`, vms: [vm], targetHost: DR })) }),
    });
    for (const vm of VMS)
      await (await startReplicationJob(o.client, { job: `job-${vm}`, requestedBy: 'alice' })).result();
    ({ session: halted } = await haltedSession(o.client, o.lab, HALTED));
  });
  after(() => o?.close());

  /** What the bad inputs must leave alone: the VMs and replicas on the hosts, the entities, the halted session. */
  async function snapshot(): Promise<unknown> {
    const hosts = await Promise.all(
      VMS.map(async (vm) => {
        const { lastStop: _, ...source } = await o.lab.port.getVm({ host: PROD, vm });
        const replica = await o.lab.port.getReplica({ host: DR, replica: replicaNameOf(vm) });
        const referencePoints = await o.lab.port.listReferencePoints({ host: PROD, vm });
        return { source, replica, referencePoints };
      }),
    );
    // A refused signal is recorded as the last rejection: that is its answer, not a change.
    const entities = await Promise.all(
      VMS.map(async (vm) => {
        const { lastRejection: _, ...view } = await entityState(o.client, vm);
        return view;
      }),
    );
    const session = await halted.query(sessionQueries.progress);
    const { lastRejection: _, ...proxies } = await registry().query(proxyQueries.slots);
    const faults = (await rawRequest(`${o.lab.lab.url}/v1/lab/faults`)).json();
    return { hosts, entities, session, proxies, faults };
  }

  const registry = () => o.client.workflow.getHandle(PROXY_REGISTRY_WORKFLOW_ID);

  const failureOf = (err: unknown): ApplicationFailure => {
    const cause = err instanceof WorkflowFailedError || err instanceof WorkflowUpdateFailedError ? err.cause : err;
    assert.ok(cause instanceof ApplicationFailure, `expected an ApplicationFailure, got ${String(err)}`);
    assert.equal(cause.nonRetryable, true, 'a refusal is not retryable');
    return cause;
  };

  /**
   * The client a case sends with, and what it sends: signed as it leaves by default; unsigned; or signed by the
   * test as its requester did some minutes ago.
   */
  function asSigned(send: Send & Signing, operation: SignedOperation, target: string, request: unknown) {
    if (send.signing === undefined) return { client: o.client, request };
    if (send.signing === 'unsigned') return { client: o.unsignedClient, request };
    const r = request as Record<string, unknown>;
    const at = new Date(Date.now() - send.signing.minutesAgo * 60_000);
    return { client: o.unsignedClient, request: signRequest(operation, target, r, testKey(String(r.requestedBy)), at) };
  }

  async function refusalOf(send: Send): Promise<Refusal> {
    switch (send.kind) {
      case 'start': {
        const { client, request } = asSigned(send, send.workflow, send.workflow, send.input);
        const handle = await client.workflow.start(WorkflowTypes[send.workflow], {
          taskQueue: TASK_QUEUE,
          workflowId: `bad-input-${randomUUID()}`,
          args: [request],
        });
        const failure = failureOf(
          await handle.result().then(
            () => assert.fail('the workflow completed'),
            (e: unknown) => e,
          ),
        );
        assert.ok(REFUSED_TYPES.includes(failure.type ?? ''), `failure type ${failure.type}`);
        // Refused before anything was started: no session, no copy, no power operation.
        const events = (await handle.fetchHistory()).events ?? [];
        assert.ok(!events.some((e) => e.startChildWorkflowExecutionInitiatedEventAttributes), 'no session was started');
        return { message: failure.message };
      }
      case 'update': {
        const entity = o.client.workflow.getHandle(replicaWorkflowId(READY));
        const before = (await entity.fetchHistory()).events?.length;
        const update = operationUpdates[send.operation as OperationName];
        const failure = failureOf(
          await entity.executeUpdate(update, { args: [send.payload as never] }).then(
            () => assert.fail('the update was accepted'),
            (e: unknown) => e,
          ),
        );
        assert.equal(failure.type, FailureTypes.invalidInput);
        // Refused by the update's validator: not even written to the entity's history.
        assert.equal((await entity.fetchHistory()).events?.length, before, 'the history did not grow');
        return { message: failure.message };
      }
      case 'signal': {
        const entity = o.client.workflow.getHandle(replicaWorkflowId(READY));
        await entity.signal(operationSignals[send.operation as OperationName], send.payload);
        // Each signal case sends another operation: the newest rejection of this one is this case's.
        const rejection = await within('the refused signal to be recorded', 30_000, async () => {
          const last = (await entityState(o.client, READY)).lastRejection;
          return last?.operation === send.operation ? last : undefined;
        });
        return { message: rejection.reason };
      }
      case 'proxySignal': {
        const before = JSON.stringify((await registry().query(proxyQueries.slots)).lastRejection);
        const { client, request } = asSigned(send, 'setProxyOnline', PROXY_REGISTRY_WORKFLOW_ID, send.payload);
        await client.workflow
          .getHandle(PROXY_REGISTRY_WORKFLOW_ID)
          .signal(proxySignals.setProxyOnline, request as never);
        const rejection = await within('the refused signal to be recorded', 30_000, async () => {
          const last = (await registry().query(proxyQueries.slots)).lastRejection;
          return last && JSON.stringify(last) !== before ? last : undefined;
        });
        return { message: rejection.reason };
      }
      case 'decision': {
        const { client, request } = asSigned(send, send.decision, halted.workflowId, send.payload);
        const session = client.workflow.getHandle(halted.workflowId);
        const failure = failureOf(
          await session.executeUpdate(haltedSessionUpdates[send.decision], { args: [request as never] }).then(
            () => assert.fail('the decision was taken'),
            (e: unknown) => e,
          ),
        );
        assert.ok(REFUSED_TYPES.includes(failure.type ?? ''), `failure type ${failure.type}`);
        return { message: failure.message };
      }
      case 'cli': {
        const env = operatorEnv(o.namespace);
        const run = await runScript('src/cli/main.ts', send.args, env);
        assert.equal(run.code, 2, `exit code 2 for a refused request: ${run.stderr}`);
        return { message: run.stderr };
      }
      case 'http': {
        const res = await rawRequest(`${o.lab.lab.url}${send.path}`, {
          method: send.method,
          ...(send.body !== undefined ? { body: send.body } : {}),
          headers: send.contentType ? { 'content-type': send.contentType } : {},
        });
        assert.ok(res.status >= 400 && res.status < 500, `a 4xx status, got ${res.status}`);
        const { error } = res.json<{ error: { code: string; message: string; field?: string } }>();
        return { message: error.message, ...(error.field ? { field: error.field } : {}) };
      }
      case 'configuration':
        return refusedFile(() => parseConfiguration(send.yaml, 'matrix.yaml'), ConfigurationError);
      case 'estate':
        return refusedFile(() => parseEstate(send.estate, 'matrix estate'), EstateError);
    }
  }

  it(`refuses each of the ${BAD_INPUT_CASES.length} cases, naming the field, and changes nothing`, async () => {
    assert.ok(BAD_INPUT_CASES.length >= 40);
    const unchanged = await snapshot();
    const wrong: string[] = [];
    for (const [i, c] of BAD_INPUT_CASES.entries()) {
      const label = `#${i + 1} ${c.entry}: ${c.what}`;
      try {
        const refusal = await refusalOf(c.send);
        const named = refusal.field === c.field || refusal.message.includes(c.field);
        if (!named) wrong.push(`${label}: does not name ${c.field}: ${refusal.message.slice(0, 300)}`);
        else if (!refusal.message.includes(c.says))
          wrong.push(`${label}: does not say '${c.says}': ${refusal.message.slice(0, 300)}`);
      } catch (err) {
        wrong.push(`${label}: ${err instanceof Error ? err.message : String(err)}`);
      }
      assert.deepEqual(await snapshot(), unchanged, `${label} changed something`);
    }
    assert.deepEqual(wrong, []);
  });

  it('docs/bad-input.md shows the matrix as the test runs it', () => {
    // Compared cell by cell: Prettier aligns the columns of the Markdown table.
    const rows = (table: string) =>
      table
        .split('\n')
        .filter((line) => /^\|\s*\d+\s*\|/.test(line))
        .map((line) =>
          line
            .split(/(?<!\\)\|/)
            .slice(1, -1)
            .map((cell) => cell.trim()),
        );
    const docs = readFileSync(join(__dirname, '..', '..', 'docs', 'bad-input.md'), 'utf8');
    assert.deepEqual(
      rows(docs),
      rows(renderBadInputTable()),
      'regenerate with: node --import tsx test/bad-input-matrix.ts',
    );
  });

  it('the halted session still takes a good decision afterwards', async () => {
    assert.match(
      await halted.executeUpdate(haltedSessionUpdates.abort, {
        args: [{ requestedBy: 'alice', reason: 'matrix done' }],
      }),
      /aborted/,
    );
    assert.equal((await entityState(o.client, HALTED)).state, 'Ready');
  });
});
