import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { GUEST_BLOCK_SIZE, parseCanary, waitForGuest } from '../../kvm/guest/guest';
import { replicaNameOf } from '../../src/activities/inventory';
import { connectHypervisor } from '../../src/config/hypervisor';
import { TASK_QUEUE, WorkflowTypes, type ReplicationJobResult } from '../../src/contract';
import { BLOCK_SIZE, type HypervisorPort } from '../../src/hypervisor/port';
import { startOrchestrator, testConfiguration, type TestOrchestrator } from '../harness';
import { GUEST_DISK_BYTES, lastSeq, startTestKvmHost, type TestKvmHost } from './helpers';

const KVM_HOST = 'kvm-prod1';
const DR = 'dr-a';
const VM = 'pf-src2';

// The orchestrator's replication jobs, unchanged, with a real guest on a KVM host as the source: one estate whose
// production host is our host process over libvirt and whose DR host is the lab, each reached at its own URL.
describe('replication of a real guest on a KVM host into a DR host of the lab', () => {
  let dir: string;
  let kvm: TestKvmHost;
  let o: TestOrchestrator;
  let port: HypervisorPort & { close(): void };
  const vm = { host: KVM_HOST, vm: VM };
  const replica = { host: DR, replica: replicaNameOf(VM) };

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'pf-kvmrepl-'));
    kvm = await startTestKvmHost({ dir, name: KVM_HOST, domain: VM });
    o = await startOrchestrator({
      estate: { sites: [{ name: 'dr', role: 'dr', hosts: [{ name: DR }] }] },
      configure: (labUrl) =>
        testConfiguration(labUrl, {
          hosts: [
            { name: KVM_HOST, role: 'production', adapter: { type: 'kvm', url: kvm.host.url } },
            { name: DR, role: 'dr', adapter: { type: 'lab', url: labUrl } },
          ],
          jobs: [{ name: 'kvm', vms: [VM], targetHost: DR }],
        }),
      connect: (config) => (port = connectHypervisor(config)),
    });
  });

  after(async () => {
    await o?.close();
    port?.close();
    await kvm?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  const runJob = (): Promise<ReplicationJobResult> =>
    o.client.workflow.execute(WorkflowTypes.replicationJob, {
      taskQueue: TASK_QUEUE,
      workflowId: `job/kvm/${randomUUID()}`,
      args: [{ job: 'kvm', requestedBy: 'alice' }],
    });
  const boot = async () => {
    const since = (await kvm.guestLines()).length;
    await port.powerOn(vm);
    await kvm.readyAfter(since);
    await kvm.seqAtLeast((lastSeq(await kvm.guestLines()) ?? 0) + 5);
  };
  /** ACPI shutdown; returns the sequence number the guest said it stopped at. */
  const shutdown = async () => {
    assert.equal((await port.shutdownGuest(vm, 60_000)).outcome, 'off');
    const clean = await waitForGuest(
      kvm.serialLog,
      (lines) => lines.filter((l) => l.kind === 'clean-shutdown').at(-1),
      {
        timeoutMs: 5_000,
      },
    );
    return clean.seq;
  };
  /** The replica's head against the powered-off source, block by block, through a checkpoint of the test's own. */
  async function assertReplicaEqualsSource(pointId: string): Promise<void> {
    const blocks = { startBlock: 0, count: GUEST_DISK_BYTES / BLOCK_SIZE };
    const checkpointId = `verify-${randomUUID()}`;
    await port.createCheckpoint(vm, checkpointId);
    try {
      const source = await port.blockDigests({ ...vm, disk: 'vda' }, checkpointId, blocks);
      const copy = await port.replicaBlockDigests({ ...replica, disk: 'vda' }, { pointId }, blocks);
      const differing = source.digests.flatMap((d, b) => (d === copy.digests[b] ? [] : [b]));
      assert.deepEqual(differing, [], `blocks of ${pointId} that differ from the source`);
    } finally {
      await port.deleteCheckpoint(vm, checkpointId);
    }
  }
  async function replicaCanary(pointId: string): Promise<number> {
    for await (const piece of port.readReplicaExtents({ ...replica, disk: 'vda' }, { pointId }, [
      { offset: 0, length: BLOCK_SIZE },
    ]))
      return parseCanary(piece.data.subarray(0, GUEST_BLOCK_SIZE));
    throw new Error('no data');
  }

  test('a seed while the guest writes, then incrementals of the stopped guest: tracked, exact, the canary where it stopped', async () => {
    await boot();
    const seed = (await runJob()).sessions[0]!;
    assert.equal(seed.outcome, 'replicated', seed.detail);
    assert.deepEqual(seed.copy!.modes, { vda: 'full' });

    for (let round = 0; round < 2; round++) {
      if (round > 0) await boot();
      const stoppedAt = await shutdown();
      const run = (await runJob()).sessions[0]!;
      assert.equal(run.outcome, 'replicated', run.detail);
      assert.deepEqual(run.copy!.modes, { vda: 'tracked' }, 'libvirt checkpoints track the changes');
      assert.ok(run.copy!.bytesCopied < GUEST_DISK_BYTES / 4, `${run.copy!.bytesCopied} bytes copied`);
      const pointId = run.restorePoint!.id;
      await assertReplicaEqualsSource(pointId);
      assert.equal(await replicaCanary(pointId), stoppedAt, 'the replica holds the guest’s last write');
    }
    const info = await port.getVm(vm);
    assert.equal(info.powerState, 'Off', 'the job’s paused starts left the guest off');
    assert.equal(info.lastStop, 'guest-shutdown');
  });
});
