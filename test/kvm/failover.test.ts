import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { after, before, describe, test } from 'node:test';
import { lastSeq, readGuestLines, waitForSeq } from '../../kvm/guest/guest';
import { replicaNameOf } from '../../src/activities/inventory';
import { operationUpdates, replicaQueries, replicaWorkflowId } from '../../src/contract';
import type { HypervisorPort } from '../../src/hypervisor/port';
import type { TestOrchestrator } from '../harness';
import {
  cleanStop,
  failOverWritingGuest,
  replicateJob,
  startKvmEstate,
  type KvmEstate,
  type TestKvmHost,
} from './helpers';

const exec = promisify(execFile);

const PROD = 'kvm-prod1';
const DR = 'kvm-dr1';
const VM = 'pf-fo1';
/** A step that hangs (a session halted in its critical window waits for an operator) fails the test instead. */
const MINUTES_3 = 180_000;

// Planned failover of a real guest, writing throughout, from one KVM host to another (two libvirt instances, each
// with our host process), by the orchestrator's own workflows; then undo, a second failover and a permanent one.
// The replica is a libvirt domain on the DR host made from the source's definition, booting from a running layer.
describe('planned failover of a real guest between two KVM hosts, undo, and permanent failover', () => {
  let dir: string;
  let prod: TestKvmHost;
  let dr: TestKvmHost;
  let o: TestOrchestrator;
  let port: HypervisorPort & { close(): void };
  const vm = { host: PROD, vm: VM };
  const replica = { host: DR, replica: replicaNameOf(VM) };
  const replicaVm = { host: DR, vm: replica.replica };
  const replicaDir = () => join(dir, 'dr', 'state', 'replicas', replica.replica);
  const replicaConsole = () => join(replicaDir(), 'console.log');

  let estate: KvmEstate | undefined;
  before(async () => {
    estate = await startKvmEstate({ prefix: 'pf-kvmfo-', prod: PROD, dr: DR, vm: VM, restorePoints: 3 });
    ({ dir, prod, dr, o, port } = estate);
  });
  after(() => estate?.close());

  const entity = () => o.client.workflow.getHandle(replicaWorkflowId(VM));
  const who = { requestedBy: 'alice', reason: 'kvm test' };
  const replicaLines = () => readGuestLines(replicaConsole());

  const replicate = () => replicateJob(o.client, 'kvm');
  const failOver = () => failOverWritingGuest(o.client, port, { prod, vm, replica, replicaDir: replicaDir() });

  test(
    'seed, then a planned failover while the guest writes: the replica boots on the DR host and goes on',
    { timeout: MINUTES_3 },
    async () => {
      await port.powerOn(vm);
      await prod.seqAtLeast(5);
      await replicate();
      await failOver();
      // The replica's domain is a machine of the DR host's libvirt, named for the replica, on its running layer.
      const disks = await dr.libvirt.virsh.run(['domblklist', replica.replica]);
      assert.match(disks, new RegExp(`vda\\s+${join(replicaDir(), '_running.vda.qcow2')}`));
      // Its running state read while it runs, then once it is off: the second read sees where the guest stopped,
      // not what an export opened during the first read last knew.
      await port.readReplicaCanary(replica, { running: true });
      assert.equal((await port.shutdownGuest(replicaVm, 60_000)).outcome, 'off');
      const stoppedAt = cleanStop(await replicaLines());
      assert.equal((await port.readReplicaCanary(replica, { running: true })).sequence, stoppedAt);
    },
  );

  test(
    'undo: the replica stops, what it wrote is discarded, the source runs again from where it stopped',
    { timeout: MINUTES_3 },
    async () => {
      const stoppedAt = cleanStop(await prod.guestLines());
      const since = (await prod.guestLines()).length;
      const outcome = await entity().executeUpdate(operationUpdates.undoFailover, { args: [who] });
      assert.match(JSON.stringify(outcome), /undo/i);
      assert.equal((await port.getVm(replicaVm)).powerState, 'Off');
      const info = await port.getReplica(replica);
      assert.equal(info.hasRunningLayer, false);
      assert.equal(info.headPointId, info.points.at(-1)!.id, 'the head is the newest point again');
      assert.equal(existsSync(join(replicaDir(), '_running.vda.qcow2')), false, 'the running layer’s file is gone');
      const resumed = await prod.readyAfter(since);
      assert.equal(resumed.resume, stoppedAt, 'the source did not see the replica’s writes');
      assert.equal((await entity().query(replicaQueries.state)).state, 'Ready');
    },
  );

  test(
    'a second planned failover (incremental), then permanent failover of the running replica',
    { timeout: MINUTES_3 },
    async () => {
      await replicate();
      await failOver();
      await entity().executeUpdate(operationUpdates.permanentFailover, { args: [{ ...who, confirm: true }] });
      const info = await port.getReplica(replica);
      assert.equal(info.consolidated, true);
      assert.deepEqual(info.points, []);
      assert.equal((await port.getVm(replicaVm)).powerState, 'Running', 'committed live, the replica kept running');
      // It runs on its base alone now: no overlay is left under it, and it keeps writing.
      const disks = await dr.libvirt.virsh.run(['domblklist', replica.replica]);
      assert.match(disks, new RegExp(`vda\\s+${join(replicaDir(), '_base.vda.qcow2')}`));
      const { stdout } = await exec('qemu-img', ['info', '-U', '--output=json', join(replicaDir(), '_base.vda.qcow2')]);
      assert.equal((JSON.parse(stdout) as { 'backing-filename'?: string })['backing-filename'], undefined);
      const before = lastSeq(await replicaLines()) ?? 0;
      await waitForSeq(replicaConsole(), before + 3, { timeoutMs: 60_000 });
      assert.equal((await entity().query(replicaQueries.state)).state, 'PermanentFailover');
    },
  );
});
