import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { ApplicationFailure } from '@temporalio/common';
import { MockActivityEnvironment } from '@temporalio/testing';
import { DefaultLogger } from '@temporalio/worker';
import { createReplicationActivities, type CopyDiskInput, type CopyDiskResult } from '../../src/activities/replication';
import { FailureTypes } from '../../src/contract';
import { encodeFrames } from '../../src/host-api/frames';
import type { HostApiHypervisor } from '../../src/hypervisor/host-api-adapter';
import { BLOCK_SIZE, type ExtentData, type HypervisorPort } from '../../src/hypervisor/port';
import { rawRequest } from '../tls';
import { assemble, DR, MiB, PROD, randomBlocks, smallEstate, startTestLab, type TestLab } from './helpers';

const src = { host: PROD, vm: 'vm1' };
const rep = { host: DR, replica: 'r-verified' };
const DISK = { id: 'os', sizeBytes: 4 * MiB };
const whole = [{ offset: 0, length: DISK.sizeBytes }];
const BLOCKS = DISK.sizeBytes / BLOCK_SIZE;

// The final sync's proof, taken as the blocks are stored: the source's digests travel with its data, and the DR host
// reads back what it stored and compares.
describe('a copy verified as it is stored', () => {
  let t: TestLab;
  let point = 0;
  before(async () => {
    // The guest keeps writing: what is proven is the checkpoint, not the disk as it is later.
    t = await startTestLab(smallEstate({ writeRate: 200, disks: [{ id: 'os', size: '4MiB' }] }));
    await t.control.guestWrite('vm1', 'os', randomBlocks(30, BLOCKS - 2));
    await t.port.createCheckpoint(src, 'cp');
    await t.port.createReplica(rep, { sourceVm: 'vm1', disks: [DISK] });
  });
  after(async () => t.close());

  const openPoint = async () => {
    const id = `p${++point}`;
    await t.port.beginRestorePoint(rep, id, { kind: 'regular', crashConsistent: true });
    return id;
  };
  const atCheckpoint = () => assemble(t.port.readExtents({ ...src, disk: 'os' }, 'cp', whole), DISK.sizeBytes);
  const atPoint = (pointId: string) =>
    assemble(t.port.readReplicaExtents({ ...rep, disk: 'os' }, { pointId }, whole), DISK.sizeBytes);

  test('through a proxy: the source’s stream, forwarded as it is, is proven block by block by the DR host', async () => {
    const pointId = await openPoint();
    const extents = [
      { offset: 0, length: 3 * BLOCK_SIZE },
      { offset: 10 * BLOCK_SIZE, length: 40 * BLOCK_SIZE },
    ];
    const read = t.port.readExtents({ ...src, disk: 'os' }, 'cp', extents, { digests: true });
    const written = await t.port.writeRestorePoint({ ...rep, disk: 'os' }, pointId, read);
    assert.deepEqual(written, { bytesWritten: 43 * BLOCK_SIZE, verification: { blocksCompared: 43, mismatched: [] } });
    // Without digests nothing is claimed.
    const plain = t.port.readExtents({ ...src, disk: 'os' }, 'cp', whole);
    assert.deepEqual(await t.port.writeRestorePoint({ ...rep, disk: 'os' }, pointId, plain), {
      bytesWritten: DISK.sizeBytes,
    });
    assert.ok((await atPoint(pointId)).equals(await atCheckpoint()));
  });

  test('host to host: the DR end reads back what it stored against what the source read', async () => {
    const pointId = await openPoint();
    const written = await t.port.sendToRestorePoint(
      { ...src, disk: 'os', checkpointId: 'cp' },
      { ...rep, disk: 'os', pointId },
      whole,
      { verify: true },
    );
    assert.deepEqual(written, {
      bytesWritten: DISK.sizeBytes,
      verification: { blocksCompared: BLOCKS, mismatched: [] },
    });
    assert.ok((await atPoint(pointId)).equals(await atCheckpoint()));
  });

  /** An upload of the checkpoint's first blocks with their digests, as bytes (for a test to alter on the way). */
  async function framedWithDigests(blocks: number): Promise<Buffer> {
    const data = (await atCheckpoint()).subarray(0, blocks * BLOCK_SIZE);
    async function* one(): AsyncGenerator<ExtentData> {
      yield { offset: 0, data: Buffer.from(data) };
    }
    const parts: Buffer[] = [];
    for await (const p of encodeFrames(one(), { digests: true })) parts.push(p);
    return Buffer.concat(parts);
  }
  const upload = (pointId: string, body: Buffer) =>
    rawRequest(`${t.lab.url}/v1/hosts/${DR}/replicas/${rep.replica}/points/${pointId}/disks/os/write`, {
      method: 'POST',
      body,
      headers: { 'content-type': 'application/octet-stream' },
    });

  test('a block altered on the way is stored, and named as not what the source read', async () => {
    const pointId = await openPoint();
    const body = await framedWithDigests(8);
    body[24 + 5 * BLOCK_SIZE + 100]! ^= 0xff; // in block 5 of the one data frame (after its 24-byte header)
    const answer = await upload(pointId, body);
    assert.equal(answer.status, 200, answer.text);
    assert.deepEqual(answer.json(), {
      bytesWritten: 8 * BLOCK_SIZE,
      verification: { blocksCompared: 8, mismatched: [{ offset: 5 * BLOCK_SIZE, length: BLOCK_SIZE }] },
    });
  });

  test('digests of blocks past the disk are refused, naming the frame', async () => {
    const pointId = await openPoint();
    const body = await framedWithDigests(2);
    // The DIGESTS frame's offset (after the data frame) moved to the disk's last block: its two blocks end past it.
    body.writeBigUInt64BE(BigInt(DISK.sizeBytes - BLOCK_SIZE), 24 + 2 * BLOCK_SIZE + 8);
    const answer = await upload(pointId, body);
    assert.equal(answer.status, 400, answer.text);
    assert.match(answer.text, /frames\.0\.digests/);
  });

  test('the copy activity carries the proof into its result; a DR host that answers without it fails the copy', async () => {
    // The failure below is expected: its log line would only be noise.
    const env = new MockActivityEnvironment({}, { logger: new DefaultLogger('ERROR', () => undefined) });
    const copy = (port: HypervisorPort, input: CopyDiskInput): Promise<CopyDiskResult> =>
      env.run((i: CopyDiskInput) => createReplicationActivities(port).copyDisk(i), input);
    const input = async (): Promise<CopyDiskInput> => ({
      source: { kind: 'checkpoint', vm: src, checkpointId: 'cp', baseReferencePointId: null },
      disk: DISK,
      replica: rep,
      pointId: await openPoint(),
      replicaHeadPointId: null,
      verify: true,
    });
    const copied = await copy(t.port, await input());
    assert.ok(copied.bytesCopied > 0);
    assert.deepEqual(copied.verification, { blocksCompared: copied.bytesCopied / BLOCK_SIZE, mismatchedBlocks: 0 });

    // A DR host of an older release, or one that leaves the proof out: the copy is not taken as proven.
    const unproven: HypervisorPort = Object.assign(Object.create(t.port) as HostApiHypervisor, {
      writeRestorePoint: async (...args: Parameters<HypervisorPort['writeRestorePoint']>) => ({
        bytesWritten: (await t.port.writeRestorePoint(...args)).bytesWritten,
      }),
    });
    await assert.rejects(copy(unproven, await input()), (e: unknown) => {
      assert.ok(e instanceof ApplicationFailure, String(e));
      assert.equal(e.type, FailureTypes.hypervisor);
      assert.equal(e.nonRetryable, true);
      assert.match(e.message, /answered the copy of disk os without verifying it/);
      return true;
    });
  });
});
