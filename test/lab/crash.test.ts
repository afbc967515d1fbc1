// Real crashes inside the lab's multi-file steps. The step runs in a lab process that SIGKILLs itself at a named
// point (PF_LAB_CRASH_AT); a lab started again on the same data directory must then give, for the same call
// retried, exactly what the step promised. Setup and checks run in an in-process lab on that directory.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import type { CrashStep } from '../../lab/crash';
import { startLab } from '../../lab/server';
import { HypervisorError, NotFoundError } from '../../src/hypervisor/errors';
import type { LabControl, HostApiHypervisor } from '../../src/hypervisor/host-api-adapter';
import { BLOCK_SIZE, type ReplicaView } from '../../src/hypervisor/port';
import { labControl, labPort, labServerTls } from '../tls';
import { startLabProcess } from './lab-process';
import { allPages, assemble, DR, MiB, PROD, single, smallEstate, until } from './helpers';

const estate = smallEstate({ writeRate: 0 }); // vm1: disks os (4 MiB) and data (2 MiB)
const DISKS = [
  { id: 'os', sizeBytes: 4 * MiB },
  { id: 'data', sizeBytes: 2 * MiB },
];
const src = { host: PROD, vm: 'vm1' };
const rep = { host: DR, replica: 'r1' };
const replicaVm = { host: DR, vm: 'r1' };
const regular = { kind: 'regular', crashConsistent: true };
const protective = { kind: 'failback-protective', crashConsistent: true };

interface Lab {
  port: HostApiHypervisor;
  control: LabControl;
}

const roots: string[] = [];
after(async () => {
  for (const root of roots) await rm(root, { recursive: true, force: true });
});

async function dataDir(): Promise<string> {
  const root = await mkdtemp(join(tmpdir(), 'lab-crash-'));
  roots.push(root);
  await mkdir(join(root, 'data'));
  return join(root, 'data');
}

/** Runs `fn` against an in-process lab on `dir`, then stops it cleanly. */
async function withLab<T>(dir: string, fn: (lab: Lab) => Promise<T>): Promise<T> {
  const running = await startLab({ estate, dataDir: dir, tls: await labServerTls(estate) });
  const lab = { port: labPort(running.url), control: labControl(running.url) };
  try {
    return await fn(lab);
  } finally {
    lab.port.close();
    lab.control.close();
    await running.stop();
  }
}

/** Starts the lab process with the crash hook, makes the call, and checks that the lab died at the hook. */
async function crashInside(dir: string, step: CrashStep, call: (lab: Lab) => Promise<unknown>): Promise<void> {
  const lab = await startLabProcess(estate, dir, step);
  try {
    await assert.rejects(call(lab), (e: unknown) => e instanceof HypervisorError && e.retryable);
    assert.deepEqual(await lab.exited, { code: null, signal: 'SIGKILL' }, `the lab died at ${step}:\n${lab.output()}`);
  } finally {
    await lab.close();
  }
}

async function readReplica(lab: Lab, view: ReplicaView): Promise<Record<string, Buffer>> {
  const out: Record<string, Buffer> = {};
  for (const d of DISKS)
    out[d.id] = await assemble(
      lab.port.readReplicaExtents({ ...rep, disk: d.id }, view, [{ offset: 0, length: d.sizeBytes }]),
      d.sizeBytes,
    );
  return out;
}

function assertSame(actual: Record<string, Buffer>, expected: Record<string, Buffer>, what: string): void {
  for (const d of DISKS) assert.ok(actual[d.id]!.equals(expected[d.id]!), `${what}: disk ${d.id} is exact`);
}

/** A replica with one sealed point p1 of random content; returns that content. */
async function replicaWithPoint(lab: Lab, pointId = 'p1'): Promise<Record<string, Buffer>> {
  await lab.port.createReplica(rep, { sourceVm: 'vm1', disks: DISKS });
  await lab.port.beginRestorePoint(rep, pointId, regular);
  for (const d of DISKS)
    await lab.port.writeRestorePoint({ ...rep, disk: d.id }, pointId, single(0, randomBytes(d.sizeBytes / 2)));
  await lab.port.sealRestorePoint(rep, pointId);
  return readReplica(lab, { pointId });
}

/** Boots the replica, has its guest write blocks on both disks, powers it off; returns the running content. */
async function replicaRanAndWrote(lab: Lab): Promise<Record<string, Buffer>> {
  await lab.port.powerOn(replicaVm);
  await lab.control.guestWrite('r1', 'os', [1, 2, 40, 41]);
  await lab.control.guestWrite('r1', 'data', [3, 30]);
  await lab.port.powerOff(replicaVm);
  return readReplica(lab, { running: true });
}

const layerFiles = async (dir: string, vm: string) => (await readdir(join(dir, 'vms', vm))).sort();

describe('crashes inside multi-file steps, and the same call retried after a restart', () => {
  for (const step of ['seal-running:after-intent', 'seal-running:after-first-rename'] as const)
    test(`sealing the running layer (crash ${step}): the point holds exactly what the replica wrote`, async () => {
      const dir = await dataDir();
      const running = await withLab(dir, async (lab) => {
        await replicaWithPoint(lab);
        return replicaRanAndWrote(lab);
      });
      await crashInside(dir, step, (lab) => lab.port.sealRunningLayer(rep, 'protective', protective));
      await withLab(dir, async (lab) => {
        const point = await lab.port.sealRunningLayer(rep, 'protective', protective);
        assert.deepEqual([point.id, point.sealed, point.kind], ['protective', true, 'failback-protective']);
        assertSame(await readReplica(lab, { pointId: 'protective' }), running, 'the protective point');
        const info = await lab.port.getReplica(rep);
        assert.deepEqual([info.headPointId, info.hasRunningLayer], ['protective', false]);
      });
    });

  test('discarding the running layer (crash between metadata and files): its writes never come back', async () => {
    const dir = await dataDir();
    const p1 = await withLab(dir, async (lab) => {
      const content = await replicaWithPoint(lab);
      await replicaRanAndWrote(lab);
      return content;
    });
    await crashInside(dir, 'discard-running:after-metadata', (lab) => lab.port.discardRunningLayer(rep));
    await withLab(dir, async (lab) => {
      await lab.port.discardRunningLayer(rep);
      assertSame(await readReplica(lab, { running: true }), p1, 'after the discard, the replica');
      await lab.port.powerOn(replicaVm);
      await lab.port.powerOff(replicaVm);
      assertSame(await readReplica(lab, { running: true }), p1, 'powered on again, the replica');
      for (const d of DISKS)
        assert.deepEqual(await allPages((p) => lab.port.listRunningLayerExtents({ ...rep, disk: d.id }, p)), []);
    });
  });

  test('discarding an open point (crash between metadata and files): opened again, it starts empty', async () => {
    const dir = await dataDir();
    const p1 = await withLab(dir, async (lab) => {
      const content = await replicaWithPoint(lab);
      await lab.port.beginRestorePoint(rep, 'p2', regular);
      await lab.port.writeRestorePoint({ ...rep, disk: 'os' }, 'p2', single(0, randomBytes(MiB)));
      return content;
    });
    await crashInside(dir, 'drop-point:after-metadata', (lab) => lab.port.discardRestorePoint(rep, 'p2'));
    await withLab(dir, async (lab) => {
      await lab.port.discardRestorePoint(rep, 'p2');
      assert.deepEqual(
        (await lab.port.listRestorePoints(rep)).map((p) => p.id),
        ['p1'],
      );
      await lab.port.beginRestorePoint(rep, 'p2', regular);
      const p2 = await lab.port.sealRestorePoint(rep, 'p2');
      assert.equal(p2.bytesWritten, 0);
      assertSame(await readReplica(lab, { pointId: 'p2' }), p1, 'p2 opened again');
    });
  });

  test('beginning a point (crash after its files, before its metadata): the files go, the retry is exact', async () => {
    const dir = await dataDir();
    const p1 = await withLab(dir, (lab) => replicaWithPoint(lab));
    await crashInside(dir, 'begin-point:after-files', (lab) => lab.port.beginRestorePoint(rep, 'p2', regular));
    await withLab(dir, async (lab) => {
      assert.deepEqual(
        (await layerFiles(dir, 'r1')).filter((f) => f.startsWith('pt+p2+')),
        [],
        'no leftover files',
      );
      assert.deepEqual(
        (await lab.port.listRestorePoints(rep)).map((p) => p.id),
        ['p1'],
      );
      await lab.port.beginRestorePoint(rep, 'p2', regular);
      const block = randomBytes(BLOCK_SIZE);
      await lab.port.writeRestorePoint({ ...rep, disk: 'data' }, 'p2', single(7 * BLOCK_SIZE, block));
      await lab.port.sealRestorePoint(rep, 'p2');
      const expected = { ...p1, data: Buffer.from(p1.data!) };
      block.copy(expected.data, 7 * BLOCK_SIZE);
      assertSame(await readReplica(lab, { pointId: 'p2' }), expected, 'p2');
    });
  });

  const readDisk = async (lab: Lab) =>
    Buffer.concat(await Promise.all(Array.from({ length: 64 }, (_, b) => lab.control.readBlock('vm1', 'os', b))));
  const readCheckpoint = async (lab: Lab, checkpointId: string) =>
    assemble(lab.port.readExtents({ ...src, disk: 'os' }, checkpointId, [{ offset: 0, length: 4 * MiB }]), 4 * MiB);
  const vmRunning = (lab: Lab) =>
    until(async () => (await lab.port.getVm(src)).powerState === 'Running', 'vm1 runs again');

  test('deleting a checkpoint (crash between metadata and files): made again, it serves one instant', async () => {
    const dir = await dataDir();
    await withLab(dir, async (lab) => {
      await lab.control.guestWrite('vm1', 'os', [0, 1, 2, 3]);
      await lab.port.createCheckpoint(src, 'cp1');
      await lab.control.guestWrite('vm1', 'os', [0, 1, 2, 3, 4]); // cp1's store now holds the older blocks
    });
    await crashInside(dir, 'delete-checkpoint:after-metadata', (lab) => lab.port.deleteCheckpoint(src, 'cp1'));
    await withLab(dir, async (lab) => {
      await lab.port.deleteCheckpoint(src, 'cp1');
      await vmRunning(lab);
      const now = await readDisk(lab);
      await lab.port.createCheckpoint(src, 'cp1');
      await lab.control.guestWrite('vm1', 'os', [0, 5]);
      const cp1 = await readCheckpoint(lab, 'cp1');
      assert.ok(cp1.subarray(0, 64 * BLOCK_SIZE).equals(now), 'the checkpoint is the disk when it was taken');
    });
  });

  test('creating a checkpoint (crash after its files, before its metadata): the retry serves one instant', async () => {
    const dir = await dataDir();
    await withLab(dir, (lab) => lab.control.guestWrite('vm1', 'os', [0, 1, 2, 3]).then(() => undefined));
    await crashInside(dir, 'create-checkpoint:after-files', (lab) => lab.port.createCheckpoint(src, 'cp1'));
    await withLab(dir, async (lab) => {
      await assert.rejects(readCheckpoint(lab, 'cp1'), NotFoundError, 'the crashed checkpoint was never made');
      assert.deepEqual(
        (await layerFiles(dir, 'vm1')).filter((f) => f.startsWith('cp+')),
        [],
        'no leftover files',
      );
      await vmRunning(lab);
      const now = await readDisk(lab);
      await lab.port.createCheckpoint(src, 'cp1');
      await lab.control.guestWrite('vm1', 'os', [1, 2, 6]);
      assert.ok((await readCheckpoint(lab, 'cp1')).subarray(0, 64 * BLOCK_SIZE).equals(now));
    });
  });

  test('powering a replica on (crash after its running layer files): it boots again on a new, empty layer', async () => {
    const dir = await dataDir();
    const p1 = await withLab(dir, (lab) => replicaWithPoint(lab));
    await crashInside(dir, 'power-on:after-running-files', (lab) => lab.port.powerOn(replicaVm));
    await withLab(dir, async (lab) => {
      // It was Starting when the host died: like every VM that was not off, it boots again.
      await until(async () => (await lab.port.getVm(replicaVm)).powerState === 'Running', 'the replica runs');
      await lab.port.powerOff(replicaVm);
      assert.equal((await lab.port.getReplica(rep)).hasRunningLayer, true);
      assertSame(await readReplica(lab, { running: true }), p1, 'the replica');
    });
  });

  test('merging the oldest point (crash after the first disk): the start-up finishes it', async () => {
    const dir = await dataDir();
    const p2 = await withLab(dir, async (lab) => {
      await replicaWithPoint(lab);
      await lab.port.beginRestorePoint(rep, 'p2', regular);
      await lab.port.writeRestorePoint({ ...rep, disk: 'os' }, 'p2', single(MiB, randomBytes(MiB)));
      await lab.port.writeRestorePoint({ ...rep, disk: 'data' }, 'p2', single(0, randomBytes(BLOCK_SIZE)));
      await lab.port.sealRestorePoint(rep, 'p2');
      return readReplica(lab, { pointId: 'p2' });
    });
    await crashInside(dir, 'merge:after-first-disk', (lab) => lab.port.mergeOldestRestorePoint(rep, 'p1'));
    await withLab(dir, async (lab) => {
      await lab.port.mergeOldestRestorePoint(rep, 'p1');
      assert.deepEqual(
        (await lab.port.listRestorePoints(rep)).map((p) => p.id),
        ['p2'],
      );
      assertSame(await readReplica(lab, { pointId: 'p2' }), p2, 'p2');
    });
  });

  test('consolidating (crash after the first disk): the start-up finishes it with the running content', async () => {
    const dir = await dataDir();
    const running = await withLab(dir, async (lab) => {
      await replicaWithPoint(lab);
      return replicaRanAndWrote(lab);
    });
    await crashInside(dir, 'merge:after-first-disk', (lab) => lab.port.consolidateReplica(rep));
    await withLab(dir, async (lab) => {
      const info = await lab.port.consolidateReplica(rep);
      assert.deepEqual([info.consolidated, info.points, info.hasRunningLayer], [true, [], false]);
      assertSame(await readReplica(lab, { running: true }), running, 'the consolidated replica');
    });
  });
});
