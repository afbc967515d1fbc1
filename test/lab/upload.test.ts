import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, test } from 'node:test';
import { BLOCK_SIZE, type ExtentData } from '../../src/hypervisor/port';
import { assemble, DR, MiB, startTestLab, type TestLab } from './helpers';

let t: TestLab;
before(async () => {
  t = await startTestLab();
});
after(async () => t.close());

async function* from(items: ExtentData[]): AsyncGenerator<ExtentData> {
  for (const i of items) yield await Promise.resolve(i);
}

test('an upload whose frames overlap keeps the last write, although writes run concurrently', async () => {
  const rep = { host: DR, replica: 'vm1-replica' };
  await t.port.createReplica(rep, { sourceVm: 'vm1', disks: [{ id: 'os', sizeBytes: 4 * MiB }] });
  await t.port.beginRestorePoint(rep, 'p1', { kind: 'regular', crashConsistent: true });
  const whole = randomBytes(4 * MiB);
  const second = randomBytes(BLOCK_SIZE);
  const third = randomBytes(2 * BLOCK_SIZE);
  const result = await t.port.writeRestorePoint(
    { ...rep, disk: 'os' },
    'p1',
    from([
      { offset: 0, data: whole },
      { offset: BLOCK_SIZE, data: second },
      { offset: 0, data: third },
    ]),
  );
  assert.equal(result.bytesWritten, 4 * MiB + 3 * BLOCK_SIZE);
  await t.port.sealRestorePoint(rep, 'p1');
  const read = await assemble(
    t.port.readReplicaExtents({ ...rep, disk: 'os' }, { pointId: 'p1' }, [{ offset: 0, length: 4 * MiB }]),
    4 * MiB,
  );
  const expected = Buffer.concat([third, whole.subarray(2 * BLOCK_SIZE)]);
  assert.ok(read.equals(expected));
});
