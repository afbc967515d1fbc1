import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { after, before, describe, test } from 'node:test';
import { lastSeq, readGuestLines, waitForReady, waitForSeq, type GuestLine } from '../../kvm/guest/guest';
import { replicaNameOf } from '../../src/activities/inventory';
import { operationUpdates, replicaQueries, replicaWorkflowId, type ReplicaView } from '../../src/contract';
import type { HypervisorPort } from '../../src/hypervisor/port';
import type { TestOrchestrator } from '../harness';
import { failOverWritingGuest, replicateJob, startKvmEstate, type KvmEstate, type TestKvmHost } from './helpers';

const exec = promisify(execFile);

const PROD = 'kvm-prod2';
const DR = 'kvm-dr2';
const VM = 'pf-fb1';
const MINUTES_4 = 240_000;

// Failback of a real guest from its replica on a KVM DR host to the original VM on the production KVM host, by the
// orchestrator's own workflows: the first phase copies while the replica runs and writes, the second with the
// replica off on its protective point; then commit (replication resumes, tracked), a second failback undone, and
// a regular failover to an older restore point with the source untouched, and a failback from it to a new VM.
describe('failback of a real guest between two KVM hosts: commit, undo, a regular failover to a point, and failback to a new VM', () => {
  let dir: string;
  let prod: TestKvmHost;
  let o: TestOrchestrator;
  let port: HypervisorPort & { close(): void };
  const vm = { host: PROD, vm: VM };
  const replica = { host: DR, replica: replicaNameOf(VM) };
  const replicaVm = { host: DR, vm: replica.replica };
  const replicaDir = () => join(dir, 'dr', 'state', 'replicas', replica.replica);
  const replicaConsole = () => join(replicaDir(), 'console.log');

  let estate: KvmEstate | undefined;
  before(async () => {
    estate = await startKvmEstate({ prefix: 'pf-kvmfb-', prod: PROD, dr: DR, vm: VM, restorePoints: 4 });
    ({ dir, prod, o, port } = estate);
  });
  after(() => estate?.close());

  const who = { requestedBy: 'alice', reason: 'kvm failback test' };
  const entity = () => o.client.workflow.getHandle(replicaWorkflowId(VM));
  const operate = (name: keyof typeof operationUpdates, payload: object) =>
    entity().executeUpdate(operationUpdates[name], { args: [{ ...who, ...payload }] });
  const state = (): Promise<ReplicaView> => entity().query(replicaQueries.state);
  const replicaLines = () => readGuestLines(replicaConsole());
  const failOver = () => failOverWritingGuest(o.client, port, { prod, vm, replica, replicaDir: replicaDir() });
  const pointImage = (pointId: string) => join(replicaDir(), `${pointId}.vda.qcow2`);

  /**
   * A failback to the original VM, production left off, with the replica writing until it is powered off: exact by
   * the workflow's own verification and by `qemu-img compare` of production against the protective point, which
   * holds the replica's last complete write.
   */
  async function failBack(): Promise<{ protectiveId: string; canary: number }> {
    const from = lastSeq(await replicaLines()) ?? 0;
    await waitForSeq(replicaConsole(), from + 3, { timeoutMs: 60_000 });
    const outcome = await operate('failback', { powerOnProduction: false });
    assert.equal(outcome.state, 'Failback', JSON.stringify(outcome));
    assert.ok(outcome.bytesCopied > 0, 'the replica’s writes were copied back');
    const view = await state();
    const protective = view.restorePoints.at(-1)!;
    assert.equal(protective.kind, 'failback-protective');
    assert.deepEqual(view.failbackTo, vm);
    assert.equal((await port.getVm(replicaVm)).powerState, 'Off');
    assert.equal((await port.getVm(vm)).powerState, 'Off');
    const info = await port.getReplica(replica);
    assert.equal(info.headPointId, protective.id);
    assert.equal(info.hasRunningLayer, false, 'the running layer became the protective point');
    await exec('qemu-img', ['compare', '-U', pointImage(protective.id), prod.image]);
    // The replica was cut off (a hard power-off): its canary is its last complete iteration, said or about to be.
    const canary = (await port.readReplicaCanary(replica, { pointId: protective.id })).sequence;
    const said = lastSeq(await replicaLines()) ?? 0;
    assert.ok(canary === said || canary === said + 1, `protective canary ${canary}, replica said ${said}`);
    assert.ok(canary >= from + 3, 'the replica wrote on during the first phase');
    return { protectiveId: protective.id, canary };
  }

  test(
    'seed, planned failover, then failback while the replica writes: production equals the protective point; after commit, production runs on from the replica’s last write and replication resumes tracked',
    { timeout: MINUTES_4 },
    async () => {
      await port.powerOn(vm);
      await prod.seqAtLeast(5);
      await replicateJob(o.client, 'kvm');
      await failOver();
      const { protectiveId, canary } = await failBack();

      const committed = await operate('commitFailback', {});
      assert.equal(committed.state, 'Ready', JSON.stringify(committed));
      const since = (await prod.guestLines()).length;
      await port.powerOn(vm);
      const ready = await prod.readyAfter(since);
      assert.equal(ready.resume, canary, 'production resumes at the replica’s last write');

      // The next job run counts production's changes from the failback's reference point: tracked, and exact.
      await prod.seqAtLeast(canary + 3);
      assert.equal((await port.shutdownGuest(vm, 60_000)).outcome, 'off');
      const run = await replicateJob(o.client, 'kvm');
      assert.deepEqual(Object.values(run.sessions[0]!.copy!.modes), ['tracked'], 'replication resumes incrementally');
      const newest = (await state()).restorePoints.at(-1)!;
      await exec('qemu-img', ['compare', '-U', pointImage(newest.id), prod.image]);
      assert.ok(
        (await state()).restorePoints.some((p) => p.id === protectiveId),
        'the protective point is kept',
      );
      await port.powerOn(vm);
    },
  );

  test(
    'a second failover and failback, then undo failback: production off, the replica runs again from its protective point',
    { timeout: MINUTES_4 },
    async () => {
      await failOver();
      const { protectiveId, canary } = await failBack();
      const since = (await replicaLines()).length;
      const undone = await operate('undoFailback', {});
      assert.equal(undone.state, 'Failover', JSON.stringify(undone));
      assert.equal((await port.getVm(vm)).powerState, 'Off');
      assert.equal((await port.getVm(replicaVm)).powerState, 'Running');
      assert.equal((await port.getReplica(replica)).headPointId, protectiveId);
      const ready = await waitForReady(replicaConsole(), since, { timeoutMs: 60_000 });
      assert.equal(ready.resume, canary, 'the replica resumes where it was cut off');
    },
  );

  test(
    'a regular failover to an older restore point: the replica boots on that point, the source is untouched',
    { timeout: MINUTES_4 },
    async () => {
      // Back to Ready with the source running, its replica off and discarded.
      await operate('failback', { powerOnProduction: true });
      await operate('commitFailback', {});
      await prod.seqAtLeast((lastSeq(await prod.guestLines()) ?? 0) + 3);
      const points = (await state()).restorePoints;
      const older = points.at(-2)!;
      const olderCanary = (await port.readReplicaCanary(replica, { pointId: older.id })).sequence;
      const sourceSince = (await prod.guestLines()).length;
      const since = (await replicaLines()).length;

      const outcome = await operate('failover', { restorePointId: older.id });
      assert.equal(outcome.state, 'Failover', JSON.stringify(outcome));
      assert.equal((await port.getReplica(replica)).headPointId, older.id);
      const ready = await waitForReady(replicaConsole(), since, { timeoutMs: 60_000 });
      assert.equal(ready.resume, olderCanary, 'the replica boots on the chosen point');
      assert.equal((await port.getVm(vm)).powerState, 'Running', 'the source is untouched');
      assert.ok(
        (await prod.guestLines()).slice(sourceSince).every((l: GuestLine) => l.kind === 'seq'),
        'the source ran on without a restart',
      );
    },
  );

  test(
    'failback to a new VM on the production host: made from the replica’s definition, equal to the protective point, booting where the replica stopped; after commit it is the VM replicated',
    { timeout: MINUTES_4 },
    async () => {
      const NEW = `${VM}-new`;
      const newVm = { host: PROD, vm: NEW };
      const newDir = join(dir, 'prod', 'state', 'vms', NEW);
      const from = lastSeq(await replicaLines()) ?? 0;
      await waitForSeq(replicaConsole(), from + 3, { timeoutMs: 60_000 });
      // Failed over to an older point, so the newest goes with this failback: the result says so (review m13).
      const head = (await port.getReplica(replica)).headPointId;
      const newer = (await state()).restorePoints.at(-1)!;
      assert.notEqual(newer.id, head);
      const outcome = await operate('failback', {
        target: { newVm: { name: NEW, host: PROD } },
        powerOnProduction: false,
      });
      assert.equal(outcome.state, 'Failback', JSON.stringify(outcome));
      assert.match(outcome.detail ?? '', new RegExp(`restore point\\(s\\) ${newer.id}, newer than ${head}.*dropped`));
      assert.ok(!(await state()).restorePoints.some((p) => p.id === newer.id));
      const view = await state();
      assert.deepEqual(view.failbackTo, newVm);
      const protective = view.restorePoints.at(-1)!;
      assert.equal(protective.kind, 'failback-protective');
      await exec('qemu-img', ['compare', '-U', pointImage(protective.id), join(newDir, 'vda.qcow2')]);
      // The source's machine under a name and identity of its own.
      assert.match(await prod.libvirt.virsh.run(['dumpxml', NEW]), new RegExp(`<name>${NEW}</name>`));
      assert.notEqual(
        (await prod.libvirt.virsh.run(['domuuid', NEW])).trim(),
        (await prod.libvirt.virsh.run(['domuuid', VM])).trim(),
      );

      const canary = (await port.readReplicaCanary(replica, { pointId: protective.id })).sequence;
      const console = join(newDir, 'console.log');
      await port.powerOn(newVm);
      assert.equal(
        (await waitForReady(console, 0, { timeoutMs: 60_000 })).resume,
        canary,
        'the new VM resumes at the replica’s last write',
      );
      assert.equal((await operate('commitFailback', {})).state, 'Ready');
      await waitForSeq(console, canary + 3, { timeoutMs: 60_000 });
      assert.equal((await port.shutdownGuest(newVm, 60_000)).outcome, 'off');
      await replicateJob(o.client, 'kvm');
      const newest = (await state()).restorePoints.at(-1)!;
      await exec('qemu-img', ['compare', '-U', pointImage(newest.id), join(newDir, 'vda.qcow2')]);
    },
  );
});
