import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { after, before, describe, test } from 'node:test';
import { GUEST_BLOCK_SIZE, lastSeq, parseCanary, waitForGuest } from '../../kvm/guest/guest';
import { replicaNameOf } from '../../src/activities/inventory';
import { connectHypervisor } from '../../src/config/hypervisor';
import { TASK_QUEUE, WorkflowTypes, type ReplicationJobResult } from '../../src/contract';
import { BLOCK_SIZE, type HypervisorPort } from '../../src/hypervisor/port';
import { startOrchestrator, testConfiguration, type TestOrchestrator } from '../harness';
import { GUEST_DISK_BYTES, startTestKvmHost, type TestKvmHost } from './helpers';

const exec = promisify(execFile);
const KVM_HOST = 'kvm-prod1';
const LAB_DR = 'dr-a';
const KVM_DR = 'kvm-dr1';
const VM = 'pf-src2';

// The orchestrator's replication jobs, unchanged, with a real guest on a KVM host as the source: one estate whose
// production host is our host process over libvirt, and whose DR host is the lab or a second KVM host (a libvirt
// instance of its own, with restore points as qcow2 chains), each reached at its own URL.
for (const drKind of ['lab', 'kvm'] as const)
  describe(`replication of a real guest on a KVM host into a DR host of ${drKind === 'lab' ? 'the lab' : 'KVM'}`, () => {
    const DR = drKind === 'lab' ? LAB_DR : KVM_DR;
    let dir: string;
    let kvm: TestKvmHost;
    let kvmDr: TestKvmHost | undefined;
    let o: TestOrchestrator;
    let port: HypervisorPort & { close(): void };
    const vm = { host: KVM_HOST, vm: VM };
    const replica = { host: DR, replica: replicaNameOf(VM) };

    before(async () => {
      dir = mkdtempSync(join(tmpdir(), 'pf-kvmrepl-'));
      kvm = await startTestKvmHost({ dir: join(dir, 'prod'), name: KVM_HOST, domain: VM });
      if (drKind === 'kvm') kvmDr = await startTestKvmHost({ dir: join(dir, 'dr'), name: KVM_DR, role: 'dr' });
      o = await startOrchestrator({
        estate: { sites: [{ name: 'dr', role: 'dr', hosts: [{ name: LAB_DR }] }] },
        configure: (labUrl) =>
          testConfiguration(labUrl, {
            hosts: [
              { name: KVM_HOST, role: 'production', adapter: { type: 'kvm', url: kvm.host.url } },
              kvmDr
                ? { name: KVM_DR, role: 'dr', adapter: { type: 'kvm', url: kvmDr.host.url } }
                : { name: LAB_DR, role: 'dr', adapter: { type: 'lab', url: labUrl } },
            ],
            jobs: [{ name: 'kvm', vms: [VM], targetHost: DR, restorePoints: 2 }],
          }),
        connect: (config) => (port = connectHypervisor(config)),
      });
    });

    after(async () => {
      await o?.close();
      port?.close();
      await kvm?.stop();
      await kvmDr?.stop();
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

      /** Each incremental point's canary: where the guest had stopped when it was copied. */
      const canaries = new Map<string, number>();
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
        canaries.set(pointId, stoppedAt);
        if (kvmDr) {
          // The restore point is a qcow2 overlay chain that QEMU's own tools read as the source's disk.
          assert.equal((await port.readReplicaCanary(replica, { pointId })).sequence, stoppedAt);
          const point = join(dir, 'dr', 'state', 'replicas', replica.replica, `${pointId}.vda.qcow2`);
          await exec('qemu-img', ['compare', '-U', point, kvm.image]);
        }
      }
      // Retention kept the newest two of three: the oldest was merged into the base, and they still read exact.
      const kept = (await port.getReplica(replica)).points;
      assert.equal(kept.length, 2);
      assert.deepEqual(
        kept.map((p) => p.id),
        [...canaries.keys()].slice(-2),
      );
      for (const p of kept)
        assert.equal(await replicaCanary(p.id), canaries.get(p.id), `canary of ${p.id} after the merge`);
      await assertReplicaEqualsSource(kept[1]!.id);
      const info = await port.getVm(vm);
      assert.equal(info.powerState, 'Off', 'the job’s offline views left the guest off');
      assert.equal(info.lastStop, 'guest-shutdown');
    });
  });
