import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { guestBlockContent } from '../../lab/guest';
import { blockDigest } from '../../src/host-api/digests';
import { BLOCK_SIZE } from '../../src/hypervisor/port';
import {
  allPages,
  assemble,
  blocksDiffering,
  extentBlocks,
  MiB,
  PROD,
  randomBlocks,
  sleep,
  smallEstate,
  startTestLab,
  type TestLab,
} from './helpers';

const vm = { host: PROD, vm: 'vm1' };
const OS_BYTES = 8 * MiB;
const DATA_BYTES = 8 * MiB;

describe('change tracking and checkpoints', () => {
  let t: TestLab;
  before(async () => {
    // A busy guest: random writes with a hot set, on top of the writes the tests make themselves.
    t = await startTestLab(
      smallEstate(
        {
          writeRate: 100,
          hotSetFraction: 0.1,
          disks: [
            { id: 'os', size: '8MiB' },
            { id: 'data', size: '8MiB' },
          ],
        },
        [{ name: 'vm2' }],
      ),
    );
  });
  after(async () => t.close());

  const fullRead = (disk: string, size: number, cp: string) =>
    assemble(t.port.readExtents({ ...vm, disk }, cp, [{ offset: 0, length: size }]), size);

  test('tracked changes equal the blocks actually written under random concurrent writes', async () => {
    await t.port.createCheckpoint(vm, 'cp1');
    await t.port.createReferencePoint(vm, 'rp1', 'cp1');
    const before1 = { os: await fullRead('os', OS_BYTES, 'cp1'), data: await fullRead('data', DATA_BYTES, 'cp1') };

    // Concurrent writers: several requests in flight while the guest's own workload runs.
    const mine = new Set<number>();
    await Promise.all(
      Array.from({ length: 3 }, async () => {
        for (let i = 0; i < 3; i++) {
          const blocks = randomBlocks(4, DATA_BYTES / BLOCK_SIZE - 2);
          await t.control.guestWrite('vm1', 'data', blocks);
          blocks.forEach((b) => mine.add(b));
          await sleep(10);
        }
      }),
    );
    await sleep(200);
    await t.port.createCheckpoint(vm, 'cp2');
    const after2 = { os: await fullRead('os', OS_BYTES, 'cp2'), data: await fullRead('data', DATA_BYTES, 'cp2') };
    // Writes after cp2 must not show up as changes up to cp2.
    await sleep(300);

    for (const [disk, size] of [
      ['os', OS_BYTES],
      ['data', DATA_BYTES],
    ] as const) {
      const tracked = extentBlocks(
        await allPages((page) =>
          t.port.listChangedExtents({ ...vm, disk }, { referencePointId: 'rp1', checkpointId: 'cp2' }, page),
        ),
      );
      const actual = blocksDiffering(before1[disk], after2[disk]);
      assert.ok(
        actual.length > 5 && actual.length < size / BLOCK_SIZE / 2,
        `some but not most blocks of ${disk} changed (${actual.length} of ${size / BLOCK_SIZE})`,
      );
      assert.deepEqual(tracked, actual, `tracked changes of ${disk} equal the blocks whose bytes changed`);
    }
    const trackedData = new Set(
      extentBlocks(
        await allPages((p) =>
          t.port.listChangedExtents({ ...vm, disk: 'data' }, { referencePointId: 'rp1', checkpointId: 'cp2' }, p),
        ),
      ),
    );
    for (const b of mine) assert.ok(trackedData.has(b), `block ${b} written by the test is tracked`);
    await t.port.deleteCheckpoint(vm, 'cp1');
    await t.port.deleteCheckpoint(vm, 'cp2');
  });

  test('a checkpoint read under concurrent writes equals the disk at checkpoint time', async () => {
    // vm2's guest writes only when the test asks, so the test knows every write and its sequence.
    const quiet = { host: PROD, vm: 'vm2' };
    const size = 2 * MiB;
    const usable = size / BLOCK_SIZE - 2;
    const log: { block: number; seq: number }[] = [];
    const writer = async (rounds: number) => {
      for (let i = 0; i < rounds; i++) {
        const blocks = randomBlocks(8, usable);
        const last = await t.control.guestWrite('vm2', 'os', blocks);
        blocks.forEach((block, j) => log.push({ block, seq: last - blocks.length + 1 + j }));
      }
    };
    await writer(10);
    const writers = Promise.all([writer(30), writer(30), writer(30)]);
    await sleep(30);
    await t.port.createCheckpoint(quiet, 'cp-mid');
    // Read while the writers keep overwriting blocks the checkpoint still needs.
    const atCheckpoint = await assemble(
      t.port.readExtents({ ...quiet, disk: 'os' }, 'cp-mid', [{ offset: 0, length: size }]),
      size,
    );
    await writers;

    // The checkpoint holds a prefix of the write sequence: find its cut, then check every block.
    let cut = 0;
    for (let b = 0; b < usable; b++) {
      const blk = atCheckpoint.subarray(b * BLOCK_SIZE, (b + 1) * BLOCK_SIZE);
      if (blk.some((x) => x !== 0)) cut = Math.max(cut, blk.readDoubleBE(16));
    }
    assert.ok(
      log.some((w) => w.seq > cut),
      'writes continued after the checkpoint',
    );
    assert.ok(
      log.some((w) => w.seq <= cut),
      'writes happened before the checkpoint',
    );
    for (let b = 0; b < usable; b++) {
      const lastBefore = log.filter((w) => w.block === b && w.seq <= cut).sort((x, y) => y.seq - x.seq)[0];
      const expected = lastBefore ? guestBlockContent('vm2', 'os', b, lastBefore.seq) : Buffer.alloc(BLOCK_SIZE);
      assert.ok(
        atCheckpoint.subarray(b * BLOCK_SIZE, (b + 1) * BLOCK_SIZE).equals(expected),
        `block ${b} as of sequence ${cut}`,
      );
    }
    const again = await assemble(
      t.port.readExtents({ ...quiet, disk: 'os' }, 'cp-mid', [{ offset: 0, length: size }]),
      size,
    );
    assert.ok(again.equals(atCheckpoint), 'the checkpoint still reads the same after the writes');
    const newest = log.reduce((a, b) => (b.seq > a.seq ? b : a));
    const live = await t.control.readBlock('vm2', 'os', newest.block);
    assert.ok(
      live.equals(guestBlockContent('vm2', 'os', newest.block, newest.seq)),
      'the live disk has the newest write',
    );
    await t.port.deleteCheckpoint(quiet, 'cp-mid');
  });

  test('digests match the bytes read and name their algorithm', async () => {
    await t.port.createCheckpoint(vm, 'cp-d');
    const bytes = await fullRead('data', DATA_BYTES, 'cp-d');
    const d = await t.port.blockDigests({ ...vm, disk: 'data' }, 'cp-d', {
      startBlock: 0,
      count: DATA_BYTES / BLOCK_SIZE,
    });
    assert.equal(d.digests.length, DATA_BYTES / BLOCK_SIZE);
    d.digests.forEach((h, b) =>
      assert.equal(h, blockDigest(bytes.subarray(b * BLOCK_SIZE, (b + 1) * BLOCK_SIZE)), `digest ${b}`),
    );
    assert.equal(d.algorithm, 'sha256-128');
    await t.port.deleteCheckpoint(vm, 'cp-d');
  });
});
