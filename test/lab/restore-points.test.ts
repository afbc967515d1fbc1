import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { ConflictError, NotFoundError } from '../../src/hypervisor/errors';
import { BLOCK_SIZE } from '../../src/hypervisor/port';
import { assemble, DR, MiB, single, slowBlocks, startTestLab, until, type TestLab } from './helpers';

const rep = { host: DR, replica: 'r-points' };
const DISK = { id: 'os', sizeBytes: 2 * MiB };
const whole = [{ offset: 0, length: DISK.sizeBytes }];
const spec = { kind: 'regular', crashConsistent: true };

describe('sealing and discarding restore points', () => {
  let t: TestLab;
  before(async () => {
    t = await startTestLab();
    await t.port.createReplica(rep, { sourceVm: 'vm1', disks: [DISK] });
  });
  after(async () => t.close());

  const atPoint = (pointId: string) =>
    assemble(t.port.readReplicaExtents({ ...rep, disk: 'os' }, { pointId }, whole), DISK.sizeBytes);
  const pointIds = async () => (await t.port.listRestorePoints(rep)).map((p) => p.id);

  test('the seal merges its metadata into the point, durably; a repeated seal returns the point unchanged', async () => {
    await t.port.beginRestorePoint(rep, 'p1', { ...spec, metadata: { run: 'r-7', source: 'job' } });
    await t.port.writeRestorePoint({ ...rep, disk: 'os' }, 'p1', single(0, randomBytes(BLOCK_SIZE)));
    const sealed = await t.port.sealRestorePoint(rep, 'p1', { metadata: { source: 'final', instant: 'T1' } });
    assert.deepEqual(sealed.metadata, { run: 'r-7', source: 'final', instant: 'T1' });
    assert.equal(sealed.sealed, true);
    assert.deepEqual(await t.port.sealRestorePoint(rep, 'p1', { metadata: { instant: 'T2' } }), sealed);
    await t.lab.kill();
    await t.restart();
    const [p1] = await t.port.listRestorePoints(rep);
    assert.deepEqual([p1!.sealed, p1!.metadata], [true, sealed.metadata]);
  });

  test('a slow upload in flight while the point is sealed is refused part-way; the point keeps its content at the seal', async () => {
    await t.port.beginRestorePoint(rep, 'p2', spec);
    const contents = Array.from({ length: 24 }, () => randomBytes(BLOCK_SIZE));
    const slow = slowBlocks(0, contents, 25);
    const upload = t.port.writeRestorePoint({ ...rep, disk: 'os' }, 'p2', slow.stream);
    upload.catch(() => undefined); // awaited below, after the seal
    const landed = async () => (await t.port.listRestorePoints(rep)).find((p) => p.id === 'p2')!.bytesWritten;
    await until(async () => (await landed()) >= 3 * BLOCK_SIZE, 'part of the upload landed');
    const sealed = await t.port.sealRestorePoint(rep, 'p2');
    const atSeal = await atPoint('p2');
    await assert.rejects(upload, (e: unknown) => e instanceof ConflictError && /sealed/.test(e.message));
    assert.ok(slow.yielded() < contents.length, 'the writer was stopped before it was done');
    assert.ok(sealed.bytesWritten < contents.length * BLOCK_SIZE, 'the seal came part-way');
    assert.ok((await atPoint('p2')).equals(atSeal), 'nothing landed after the seal');
    assert.equal(await landed(), sealed.bytesWritten);
    // What the point holds is exactly the pieces that landed before the seal, each whole.
    const blocks = sealed.bytesWritten / BLOCK_SIZE;
    assert.ok(atSeal.subarray(0, blocks * BLOCK_SIZE).equals(Buffer.concat(contents.slice(0, blocks))));
  });

  test('an open point is discarded; a sealed point is refused; an unknown one is gone already', async () => {
    await t.port.beginRestorePoint(rep, 'p3', spec);
    await t.port.writeRestorePoint({ ...rep, disk: 'os' }, 'p3', single(5 * BLOCK_SIZE, randomBytes(BLOCK_SIZE)));
    await t.port.discardRestorePoint(rep, 'p3');
    assert.deepEqual(await pointIds(), ['p1', 'p2']);
    await t.port.discardRestorePoint(rep, 'p3');
    await t.port.discardRestorePoint(rep, 'never-was');
    await assert.rejects(
      t.port.writeRestorePoint({ ...rep, disk: 'os' }, 'p3', single(0, randomBytes(BLOCK_SIZE))),
      NotFoundError,
    );
    await assert.rejects(
      t.port.discardRestorePoint(rep, 'p2'),
      (e: unknown) => e instanceof ConflictError && /sealed/.test(e.message),
    );
    assert.deepEqual(await pointIds(), ['p1', 'p2']);
    // Opened again under the same id, the point starts empty: the discarded block does not come back.
    await t.port.beginRestorePoint(rep, 'p3', spec);
    const reopened = await t.port.sealRestorePoint(rep, 'p3');
    assert.equal(reopened.bytesWritten, 0);
    assert.ok((await atPoint('p3')).equals(await atPoint('p2')));
  });

  test('a slow upload into a point that is discarded stops there', async () => {
    await t.port.beginRestorePoint(rep, 'p4', spec);
    const slow = slowBlocks(
      0,
      Array.from({ length: 24 }, () => randomBytes(BLOCK_SIZE)),
      25,
    );
    const upload = t.port.writeRestorePoint({ ...rep, disk: 'os' }, 'p4', slow.stream);
    upload.catch(() => undefined);
    await until(async () => slow.yielded() >= 3, 'the upload started');
    await t.port.discardRestorePoint(rep, 'p4');
    await assert.rejects(upload, NotFoundError);
    assert.ok(slow.yielded() < 24);
    assert.deepEqual(await pointIds(), ['p1', 'p2', 'p3']);
  });
});
