import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { verifyGuestBlock } from '../../lab/guest';
import { HostTimeoutError } from '../../src/hypervisor/errors';
import { BLOCK_SIZE } from '../../src/hypervisor/port';
import { labPort } from '../tls';
import {
  allPages,
  assemble,
  blocksDiffering,
  MiB,
  PROD,
  sleep,
  smallEstate,
  startTestLab,
  type TestLab,
} from './helpers';

const vm = { host: PROD, vm: 'vm1' };
const SIZE = 2 * MiB;
const CANARY = SIZE / BLOCK_SIZE - 1;

describe('power and backups', () => {
  let t: TestLab;
  before(async () => {
    t = await startTestLab(
      smallEstate({ writeRate: 200, shutdownMs: 300, bootMs: 500, disks: [{ id: 'os', size: '2MiB' }] }),
    );
  });
  after(async () => t.close());

  const canary = async () => (await t.control.readBlock('vm1', 'os', CANARY)).readDoubleBE(8);

  test('guest shutdown takes its time, flushes the canary, and is idempotent', async () => {
    assert.equal((await t.port.getVm(vm)).lastStop, null, 'a VM that never stopped');
    await sleep(100);
    const short = await t.port.shutdownGuest(vm, 50);
    assert.deepEqual(short, { outcome: 'timed-out', state: 'Stopping' });
    const started = Date.now();
    const done = await t.port.shutdownGuest(vm, 5000);
    assert.equal(done.outcome, 'off');
    assert.ok(Date.now() - started >= 150, 'the rest of the shutdown time passed');
    // The canary holds the newest sequence: no block on disk is newer.
    const last = await canary();
    const disk = await Promise.all(Array.from({ length: CANARY }, (_, b) => t.control.readBlock('vm1', 'os', b)));
    const newest = Math.max(...disk.map((blk, b) => verifyGuestBlock(blk, 'vm1', 'os', b) ?? 0));
    assert.equal(newest, last);
    assert.ok(last > 0);
    assert.deepEqual(await t.port.shutdownGuest(vm, 1000), { outcome: 'already-off', state: 'Off' });
    assert.deepEqual(await t.port.powerOff(vm), { state: 'Off', alreadyInState: true });
    assert.equal((await t.port.getVm(vm)).lastStop, 'guest-shutdown', 'a power-off of an Off VM changes nothing');
  });

  test('power-on takes the boot time (Starting), then the guest writes again', async () => {
    const before1 = await canary();
    const on = t.port.powerOn(vm);
    await sleep(80);
    assert.equal((await t.port.getVm(vm)).powerState, 'Starting');
    assert.deepEqual(await on, { state: 'Running', alreadyInState: false });
    assert.deepEqual(await t.port.powerOn(vm), { state: 'Running', alreadyInState: true });
    await sleep(200);
    assert.ok((await canary()) > before1, 'sequence continues from the canary');
  });

  test('hard power-off stops writes at once', async () => {
    assert.equal((await t.port.getVm(vm)).lastStop, 'guest-shutdown', 'running again, it keeps how it last stopped');
    await t.port.powerOff(vm);
    assert.equal((await t.port.getVm(vm)).lastStop, 'forced-off');
    const snapshot = await Promise.all(
      Array.from({ length: SIZE / BLOCK_SIZE }, (_, b) => t.control.readBlock('vm1', 'os', b)),
    );
    await sleep(200);
    const later = await Promise.all(
      Array.from({ length: SIZE / BLOCK_SIZE }, (_, b) => t.control.readBlock('vm1', 'os', b)),
    );
    assert.deepEqual(blocksDiffering(Buffer.concat(snapshot), Buffer.concat(later)), []);
  });

  test('backups are point-in-time copies readable as a data source', async () => {
    await t.port.createCheckpoint(vm, 'cp-b');
    const atBackup = await assemble(
      t.port.readExtents({ ...vm, disk: 'os' }, 'cp-b', [{ offset: 0, length: SIZE }]),
      SIZE,
    );
    const backup = await t.control.takeBackup('vm1');
    await t.port.powerOn(vm);
    await sleep(200);
    const listed = await t.port.listBackups('vm1');
    assert.deepEqual(
      listed.map((b) => b.id),
      [backup.id],
    );
    const extents = await allPages((p) => t.port.listBackupExtents({ backupId: backup.id, disk: 'os' }, p));
    const restored = await assemble(t.port.readBackupExtents({ backupId: backup.id, disk: 'os' }, extents), SIZE);
    assert.deepEqual(blocksDiffering(restored, atBackup), []);
    assert.ok(restored.some((x) => x !== 0));
    await t.port.deleteCheckpoint(vm, 'cp-b');
  });

  test('a new VM on a production host accepts writes while off', async () => {
    const nv = { host: PROD, vm: 'restored01' };
    const info = await t.port.createVm(nv, { disks: [{ id: 'os', sizeBytes: SIZE }] });
    assert.equal(info.powerState, 'Off');
    assert.deepEqual(await t.port.createVm(nv, { disks: [{ id: 'os', sizeBytes: SIZE }] }), info, 'idempotent');
    const data = Buffer.alloc(2 * BLOCK_SIZE, 7);
    async function* blocks() {
      yield await Promise.resolve({ offset: 3 * BLOCK_SIZE, data });
    }
    assert.deepEqual(await t.port.writeExtents({ ...nv, disk: 'os' }, blocks()), { bytesWritten: data.length });
    assert.ok((await t.control.readBlock('restored01', 'os', 4)).equals(data.subarray(BLOCK_SIZE)));
    await assert.rejects(t.port.writeExtents({ ...vm, disk: 'os' }, blocks()), { name: 'ConflictError' });
  });

  test('how a VM last stopped survives a restart; a state file from before it was recorded reads null', async () => {
    const lastStops = async () =>
      Object.fromEntries((await t.port.listVms(PROD)).map((v) => [v.name, v.lastStop] as const));
    const before1 = await lastStops();
    assert.deepEqual(before1, { vm1: 'forced-off', restored01: null });
    await t.lab.stop();
    await t.restart();
    assert.deepEqual(await lastStops(), before1);

    await t.lab.stop();
    const statePath = join(t.dataDir, 'state.json');
    const state = JSON.parse(await readFile(statePath, 'utf8')) as { vms: { lastStop?: string }[] };
    for (const v of state.vms) delete v.lastStop;
    await writeFile(statePath, JSON.stringify(state));
    await t.restart();
    assert.deepEqual(await lastStops(), { vm1: null, restored01: null });
  });
});

describe('a boot longer than the control deadline', () => {
  let t: TestLab;
  before(async () => {
    t = await startTestLab(smallEstate({ bootMs: 1200, disks: [{ id: 'os', size: '2MiB' }] }));
  });
  after(async () => t.close());

  test('power-on waits for the boot however long the adapter deadline of other calls is', async () => {
    const impatient = labPort(t.lab.url, { timeoutMs: 300 });
    try {
      await impatient.powerOff(vm);
      const started = Date.now();
      assert.deepEqual(await impatient.powerOn(vm), { state: 'Running', alreadyInState: false });
      assert.ok(Date.now() - started >= 1100, 'it waited for the whole boot');
      // Other calls keep the short deadline: a slow answer times out.
      await t.control.setFault(PROD, { kind: 'slow', latencyMs: 600 });
      await assert.rejects(impatient.getVm(vm), HostTimeoutError);
    } finally {
      impatient.close();
      await t.control.clearFaults(PROD);
    }
  });
});
