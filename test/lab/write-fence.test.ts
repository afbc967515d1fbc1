import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { BadRequestError, ConflictError } from '../../src/hypervisor/errors';
import { BLOCK_SIZE } from '../../src/hypervisor/port';
import { DR, MiB, PROD, single, slowBlocks, startTestLab, until, type TestLab } from './helpers';

const vm = { host: PROD, vm: 'vm1' };
const disk = { ...vm, disk: 'data' };
const BLOCKS = (2 * MiB) / BLOCK_SIZE;

const fenced = (e: unknown): boolean => e instanceof ConflictError && /fenced/.test(e.message);

describe('write fences on a source VM', () => {
  let t: TestLab;
  before(async () => {
    t = await startTestLab();
    await t.port.powerOff(vm);
  });
  after(async () => t.close());

  const diskContent = async () =>
    Buffer.concat(await Promise.all(Array.from({ length: BLOCKS }, (_, b) => t.control.readBlock('vm1', 'data', b))));
  const write = (block: number, fence?: string) =>
    t.port.writeExtents(disk, single(block * BLOCK_SIZE, randomBytes(BLOCK_SIZE)), { fence });

  test('without a fence, writes with or without a token work', async () => {
    assert.equal((await write(1)).bytesWritten, BLOCK_SIZE);
    assert.equal((await write(2, 'anything')).bytesWritten, BLOCK_SIZE);
  });

  test('a fence admits only its own token, is idempotent, survives a restart and can be taken over', async () => {
    await t.port.fenceWrites(vm, 'session-1/attempt-1');
    await t.port.fenceWrites(vm, 'session-1/attempt-1');
    const before1 = await diskContent();
    await assert.rejects(write(3), fenced);
    await assert.rejects(write(3, 'session-0'), fenced);
    assert.ok((await diskContent()).equals(before1), 'refused writes changed nothing');
    assert.equal((await write(3, 'session-1/attempt-1')).bytesWritten, BLOCK_SIZE);

    await t.lab.kill();
    await t.restart();
    await assert.rejects(write(4), fenced);
    await t.port.fenceWrites(vm, 'session-2');
    await assert.rejects(write(4, 'session-1/attempt-1'), fenced);
    assert.equal((await write(4, 'session-2')).bytesWritten, BLOCK_SIZE);
  });

  test('a slow write in flight when a new fence is set is refused part-way; nothing of it lands afterwards', async () => {
    const contents = Array.from({ length: 20 }, () => randomBytes(BLOCK_SIZE));
    const slow = slowBlocks(8, contents, 25);
    const upload = t.port.writeExtents(disk, slow.stream, { fence: 'session-2' });
    upload.catch(() => undefined); // awaited below, after the fence
    await until(async () => (await t.control.readBlock('vm1', 'data', 10)).equals(contents[2]!), 'part of it landed');
    await t.port.fenceWrites(vm, 'session-3');
    const atFence = await diskContent();
    await assert.rejects(upload, fenced);
    assert.ok(slow.yielded() < contents.length, 'the writer was stopped before it was done');
    assert.ok((await diskContent()).equals(atFence), 'nothing landed after the fence');
  });

  test('fences are for source VMs; tokens are validated', async () => {
    await t.port.createReplica(
      { host: DR, replica: 'r-fence' },
      { sourceVm: 'vm1', disks: [{ id: 'os', sizeBytes: MiB }] },
    );
    await assert.rejects(t.port.fenceWrites({ host: DR, vm: 'r-fence' }, 'x'), ConflictError);
    await assert.rejects(
      t.port.fenceWrites(vm, 'has space'),
      (e: unknown) => e instanceof BadRequestError && e.field === 'body.token',
    );
    await assert.rejects(write(5, ''), (e: unknown) => e instanceof BadRequestError && e.field === 'query.fence');
  });
});
