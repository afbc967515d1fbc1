import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { ConflictError } from '../../src/hypervisor/errors';
import { BLOCK_SIZE, type ExtentData, type ReplicaView } from '../../src/hypervisor/port';
import {
  allPages,
  assemble,
  blocksDiffering,
  DR,
  extentBlocks,
  MiB,
  PROD,
  randomBlocks,
  sleep,
  smallEstate,
  startTestLab,
  type TestLab,
} from './helpers';

const src = { host: PROD, vm: 'vm1' };
const rep = { host: DR, replica: 'vm1-replica' };
const DISKS = [
  { id: 'os', sizeBytes: 4 * MiB },
  { id: 'data', sizeBytes: 2 * MiB },
];

describe('replica chains', () => {
  let t: TestLab;
  /** Content of each disk at each restore point, read from the source checkpoint it was copied from. */
  const expected = new Map<string, Record<string, Buffer>>();

  before(async () => {
    t = await startTestLab(smallEstate({ writeRate: 200, hotSetFraction: 0.2 }));
  });
  after(async () => t.close());

  const readSource = (disk: string, cp: string, size: number) =>
    assemble(t.port.readExtents({ ...src, disk }, cp, [{ offset: 0, length: size }]), size);
  const readReplica = (disk: string, view: ReplicaView, size: number) =>
    assemble(t.port.readReplicaExtents({ ...rep, disk }, view, [{ offset: 0, length: size }]), size);

  /** One replication run: checkpoint, copy (all allocated blocks, or changes since the last reference point), seal. */
  async function run(n: number, kind = 'regular'): Promise<void> {
    const cp = `cp${n}`;
    const pointId = `p${n}`;
    await t.port.createCheckpoint(src, cp);
    await t.port.beginRestorePoint(rep, pointId, { kind, crashConsistent: true, metadata: { checkpoint: cp } });
    const content: Record<string, Buffer> = {};
    for (const d of DISKS) {
      const ref = { ...src, disk: d.id };
      const extents = await allPages((page) =>
        n === 1
          ? t.port.listAllocatedExtents(ref, cp, page)
          : t.port.listChangedExtents(ref, { referencePointId: `rp${n - 1}`, checkpointId: cp }, page),
      );
      await t.port.writeRestorePoint({ ...rep, disk: d.id }, pointId, t.port.readExtents(ref, cp, extents));
      content[d.id] = await readSource(d.id, cp, d.sizeBytes);
    }
    await t.port.sealRestorePoint(rep, pointId);
    await t.port.createReferencePoint(src, `rp${n}`, cp);
    if (n > 1) await t.port.deleteCheckpoint(src, `cp${n - 1}`);
    expected.set(pointId, content);
  }

  async function assertPoint(pointId: string, view: ReplicaView = { pointId }): Promise<void> {
    for (const d of DISKS) {
      const got = await readReplica(d.id, view, d.sizeBytes);
      assert.deepEqual(blocksDiffering(got, expected.get(pointId)![d.id]!), [], `${d.id} at ${pointId} is exact`);
    }
  }

  test('each restore point holds the exact source content of its run', async () => {
    await t.port.createReplica(rep, { sourceVm: 'vm1', disks: DISKS });
    for (let n = 1; n <= 4; n++) {
      await run(n);
      await sleep(150);
    }
    const points = await t.port.listRestorePoints(rep);
    assert.deepEqual(
      points.map((p) => p.id),
      ['p1', 'p2', 'p3', 'p4'],
    );
    assert.ok(points.every((p) => p.sealed && p.crashConsistent && p.metadata.checkpoint === `c${p.id}`));
    for (const p of points) await assertPoint(p.id);
    // Points differ from each other, so the comparison above is not vacuous.
    assert.ok(blocksDiffering(expected.get('p1')!.os!, expected.get('p4')!.os!).length > 0);
  });

  test('a view lists as allocated exactly the blocks some layer of its chain holds', async () => {
    const chains: [string, string[]][] = [
      ['p1', ['p1']],
      ['p4', ['p1', 'p2', 'p3', 'p4']],
    ];
    for (const [pointId, chain] of chains) {
      for (const d of DISKS) {
        const disk = { ...rep, disk: d.id };
        const listed = extentBlocks(
          await allPages((page) => t.port.listReplicaAllocatedExtents(disk, { pointId }, page)),
        );
        const held = new Set<number>();
        for (const id of chain)
          for (const b of extentBlocks(await allPages((page) => t.port.listRestorePointExtents(disk, id, page))))
            held.add(b);
        assert.deepEqual(
          listed,
          [...held].sort((a, b) => a - b),
          `${d.id} at ${pointId}`,
        );
        // Whatever holds data in the view is among them (a layer may also hold zeros, copied as they were).
        const image = await readReplica(d.id, { pointId }, d.sizeBytes);
        for (let b = 0; b < d.sizeBytes / BLOCK_SIZE; b++)
          if (!image.subarray(b * BLOCK_SIZE, (b + 1) * BLOCK_SIZE).equals(Buffer.alloc(BLOCK_SIZE)))
            assert.ok(held.has(b), `${d.id} block ${b} holds data at ${pointId} and is listed`);
      }
    }
    await assert.rejects(t.port.listReplicaAllocatedExtents({ ...rep, disk: 'os' }, { pointId: 'nosuch' }), {
      name: 'NotFoundError',
    });
  });

  test('retried begin, write and seal duplicate nothing', async () => {
    const before1 = await t.port.getReplica(rep);
    const again = await t.port.beginRestorePoint(rep, 'p4', { kind: 'regular', crashConsistent: true });
    assert.equal(again.sealed, true);
    await t.port.sealRestorePoint(rep, 'p4');
    const after1 = await t.port.getReplica(rep);
    assert.deepEqual(after1.points, before1.points);

    // A write retried after a partial first attempt: same blocks twice, counted once.
    await t.port.createCheckpoint(src, 'cp5');
    // Retries may overlap the first attempt: three concurrent begins open one point.
    const begun = await Promise.all(
      [1, 2, 3].map(() =>
        t.port.beginRestorePoint(rep, 'p5', { kind: 'planned-failover-helper', crashConsistent: true }),
      ),
    );
    assert.ok(begun.every((b) => b.id === 'p5' && b.createdAt === begun[0]!.createdAt));
    assert.equal((await t.port.listRestorePoints(rep)).filter((p) => p.id === 'p5').length, 1);
    const content: Record<string, Buffer> = {};
    for (const d of DISKS) {
      const ref = { ...src, disk: d.id };
      const extents = await allPages((page) =>
        t.port.listChangedExtents(ref, { referencePointId: 'rp4', checkpointId: 'cp5' }, page),
      );
      await t.port.writeRestorePoint({ ...rep, disk: d.id }, 'p5', t.port.readExtents(ref, 'cp5', extents.slice(0, 1)));
      await t.port.writeRestorePoint({ ...rep, disk: d.id }, 'p5', t.port.readExtents(ref, 'cp5', extents));
      content[d.id] = await readSource(d.id, 'cp5', d.sizeBytes);
    }
    const sealed = await t.port.sealRestorePoint(rep, 'p5');
    const resealed = await t.port.sealRestorePoint(rep, 'p5');
    assert.deepEqual(resealed, sealed);
    let changedBytes = 0;
    for (const d of DISKS)
      changedBytes +=
        extentBlocks(await allPages((page) => t.port.listRestorePointExtents({ ...rep, disk: d.id }, 'p5', page)))
          .length * BLOCK_SIZE;
    assert.equal(sealed.bytesWritten, changedBytes, 'bytes written count each block once');
    expected.set('p5', content);
    await t.port.createReferencePoint(src, 'rp5', 'cp5');
    await t.port.deleteCheckpoint(src, 'cp4');
    await assertPoint('p5');
  });

  test('reverting to each restore point gives its exact content', async () => {
    for (const id of ['p2', 'p1', 'p4', 'p3', 'p5']) {
      const info = await t.port.revertReplica(rep, id);
      assert.equal(info.headPointId, id);
      await assertPoint(id, { running: true });
    }
  });

  test('merging the oldest point keeps every later point exact', async () => {
    await t.port.mergeOldestRestorePoint(rep, 'p1');
    await t.port.mergeOldestRestorePoint(rep, 'p1'); // a retry merges nothing more
    await assert.rejects(t.port.mergeOldestRestorePoint(rep, 'p3'), { name: 'ConflictError' });
    await t.port.mergeOldestRestorePoint(rep, 'p2');
    assert.deepEqual(
      (await t.port.listRestorePoints(rep)).map((p) => p.id),
      ['p3', 'p4', 'p5'],
    );
    for (const id of ['p3', 'p4', 'p5']) await assertPoint(id);
  });

  test('a replica with a point still being written refuses to power on, as on a KVM host', async () => {
    const replicaVm = { host: DR, vm: rep.replica };
    await t.port.beginRestorePoint(rep, 'half-written', { kind: 'regular', crashConsistent: true });
    await assert.rejects(t.port.powerOn(replicaVm), (e: unknown) => {
      assert.ok(e instanceof ConflictError, `expected ConflictError, got ${String(e)}`);
      assert.match(e.message, /half-written of vm1-replica is still being written/);
      return true;
    });
    const refused = await t.port.getReplica(rep);
    assert.equal(refused.powerState, 'Off');
    assert.equal(refused.hasRunningLayer, false, 'nothing was made to boot from');
    await t.port.discardRestorePoint(rep, 'half-written');
    assert.equal((await t.port.powerOn(replicaVm)).state, 'Running');
    await t.port.powerOff(replicaVm);
    await t.port.discardRunningLayer(rep);
  });

  test('a running replica writes into its own layer: discard, failback extents, seal, consolidate', async () => {
    const head = (await t.port.getReplica(rep)).headPointId!;
    const atHead = expected.get(head)!;
    const canaryAtHead = await t.port.readReplicaCanary(rep, { pointId: head });
    await t.port.powerOn({ host: DR, vm: rep.replica });
    await sleep(300);
    await t.control.guestWrite(rep.replica, 'data', randomBlocks(6, 30));
    await t.port.shutdownGuest({ host: DR, vm: rep.replica }, 5000);
    const running = await t.port.getReplica(rep);
    assert.equal(running.hasRunningLayer, true);
    assert.equal(running.consolidated, false);
    const canaryRunning = await t.port.readReplicaCanary(rep, { running: true });
    assert.ok(canaryRunning.sequence > canaryAtHead.sequence, 'the replica guest continued the sequence');

    // Failback reads exactly the blocks the replica changed.
    const runningContent: Record<string, Buffer> = {};
    for (const d of DISKS) {
      const now = await readReplica(d.id, { running: true }, d.sizeBytes);
      runningContent[d.id] = now;
      const changed = extentBlocks(
        await allPages((page) => t.port.listRunningLayerExtents({ ...rep, disk: d.id }, page)),
      );
      const differing = blocksDiffering(now, atHead[d.id]!);
      // Every differing block is in the layer; layer blocks rewritten with equal bytes cannot occur (sequence in content).
      assert.deepEqual(changed, differing, `running layer of ${d.id} is exactly the changed blocks`);
      const shipped: ExtentData[] = [];
      for await (const e of t.port.readReplicaExtents(
        { ...rep, disk: d.id },
        { running: true },
        await allPages((p) => t.port.listRunningLayerExtents({ ...rep, disk: d.id }, p)),
      ))
        shipped.push(e);
      for (const e of shipped) assert.ok(e.data.equals(now.subarray(e.offset, e.offset + e.data.length)));
    }

    // Undo failover: the running layer is gone, the replica shows its newest point again.
    await t.port.discardRunningLayer(rep);
    await assertPoint(head, { running: true });

    // Run again, then keep the running state as a failback-protective point.
    await t.port.powerOn({ host: DR, vm: rep.replica });
    await t.control.guestWrite(rep.replica, 'os', randomBlocks(5, 60));
    await t.port.powerOff({ host: DR, vm: rep.replica });
    const protectedContent: Record<string, Buffer> = {};
    for (const d of DISKS) protectedContent[d.id] = await readReplica(d.id, { running: true }, d.sizeBytes);
    const prot = await t.port.sealRunningLayer(rep, 'protective', {
      kind: 'failback-protective',
      crashConsistent: true,
    });
    assert.equal(prot.kind, 'failback-protective');
    expected.set('protective', protectedContent);
    await assertPoint('protective');
    await assertPoint(head);

    // Permanent failover: everything merged into the base, no points left, content unchanged.
    await t.port.powerOn({ host: DR, vm: rep.replica });
    await sleep(200);
    await t.port.powerOff({ host: DR, vm: rep.replica });
    const beforeConsolidate: Record<string, Buffer> = {};
    for (const d of DISKS) beforeConsolidate[d.id] = await readReplica(d.id, { running: true }, d.sizeBytes);
    const info = await t.port.consolidateReplica(rep);
    assert.deepEqual(info.points, []);
    assert.equal(info.hasRunningLayer, false);
    assert.equal(info.consolidated, true);
    for (const d of DISKS)
      assert.deepEqual(
        blocksDiffering(await readReplica(d.id, { running: true }, d.sizeBytes), beforeConsolidate[d.id]!),
        [],
      );
  });

  test('a consolidated replica refuses a new point, a running-layer seal and a revert', async () => {
    const permanentlyFailedOver = (e: unknown) => {
      assert.ok(e instanceof ConflictError, `expected ConflictError, got ${String(e)}`);
      assert.match(e.message, /permanently failed over/);
      return true;
    };
    const before1 = await t.port.getReplica(rep);
    assert.equal(before1.consolidated, true);
    await assert.rejects(
      t.port.beginRestorePoint(rep, 'p-after', { kind: 'regular', crashConsistent: true }),
      permanentlyFailedOver,
    );
    await t.port.powerOn({ host: DR, vm: rep.replica });
    await t.port.powerOff({ host: DR, vm: rep.replica });
    await assert.rejects(
      t.port.sealRunningLayer(rep, 'protective-2', { kind: 'failback-protective', crashConsistent: true }),
      permanentlyFailedOver,
    );
    await assert.rejects(t.port.revertReplica(rep, 'p5'), permanentlyFailedOver);
    const after1 = await t.port.getReplica(rep);
    assert.deepEqual([after1.points, after1.headPointId, after1.consolidated], [[], null, true]);
  });
});
