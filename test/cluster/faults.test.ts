// The Temporal cluster's own faults in the critical window of a planned failover (source off, replica not yet on):
// the whole server killed with SIGKILL, then only its history service, each down for a while and started again.
// The failover must complete by itself, verified, and its downtime must include the outage.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { setTimeout as delay } from 'node:timers/promises';
import { WorkflowFailedError, type WorkflowHandle } from '@temporalio/client';
import { replicaNameOf } from '../../src/activities/inventory';
import { startReplicationJob } from '../../src/client';
import type { PlannedFailoverResult } from '../../src/contract';
import {
  entityState,
  powerOf,
  replicaImage,
  sameImages,
  sourceImage,
  startFailover,
  type Disk,
} from '../failover-helpers';
import { startOrchestrator, testConfiguration, within, type TestOrchestrator } from '../harness';
import { DR, estateOf, MiB } from '../lab/helpers';
import { startTestCluster, type TestCluster } from './helpers';

const DISKS: Disk[] = [
  { id: 'os', size: 4 * MiB },
  { id: 'data', size: 2 * MiB },
];
const OUTAGE_MS = 10_000;

/** The result of a workflow whose server goes away meanwhile: the client's long poll fails while it is down. */
async function resultThroughOutage(handle: WorkflowHandle, ms = 180_000): Promise<PlannedFailoverResult> {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      return (await handle.result()) as PlannedFailoverResult;
    } catch (err) {
      if (err instanceof WorkflowFailedError || Date.now() > deadline) throw err;
      await delay(1_000);
    }
  }
}

for (const scenario of [
  { what: 'the whole Temporal server (one process)', split: false, kill: ['server'] as const },
  { what: 'only the history service (a process of its own)', split: true, kill: ['history'] as const },
]) {
  describe(`a planned failover survives ${scenario.what} killed in its critical window`, () => {
    const vm = scenario.split ? 'cf-history' : 'cf-server';
    let cluster: TestCluster;
    let o: TestOrchestrator;

    before(async () => {
      cluster = await startTestCluster({ split: scenario.split });
      o = await startOrchestrator({
        server: cluster.address,
        estate: estateOf([vm], DISKS, { writeRate: 30, hotSetFraction: 0.2, shutdownMs: 200, bootMs: 200 }),
        configure: (url) => testConfiguration(url, { jobs: [{ name: `job-${vm}`, vms: [vm], targetHost: DR }] }),
      });
      const run = await (await startReplicationJob(o.client, { job: `job-${vm}`, requestedBy: 'alice' })).result();
      assert.equal(run.sessions[0]!.outcome, 'replicated', run.sessions[0]!.detail);
    });

    after(async () => {
      await o?.close();
      await cluster?.remove();
    });

    it('completes by itself once the server is back, verified, with the outage in its downtime', async (t) => {
      // The final copy into the replica is slowed, so that the window stays open for the kill.
      await o.lab.control.setFault(DR, {
        kind: 'slow',
        latencyMs: 1_500,
        path: `^/v1/hosts/${DR}/replicas/${replicaNameOf(vm)}/points/[^/]*-helper2/disks/[^/]+/write$`,
      });
      const handle = await startFailover(o.client, { vms: [vm], reason: 'server faults', requestedBy: 'alice' });
      await within(`${vm} to be powered off`, 60_000, async () =>
        (await powerOf(o.lab, vm)) === 'Off' ? true : undefined,
      );
      const killed = cluster.servers.filter((s) => (scenario.kill as readonly string[]).includes(s.name));
      assert.equal(killed.length, scenario.kill.length);
      for (const server of killed) server.group.signal('SIGKILL');
      await Promise.all(killed.map((server) => server.group.exited));
      const replicaAtKill = await o.lab.port.getVm({ host: DR, vm: replicaNameOf(vm) }).catch(() => undefined);
      assert.notEqual(replicaAtKill?.powerState, 'Running', 'the kill came inside the critical window');
      await delay(OUTAGE_MS);
      for (const server of killed) await cluster.restartServer(server.name);
      await o.lab.control.clearFaults(DR);

      const session = (await resultThroughOutage(handle)).sessions[0]!;
      assert.equal(session.outcome, 'failedOver', session.detail);
      assert.deepEqual(session.halts, [], 'it rode through without an operator');
      assert.equal(session.verification?.identical, true);
      assert.equal(session.fullVerification?.identical, true);
      assert.ok(
        session.downtime!.totalMs >= OUTAGE_MS,
        `the downtime (${session.downtime!.totalMs} ms) includes the ${OUTAGE_MS} ms outage`,
      );
      const { totalMs, finalSyncMs, orchestrationMs } = session.downtime!;
      t.diagnostic(
        `downtime ${(totalMs / 1000).toFixed(1)} s with a ${OUTAGE_MS / 1000} s outage (final sync ` +
          `${(finalSyncMs / 1000).toFixed(1)} s, orchestration ${(orchestrationMs / 1000).toFixed(1)} s)`,
      );
      assert.equal(await powerOf(o.lab, vm), 'Off', 'the source stays off');
      assert.ok(
        sameImages(
          await replicaImage(o.lab, vm, DISKS, { pointId: session.helperPoints[1]! }),
          await sourceImage(o.lab, vm, DISKS),
        ),
        'the replica holds what the source held at power-off',
      );
      assert.equal((await entityState(o.client, vm)).state, 'Failover');
    });
  });
}
