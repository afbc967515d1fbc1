import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdir, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { HostFailureError } from '../../src/hypervisor/errors';
import { BLOCK_SIZE } from '../../src/hypervisor/port';
import { DR, MiB, PROD, single, startTestLab, type TestLab } from './helpers';

const src = { host: PROD, vm: 'vm1' };
const rep = { host: DR, replica: 'r-store' };
const spec = { kind: 'regular', crashConsistent: true };

let t: TestLab;
before(async () => {
  t = await startTestLab();
});
after(async () => t.close());

const refused = (e: unknown): boolean => {
  assert.ok(e instanceof HostFailureError, `expected HostFailureError, got ${String(e)}`);
  assert.match(e.message, /metadata store failed .*restarted/);
  return true;
};

test('a failed metadata save makes the lab refuse every change until a restart reloads its state from disk', async () => {
  await t.port.createReplica(rep, { sourceVm: 'vm1', disks: [{ id: 'os', sizeBytes: MiB }] });
  await t.port.beginRestorePoint(rep, 'p1', spec);
  await t.port.writeRestorePoint({ ...rep, disk: 'os' }, 'p1', single(0, randomBytes(BLOCK_SIZE)));

  // The next save fails for real: the state file's place is taken by a directory (the saved file kept aside).
  const state = join(t.dataDir, 'state.json');
  await rename(state, `${state}.kept`);
  await mkdir(state);
  await writeFile(join(state, 'blocker'), '');
  await assert.rejects(t.port.sealRestorePoint(rep, 'p1'), refused);
  await rm(state, { recursive: true });
  await rename(`${state}.kept`, state);
  // The cause is gone, but memory may hold what the disk does not (p1 sealed): no change is made from it.
  await assert.rejects(t.port.sealRestorePoint(rep, 'p1'), refused);
  await assert.rejects(t.port.beginRestorePoint(rep, 'p2', spec), refused);
  await assert.rejects(t.port.createCheckpoint(src, 'cp1'), refused);
  await assert.rejects(t.port.powerOff(src), refused);
  await assert.rejects(t.control.guestWrite('vm1', 'os', [1]), refused);
  assert.match((await t.control.status()).storeFailure ?? '', /EISDIR/);
  assert.equal((await t.port.getVm(src)).powerState, 'Running', 'reads still answer');

  await t.lab.stop();
  await t.restart();
  const status = await t.control.status();
  assert.deepEqual([status.storeFailure, status.trackingLostAtStart], [null, true], 'its stop was not a clean one');
  const [p1] = await t.port.listRestorePoints(rep);
  assert.deepEqual([p1!.id, p1!.sealed], ['p1', false], 'the seal that was never saved is not there');
  assert.equal((await t.port.sealRestorePoint(rep, 'p1')).sealed, true);
  await t.port.createCheckpoint(src, 'cp1');
});
