import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { TrackingLostError } from '../../src/hypervisor/errors';
import { BLOCK_SIZE } from '../../src/hypervisor/port';
import {
  allPages,
  assemble,
  blocksDiffering,
  DR,
  extentBlocks,
  MiB,
  PROD,
  sleep,
  smallEstate,
  startTestLab,
  type TestLab,
} from './helpers';

const src = { host: PROD, vm: 'vm1' };
const rep = { host: DR, replica: 'r1' };
const OS = { id: 'os', sizeBytes: 4 * MiB };

describe('durable state across lab restarts', () => {
  let t: TestLab;
  before(async () => {
    t = await startTestLab(smallEstate({ writeRate: 150, hotSetFraction: 0.2, disks: [{ id: 'os', size: '4MiB' }] }));
  });
  after(async () => t.close());

  const readCp = (cp: string) =>
    assemble(t.port.readExtents({ ...src, disk: 'os' }, cp, [{ offset: 0, length: OS.sizeBytes }]), OS.sizeBytes);
  const readPoint = (pointId: string) =>
    assemble(
      t.port.readReplicaExtents({ ...rep, disk: 'os' }, { pointId }, [{ offset: 0, length: OS.sizeBytes }]),
      OS.sizeBytes,
    );
  const changes = (rp: string, cp: string) =>
    allPages((page) =>
      t.port.listChangedExtents({ ...src, disk: 'os' }, { referencePointId: rp, checkpointId: cp }, page),
    ).then(extentBlocks);

  /** Everything a restart must keep, captured before it. */
  let cp1Content: Buffer;
  let pointContent: Buffer;

  test('setup: a checkpoint, a reference point, a replica with a sealed point', async () => {
    await t.port.createCheckpoint(src, 'cp1');
    await t.port.createReferencePoint(src, 'rp1', 'cp1');
    cp1Content = await readCp('cp1');
    await t.port.createReplica(rep, { sourceVm: 'vm1', disks: [OS] });
    await t.port.beginRestorePoint(rep, 'p1', { kind: 'regular', crashConsistent: true, metadata: { run: '1' } });
    const extents = await allPages((p) => t.port.listAllocatedExtents({ ...src, disk: 'os' }, 'cp1', p));
    await t.port.writeRestorePoint(
      { ...rep, disk: 'os' },
      'p1',
      t.port.readExtents({ ...src, disk: 'os' }, 'cp1', extents),
    );
    await t.port.sealRestorePoint(rep, 'p1');
    pointContent = await readPoint('p1');
    assert.deepEqual(blocksDiffering(pointContent, cp1Content), []);
    await sleep(300); // the guest keeps writing, so the checkpoint's copy-on-write store fills
  });

  test('a clean restart keeps every object, keeps tracking exact, and running VMs run again', async () => {
    await t.lab.stop();
    await t.restart();
    assert.equal((await t.control.status()).trackingLostAtStart, false);
    const vmInfo = await t.port.getVm(src);
    assert.ok(['Starting', 'Running'].includes(vmInfo.powerState), `vm1 boots again (${vmInfo.powerState})`);
    assert.deepEqual(blocksDiffering(await readCp('cp1'), cp1Content), [], 'checkpoint content survived');
    assert.deepEqual(blocksDiffering(await readPoint('p1'), pointContent), [], 'restore point survived');
    const points = await t.port.listRestorePoints(rep);
    assert.deepEqual(
      points.map((p) => [p.id, p.sealed, p.metadata.run]),
      [['p1', true, '1']],
    );
    const refs = await t.port.listReferencePoints(src);
    assert.deepEqual(
      refs.map((r) => [r.id, r.trackingValid]),
      [['rp1', true]],
    );

    await sleep(400); // booted and writing again
    assert.equal((await t.port.getVm(src)).powerState, 'Running');
    const seqBefore = (await t.control.readBlock('vm1', 'os', OS.sizeBytes / BLOCK_SIZE - 1)).readDoubleBE(8);
    await sleep(200);
    const seqAfter = (await t.control.readBlock('vm1', 'os', OS.sizeBytes / BLOCK_SIZE - 1)).readDoubleBE(8);
    assert.ok(seqAfter > seqBefore, 'the guest writes again after the restart');

    await t.port.createCheckpoint(src, 'cp2');
    const cp2 = await readCp('cp2');
    assert.deepEqual(
      await changes('rp1', 'cp2'),
      blocksDiffering(cp1Content, cp2),
      'tracking across a clean restart is exact',
    );
  });

  test('an unclean stop keeps data but reports tracking lost; digests still work', async () => {
    const cp2Before = await readCp('cp2');
    await t.lab.kill();
    await t.restart();
    assert.equal((await t.control.status()).trackingLostAtStart, true);
    await assert.rejects(changes('rp1', 'cp2'), (e) => e instanceof TrackingLostError && !e.retryable);
    const refs = await t.port.listReferencePoints(src);
    assert.deepEqual(
      refs.map((r) => r.trackingValid),
      [false],
    );
    assert.deepEqual(blocksDiffering(await readCp('cp2'), cp2Before), [], 'checkpoint content survived the crash');
    assert.deepEqual(blocksDiffering(await readPoint('p1'), pointContent), [], 'restore point survived the crash');

    // The fallback: compare digests of the source checkpoint with the replica point.
    const blocks = OS.sizeBytes / BLOCK_SIZE;
    const a = await t.port.blockDigests({ ...src, disk: 'os' }, 'cp2', { startBlock: 0, count: blocks });
    const b = await t.port.replicaBlockDigests(
      { ...rep, disk: 'os' },
      { pointId: 'p1' },
      { startBlock: 0, count: blocks },
    );
    const differing = a.digests.flatMap((d, i) => (d !== b.digests[i] ? [i] : []));
    assert.deepEqual(differing, blocksDiffering(cp2Before, pointContent), 'digests find exactly the differing blocks');

    // A reference point from a checkpoint older than the crash has no tracking either...
    await t.port.createReferencePoint(src, 'rp-old', 'cp2');
    assert.equal((await t.port.listReferencePoints(src)).find((r) => r.id === 'rp-old')?.trackingValid, false);
    // ...but tracking from a new checkpoint is exact again.
    await t.port.createCheckpoint(src, 'cp3');
    await t.port.createReferencePoint(src, 'rp3', 'cp3');
    const cp3 = await readCp('cp3');
    await sleep(300);
    await t.port.createCheckpoint(src, 'cp4');
    const tracked = await changes('rp3', 'cp4');
    assert.ok(tracked.length > 0);
    assert.deepEqual(tracked, blocksDiffering(cp3, await readCp('cp4')));
  });
});
