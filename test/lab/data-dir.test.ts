import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdir, readdir, readFile, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { BLOCK_SIZE, type ReplicaView } from '../../src/hypervisor/port';
import { allPages, assemble, DR, MiB, PROD, single, smallEstate, startTestLab, until, type TestLab } from './helpers';

const spec = { kind: 'regular', crashConsistent: true };
const files = async (dir: string) => (await readdir(dir)).sort();

describe('layer files in the data directory', () => {
  let t: TestLab;
  before(async () => {
    t = await startTestLab(smallEstate({ writeRate: 0, disks: [{ id: 'os', size: '2MiB' }] }));
  });
  after(async () => t.close());

  const read = (replica: string, disk: string, view: ReplicaView) =>
    assemble(t.port.readReplicaExtents({ host: DR, replica, disk }, view, [{ offset: 0, length: MiB }]), MiB);

  test("ids holding '-' name distinct files: point a-b with disk c, point a with disk b-c", async () => {
    const rep = { host: DR, replica: 'r-dash' };
    const disks = ['c', 'b-c'];
    await t.port.createReplica(rep, { sourceVm: 'vm1', disks: disks.map((id) => ({ id, sizeBytes: MiB })) });
    const written = new Map<string, Buffer>();
    for (const point of ['a', 'a-b']) {
      await t.port.beginRestorePoint(rep, point, spec);
      for (const disk of disks) {
        const data = randomBytes(MiB);
        written.set(`${point}/${disk}`, data);
        await t.port.writeRestorePoint({ ...rep, disk }, point, single(0, data));
      }
      await t.port.sealRestorePoint(rep, point);
    }
    const check = async () => {
      for (const [key, data] of written) {
        const [point, disk] = key.split('/') as [string, string];
        assert.ok((await read(rep.replica, disk, { pointId: point })).equals(data), `${key} reads back its own bytes`);
      }
    };
    await check();
    await t.lab.kill();
    await t.restart();
    await check();
  });

  test('a version-1 data directory is migrated: its layer files are renamed from what the metadata knows', async () => {
    const src = { host: PROD, vm: 'vm1' };
    const rep = { host: DR, replica: 'r-v1' };
    await until(async () => (await t.port.getVm(src)).powerState === 'Running', 'vm1 booted again');
    await t.port.createCheckpoint(src, 'cp-1');
    await t.control.guestWrite('vm1', 'os', [0, 1, 2, 3]); // the checkpoint's store now holds the old blocks
    await t.port.createReplica(rep, { sourceVm: 'vm1', disks: [{ id: 'os', sizeBytes: MiB }] });
    await t.port.beginRestorePoint(rep, 'p-1', spec);
    await t.port.writeRestorePoint({ ...rep, disk: 'os' }, 'p-1', single(BLOCK_SIZE, randomBytes(4 * BLOCK_SIZE)));
    await t.port.sealRestorePoint(rep, 'p-1');
    const readCheckpoint = async () => {
      const extents = await allPages((p) => t.port.listAllocatedExtents({ ...src, disk: 'os' }, 'cp-1', p));
      return assemble(t.port.readExtents({ ...src, disk: 'os' }, 'cp-1', extents), 2 * MiB);
    };
    const checkpointBefore = await readCheckpoint();
    const pointBefore = await read(rep.replica, 'os', { pointId: 'p-1' });
    await t.lab.stop();

    // Turn it into what version 1 wrote: the old names and version.
    const statePath = join(t.dataDir, 'state.json');
    const state = JSON.parse(await readFile(statePath, 'utf8')) as { version: number };
    await writeFile(statePath, JSON.stringify({ ...state, version: 1 }));
    for (const [vm, now, old] of [
      ['vm1', 'cp+cp-1+os', 'cp-cp-1-os'],
      ['r-v1', 'pt+p-1+os', 'pt-p-1-os'],
    ] as const)
      for (const ext of ['.img', '.map'])
        await rename(join(t.dataDir, 'vms', vm, now + ext), join(t.dataDir, 'vms', vm, old + ext));

    await t.restart();
    assert.ok((await readCheckpoint()).equals(checkpointBefore), 'the checkpoint reads as before');
    assert.ok((await read(rep.replica, 'os', { pointId: 'p-1' })).equals(pointBefore), 'the point reads as before');
    assert.deepEqual(await files(join(t.dataDir, 'vms', 'r-v1')), [
      'base-os.img',
      'base-os.map',
      'pt+p-1+os.img',
      'pt+p-1+os.map',
    ]);
    assert.equal((JSON.parse(await readFile(statePath, 'utf8')) as { version: number }).version, 2);
  });

  test('at start-up, files no metadata refers to are removed and never read as layers', async () => {
    const rep = { host: DR, replica: 'r-v1' };
    const head = await read(rep.replica, 'os', { pointId: 'p-1' });
    await t.lab.kill();
    const dir = join(t.dataDir, 'vms', rep.replica);
    const before1 = await files(dir);
    // What crashes leave: a running layer nobody recorded (journal saying blocks 0-3 are present), a point never
    // recorded, the directories of a VM and a backup never recorded.
    const journal = Buffer.alloc(8);
    journal.writeUInt32LE(0, 0);
    journal.writeUInt32LE(4, 4);
    for (const leftover of ['running-os', 'pt+ghost+os']) {
      await writeFile(join(dir, `${leftover}.img`), randomBytes(4 * BLOCK_SIZE));
      await writeFile(join(dir, `${leftover}.map`), journal);
    }
    await mkdir(join(t.dataDir, 'vms', 'never-created'), { recursive: true });
    await writeFile(join(t.dataDir, 'vms', 'never-created', 'base-os.img'), 'x');
    await mkdir(join(t.dataDir, 'backups', 'never-taken'), { recursive: true });

    await t.restart();
    assert.deepEqual(await files(dir), before1);
    assert.ok(!(await readdir(join(t.dataDir, 'vms'))).includes('never-created'));
    assert.deepEqual(await readdir(join(t.dataDir, 'backups')), []);
    // Powered on, the replica starts a new running layer: the leftover's blocks do not show through.
    await t.port.powerOn({ host: DR, vm: rep.replica });
    await t.port.powerOff({ host: DR, vm: rep.replica });
    assert.ok((await read(rep.replica, 'os', { running: true })).equals(head));
    await t.port.discardRunningLayer(rep);
    await t.port.beginRestorePoint(rep, 'ghost', spec);
    const ghost = await t.port.sealRestorePoint(rep, 'ghost');
    assert.equal(ghost.bytesWritten, 0, 'a point opened under a leftover name starts empty');
  });
});
