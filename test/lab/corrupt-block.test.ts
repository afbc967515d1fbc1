import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { corruptBlockContent, verifyGuestBlock } from '../../lab/guest';
import { BadRequestError, ConflictError, NotFoundError } from '../../src/hypervisor/errors';
import { BLOCK_SIZE, type ReplicaView } from '../../src/hypervisor/port';
import {
  allPages,
  assemble,
  blocksDiffering,
  DR,
  extentBlocks,
  MiB,
  PROD,
  single,
  startTestLab,
  type TestLab,
} from './helpers';

const src = { host: PROD, vm: 'vm1' };
const rep = { host: DR, replica: 'r-corrupt' };
const SIZE = MiB;
const BLOCKS = SIZE / BLOCK_SIZE;

describe('corrupting a block of one layer, for tests of the verification', () => {
  let t: TestLab;
  before(async () => {
    t = await startTestLab();
    await t.port.createReplica(rep, { sourceVm: 'vm1', disks: [{ id: 'os', sizeBytes: SIZE }] });
    for (const [pointId, offset, length] of [
      ['p1', 0, 8 * BLOCK_SIZE],
      ['p2', 5 * BLOCK_SIZE, BLOCK_SIZE],
    ] as const) {
      await t.port.beginRestorePoint(rep, pointId, { kind: 'regular', crashConsistent: true });
      await t.port.writeRestorePoint({ ...rep, disk: 'os' }, pointId, single(offset, randomBytes(length)));
      await t.port.sealRestorePoint(rep, pointId);
    }
  });
  after(async () => t.close());

  const read = (view: ReplicaView) =>
    assemble(t.port.readReplicaExtents({ ...rep, disk: 'os' }, view, [{ offset: 0, length: SIZE }]), SIZE);
  const block = (buf: Buffer, b: number) => buf.subarray(b * BLOCK_SIZE, (b + 1) * BLOCK_SIZE);
  const pattern = (vm: string, b: number) => corruptBlockContent(vm, 'os', b);

  test('in a restore point: that point and the later ones that do not hide the block read the pattern', async () => {
    const [p1, p2] = [await read({ pointId: 'p1' }), await read({ pointId: 'p2' })];
    await t.control.corruptBlock(rep.replica, 'os', 2, { pointId: 'p1' });
    await t.control.corruptBlock(rep.replica, 'os', 5, { pointId: 'p1' });
    const [p1After, p2After] = [await read({ pointId: 'p1' }), await read({ pointId: 'p2' })];
    assert.deepEqual(blocksDiffering(p1After, p1), [2, 5]);
    assert.deepEqual(blocksDiffering(p2After, p2), [2], "p2's own block 5 hides p1's");
    assert.ok(block(p1After, 2).equals(pattern(rep.replica, 2)) && block(p1After, 5).equals(pattern(rep.replica, 5)));
    assert.equal(verifyGuestBlock(block(p1After, 2), 'vm1', 'os', 2), null, 'no guest wrote it');
    assert.ok(
      (await t.port.listRestorePoints(rep)).every((p) => p.sealed),
      'the points stay sealed',
    );
  });

  test("in a replica's base: every point that does not hold the block reads the pattern; digests see it", async () => {
    const digests = (pointId: string) =>
      t.port.replicaBlockDigests({ ...rep, disk: 'os' }, { pointId }, { startBlock: 0, count: BLOCKS });
    const before1 = await digests('p2');
    await t.control.corruptBlock(rep.replica, 'os', 9, 'base');
    await t.control.corruptBlock(rep.replica, 'os', 3, 'base'); // p1 holds block 3: hidden
    const after1 = await digests('p2');
    assert.deepEqual(
      after1.digests.flatMap((d, i) => (d !== before1.digests[i] ? [i] : [])),
      [9],
    );
    assert.ok(block(await read({ pointId: 'p1' }), 9).equals(pattern(rep.replica, 9)));
  });

  test("in a source VM's base: the disk reads the pattern, and change tracking does not see it", async () => {
    await t.port.createCheckpoint(src, 'cp1');
    await t.port.createReferencePoint(src, 'rp1', 'cp1');
    await t.control.corruptBlock('vm1', 'os', 4, 'base');
    assert.ok((await t.control.readBlock('vm1', 'os', 4)).equals(pattern('vm1', 4)));
    await t.port.createCheckpoint(src, 'cp2');
    const changed = extentBlocks(
      await allPages((p) =>
        t.port.listChangedExtents({ ...src, disk: 'os' }, { referencePointId: 'rp1', checkpointId: 'cp2' }, p),
      ),
    );
    assert.ok(!changed.includes(4), 'tracking misses it, as it would a fault of the storage');
  });

  test('refused: an unknown point or disk, a point of a source VM, a block past the end, a bad layer', async () => {
    await assert.rejects(
      t.control.corruptBlock(rep.replica, 'os', 1, { pointId: 'nope' }),
      (e: unknown) => e instanceof NotFoundError && /nope/.test(e.message),
    );
    await assert.rejects(t.control.corruptBlock(rep.replica, 'data', 1, 'base'), NotFoundError);
    await assert.rejects(t.control.corruptBlock('vm1', 'os', 1, { pointId: 'p1' }), ConflictError);
    await assert.rejects(
      t.control.corruptBlock(rep.replica, 'os', BLOCKS, 'base'),
      (e: unknown) => e instanceof BadRequestError && e.field === 'params.block',
    );
    await assert.rejects(
      t.control.corruptBlock(rep.replica, 'os', 1, 'top' as 'base'),
      (e: unknown) => e instanceof BadRequestError && e.field === 'body.layer',
    );
  });
});
