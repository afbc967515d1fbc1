import assert from 'node:assert/strict';
import type { ChildProcessWithoutNullStreams } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { Client, Connection } from '@temporalio/client';
import { replicaNameOf } from '../../src/activities/inventory';
import { startPlannedFailover, startReplicationJob } from '../../src/client';
import { replicaQueries, replicaWorkflowId, type PlannedFailoverResult } from '../../src/contract';
import { kill, startWorkerProcess } from '../processes';
import { createTestNamespace, temporalAddress, testUsers, within } from '../harness';
import { testSigner } from '../keys';
import { kvmPort, testClientTls } from '../tls';
import { lastSeq } from '../../kvm/guest/guest';
import { assertFailedOver, startTestKvmHost, type TestKvmHost } from './helpers';

const PROD = 'kvm-prod1';
const DR = 'kvm-dr1';
const VM = 'pf-crash1';

// The orchestrator's workers in a process of their own, killed with SIGKILL in the critical window of a planned
// failover of a real guest (source off, its final copy in flight, the replica not on yet), then started again:
// the failover must finish by itself, exact, with the replica going on from the source's last write.
describe('a worker SIGKILLed during the final sync of a real VM’s planned failover, then restarted', () => {
  let dir: string;
  let prod: TestKvmHost;
  let dr: TestKvmHost;
  let client: Client;
  let env: Record<string, string>;
  let worker: ChildProcessWithoutNullStreams | undefined;

  before(async () => {
    const bundle = process.env.PF_TEST_WORKFLOW_BUNDLE;
    assert.ok(bundle, 'run through `npm test -- <file>`');
    dir = mkdtempSync(join(tmpdir(), 'pf-kvmcrash-'));
    prod = await startTestKvmHost({ dir: join(dir, 'prod'), name: PROD, domain: VM });
    dr = await startTestKvmHost({ dir: join(dir, 'dr'), name: DR, role: 'dr' });
    const namespace = await createTestNamespace();
    client = new Client({
      connection: await Connection.connect({ address: temporalAddress() }),
      namespace,
      interceptors: { workflow: [testSigner()] },
    });
    env = {
      PF_WORKER_ADDRESS: temporalAddress(),
      PF_WORKER_NAMESPACE: namespace,
      PF_WORKER_CONFIG: JSON.stringify({
        hosts: [
          { name: PROD, role: 'production', adapter: { type: 'kvm', url: prod.host.url } },
          { name: DR, role: 'dr', adapter: { type: 'kvm', url: dr.host.url } },
        ],
        proxies: [{ name: 'proxy-a', slots: 4 }],
        jobs: [{ name: 'kvm', vms: [VM], targetHost: DR }],
        users: testUsers(),
        tls: testClientTls(),
      }),
      PF_WORKER_BUNDLE: bundle,
    };
    worker = await startWorkerProcess(env);
  });

  after(async () => {
    if (worker) await kill(worker);
    await client?.connection.close();
    await prod?.stop();
    await dr?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  test(
    'the failover finishes after the restart, exact, and the replica resumes at the source’s last write',
    { timeout: 300_000 },
    async () => {
      const source = kvmPort(prod.host.url, PROD);
      try {
        await source.powerOn({ host: PROD, vm: VM });
      } finally {
        source.close();
      }
      await prod.seqAtLeast(5);
      const seed = await (await startReplicationJob(client, { job: 'kvm', requestedBy: 'alice' })).result();
      assert.equal(seed.sessions[0]!.outcome, 'replicated', seed.sessions[0]!.detail);
      await prod.seqAtLeast((lastSeq(await prod.guestLines()) ?? 0) + 3);

      const handle = await startPlannedFailover(client, {
        vms: [VM],
        requestedBy: 'alice',
        reason: `crash ${randomUUID()}`,
      });
      // The source is off and its last blocks are being copied: the worker dies there.
      const step = await within('the session in its critical window', 120_000, async () => {
        for await (const wf of client.workflow.list({
          query: `FailoverVm="${VM}" AND FailoverStep IN ("FinalSync", "Verifying") AND ExecutionStatus="Running"`,
        }))
          return String(wf.searchAttributes.FailoverStep?.[0]);
        return undefined;
      });
      await kill(worker!);
      worker = undefined;
      worker = await startWorkerProcess(env);

      const result: PlannedFailoverResult = await handle.result();
      const s = result.sessions[0]!;
      assert.equal(s.halts.length, 0, `killed at ${step}; no operator was needed: ${JSON.stringify(s.halts)}`);
      await assertFailedOver(s, {
        prod,
        replicaDir: join(dir, 'dr', 'state', 'replicas', replicaNameOf(VM)),
        consoleSince: 0,
      });
      const state = await client.workflow.getHandle(replicaWorkflowId(VM)).query(replicaQueries.state);
      assert.equal(state.state, 'Failover');
    },
  );
});
