import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import {
  BadRequestError,
  ConflictError,
  HostUnreachableError,
  TransferInterruptedError,
} from '../../src/hypervisor/errors';
import { BLOCK_SIZE } from '../../src/hypervisor/port';
import { assemble, DR, MiB, PROD, randomBlocks, smallEstate, startTestLab, type TestLab } from './helpers';

const src = { host: PROD, vm: 'vm1' };
const rep = { host: DR, replica: 'r-send' };
const DISK = { id: 'os', sizeBytes: 4 * MiB };
const whole = [{ offset: 0, length: DISK.sizeBytes }];

describe('a host-to-host send: the source host writes a checkpoint into a DR restore point', () => {
  let t: TestLab;
  before(async () => {
    // The guest keeps writing: the send must carry the checkpoint, not the disk as it is later.
    t = await startTestLab(smallEstate({ writeRate: 200, disks: [{ id: 'os', size: '4MiB' }] }));
    await t.control.guestWrite('vm1', 'os', randomBlocks(30, DISK.sizeBytes / BLOCK_SIZE - 2));
    await t.port.createCheckpoint(src, 'cp');
    await t.port.createReplica(rep, { sourceVm: 'vm1', disks: [DISK] });
  });
  after(async () => t.close());

  const atCheckpoint = () => assemble(t.port.readExtents({ ...src, disk: 'os' }, 'cp', whole), DISK.sizeBytes);
  const atPoint = (pointId: string) =>
    assemble(t.port.readReplicaExtents({ ...rep, disk: 'os' }, { pointId }, whole), DISK.sizeBytes);
  const send = (pointId: string, extents = whole) =>
    t.port.sendToRestorePoint({ ...src, disk: 'os', checkpointId: 'cp' }, { ...rep, disk: 'os', pointId }, extents);

  test('carries exactly the checkpoint; sent again, the point is the same and there is still one', async () => {
    await t.port.beginRestorePoint(rep, 'p1', { kind: 'regular', crashConsistent: true });
    // In two halves, like a copy sent in batches, the second half twice, like a retried batch.
    const half = DISK.sizeBytes / 2;
    let progress = 0;
    const first = await t.port.sendToRestorePoint(
      { ...src, disk: 'os', checkpointId: 'cp' },
      { ...rep, disk: 'os', pointId: 'p1' },
      [{ offset: 0, length: half }],
      { onProgress: (bytes) => (progress = bytes) },
    );
    assert.equal(first.bytesWritten, half);
    assert.equal(progress, half);
    for (let i = 0; i < 2; i++) await send('p1', [{ offset: half, length: half }]);
    await t.port.sealRestorePoint(rep, 'p1');
    assert.ok((await atPoint('p1')).equals(await atCheckpoint()));
    assert.deepEqual(
      (await t.port.listRestorePoints(rep)).map((p) => p.id),
      ['p1'],
    );
  });

  test('refuses a sealed point, extents past the disk and an unknown checkpoint, changing nothing', async () => {
    await assert.rejects(send('p1'), ConflictError);
    await assert.rejects(send('p1', [{ offset: DISK.sizeBytes, length: BLOCK_SIZE }]), (e: unknown) => {
      assert.ok(e instanceof BadRequestError);
      assert.equal(e.field, 'body.extents.0');
      return true;
    });
    await assert.rejects(
      t.port.sendToRestorePoint(
        { ...src, disk: 'os', checkpointId: 'nope' },
        { ...rep, disk: 'os', pointId: 'p1' },
        whole,
      ),
      /checkpoint/,
    );
    assert.ok((await atPoint('p1')).equals(await atCheckpoint()));
  });

  test('faults of either host apply: a cut breaks it (retryable), an unreachable DR host is reported', async () => {
    await t.port.beginRestorePoint(rep, 'p2', { kind: 'regular', crashConsistent: true });
    await t.control.setFault(DR, { kind: 'cut', afterBytes: MiB });
    await assert.rejects(send('p2'), (e: unknown) => e instanceof TransferInterruptedError && e.retryable);
    await t.control.clearFaults(DR);
    await t.control.setFault(PROD, { kind: 'cut', afterBytes: 2 * MiB });
    await assert.rejects(send('p2'), TransferInterruptedError);
    await t.control.clearFaults(PROD);
    await t.control.setFault(DR, { kind: 'unreachable' });
    await assert.rejects(send('p2'), (e: unknown) => e instanceof HostUnreachableError && /dr-a/.test(e.message));
    await t.control.clearFaults(DR);
    // Sent again once the faults are gone, the point is whole.
    assert.equal((await send('p2')).bytesWritten, DISK.sizeBytes);
    await t.port.sealRestorePoint(rep, 'p2');
    assert.ok((await atPoint('p2')).equals(await atCheckpoint()));
  });

  test("the DR end's faults see a send as the upload into its point: a scoped fault hits only that point", async () => {
    await t.port.beginRestorePoint(rep, 'p3', { kind: 'regular', crashConsistent: true });
    await t.control.setFault(DR, { kind: 'cut', afterBytes: MiB, method: 'POST', path: '/points/p3/disks/os/write$' });
    await assert.rejects(send('p3'), TransferInterruptedError);
    await t.control.clearFaults(DR, 'cut');
    await t.control.setFault(DR, { kind: 'cut', afterBytes: MiB, path: '/points/another/' });
    assert.equal((await send('p3')).bytesWritten, DISK.sizeBytes);
    await t.control.clearFaults(DR);
  });
});
