// The fault suite's storage faults on their own, before they meet the agent: the powercut FUSE layer (a disk with a
// volatile cache: what was not fsynced is gone after a cut; names follow ext4's journal) and the small loop-device
// filesystem that the suite fills. Then qcow2 images on the layer under qemu-img and qemu-storage-daemon, as the DR
// host process keeps them: a flushed NBD write survives a cut, an unflushed one does not.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, open, readdir, readFile, rename, rm, stat, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { NbdClient } from '../../agent/nbd/client';
import { exportImage } from '../../agent/storage-daemon';
import { fsyncPath, writeFileAtomic } from '../../src/host-api/persist';
import { chaosTools, LoopFilesystem, PowerCutLayer } from './storage';

const exec = promisify(execFile);
const MiB = 1024 * 1024;

/** Writes a file through the layer, fsynced or not (no directory fsync either way). */
async function put(path: string, data: string, fsync: boolean): Promise<void> {
  const h = await open(path, 'w');
  try {
    await h.writeFile(data);
    if (fsync) await h.sync();
  } finally {
    await h.close();
  }
}

const content = (path: string) => readFile(path, 'utf8').catch((e: NodeJS.ErrnoException) => e.code);

describe('the powercut layer', { concurrency: false }, () => {
  let dir: string;
  let disk: LoopFilesystem;
  let layer: PowerCutLayer;
  let m: string;
  before(async () => {
    const tools = chaosTools();
    dir = await mkdtemp(join(tmpdir(), 'pf-powercut-'));
    disk = await LoopFilesystem.create({ image: join(dir, 'disk.img'), mountPoint: join(dir, 'disk'), sizeMiB: 64 });
    layer = await PowerCutLayer.mount({
      binary: tools.powercut,
      backing: join(disk.mountPoint, 'state'),
      mountPoint: join(dir, 'layer'),
    });
    m = layer.mountPoint;
  });
  after(async () => {
    await layer?.unmount();
    await disk?.unmount();
    await rm(dir, { recursive: true, force: true });
  });

  /** The cut, then the storage back with what was durable. */
  const powerCut = async () => {
    await layer.cut();
    await layer.restore();
  };

  test('a file written and not fsynced is gone after a cut; fsynced, it is kept with its name', async () => {
    await put(join(m, 'synced'), 'kept', true);
    await put(join(m, 'volatile'), 'lost', false);
    assert.equal(await content(join(m, 'volatile')), 'lost', 'read back from the cache before the cut');
    await powerCut();
    assert.equal(await content(join(m, 'volatile')), 'ENOENT');
    assert.equal(await content(join(m, 'synced')), 'kept');
  });

  test('a name committed by a later fsync of another file survives, without the data never fsynced', async () => {
    await put(join(m, 'unsynced'), 'data', false);
    await put(join(m, 'other-synced'), 'o', true);
    await powerCut();
    assert.equal(await content(join(m, 'unsynced')), '', "ext4's zero-length file after a crash");
  });

  test('an overwrite or a truncation not fsynced is undone by a cut', async () => {
    await put(join(m, 'file'), 'old data', true);
    await put(join(m, 'file'), 'new', false);
    const t = join(m, 'truncated');
    await put(t, 'twelve bytes', true);
    const h = await open(t, 'r+');
    await h.truncate(3);
    await h.close();
    assert.equal(await content(join(m, 'file')), 'new');
    assert.equal(await content(t), 'twe');
    await powerCut();
    assert.equal(await content(join(m, 'file')), 'old data');
    assert.equal(await content(t), 'twelve bytes');
  });

  test('after a cut every operation fails (EIO) until the storage comes back', async () => {
    await put(join(m, 'before'), 'x', true);
    await layer.cut();
    await assert.rejects(readFile(join(m, 'before')), { code: 'EIO' });
    await assert.rejects(writeFile(join(m, 'after'), 'y'), { code: 'EIO' });
    await layer.restore();
    assert.equal(await content(join(m, 'before')), 'x');
    assert.equal(await content(join(m, 'after')), 'ENOENT');
  });

  test('rename over a file: lost in a cut unless a journal commit (the directory fsync) came after it', async () => {
    const target = join(m, 'state.json');
    await put(target, 'v1', true);
    await fsyncPath(m);
    // Write, fsync, rename, no directory fsync: the file under its temporary name survives, the rename does not.
    await put(join(m, 'state.json.tmp'), 'v2', true);
    await rename(join(m, 'state.json.tmp'), target);
    assert.equal(await content(target), 'v2');
    await powerCut();
    assert.equal(await content(target), 'v1');
    assert.equal(await content(join(m, 'state.json.tmp')), 'v2');
    // With the directory fsynced after the rename (writeFileAtomic), the new content is what survives.
    await writeFileAtomic(target, 'v3');
    await powerCut();
    assert.equal(await content(target), 'v3');
    assert.deepEqual(
      (await readdir(m)).filter((f) => f.startsWith('state.json.')),
      ['state.json.tmp'],
    );
  });

  test('an fsync of another file commits every name change before it (ext4 commits its whole journal)', async () => {
    await put(join(m, 'a'), 'a', true);
    await rename(join(m, 'a'), join(m, 'b'));
    await unlink(join(m, 'synced'));
    await put(join(m, 'other'), 'o', true);
    await powerCut();
    assert.equal(await content(join(m, 'a')), 'ENOENT');
    assert.equal(await content(join(m, 'b')), 'a');
    assert.equal(await content(join(m, 'synced')), 'ENOENT');
  });

  test('an unlink not committed comes back; a new directory not committed is gone', async () => {
    await put(join(m, 'doomed'), 'd', true);
    await unlink(join(m, 'doomed'));
    await exec('mkdir', [join(m, 'newdir')]);
    await powerCut();
    assert.equal(await content(join(m, 'doomed')), 'd');
    await assert.rejects(stat(join(m, 'newdir')), { code: 'ENOENT' });
  });

  test('the storage full: writes that need new blocks fail with ENOSPC, overwrites go on; freed, all works', async () => {
    const file = join(m, 'grows');
    await put(file, 'a'.repeat(256 * 1024), true);
    const taken = await disk.fill();
    assert.ok(taken > 32 * MiB, `the filler took ${taken} bytes`);
    const h = await open(file, 'r+');
    try {
      // Within the file: no new block needed.
      assert.equal((await h.write(Buffer.alloc(64 * 1024, 0x62), 0, 64 * 1024, 0)).bytesWritten, 64 * 1024);
      await h.sync();
      await assert.rejects(h.write(Buffer.alloc(MiB, 0x63), 0, MiB, 512 * 1024), { code: 'ENOSPC' });
      await disk.free();
      assert.equal((await h.write(Buffer.alloc(MiB, 0x63), 0, MiB, 512 * 1024)).bytesWritten, MiB);
      await h.sync();
    } finally {
      await h.close();
    }
    await powerCut();
    const data = await readFile(file);
    assert.equal(data.length, 512 * 1024 + MiB);
    assert.equal(data[0], 0x62);
    assert.equal(data[100 * 1024], 0x61);
    assert.equal(data[300 * 1024], 0, 'the hole between the old end and the new write');
    assert.equal(data.at(-1), 0x63);
  });

  test('a process of another mount namespace (a private libvirtd) sees the storage come back', async () => {
    await put(join(m, 'shared'), 'seen from the namespace', true);
    const go = join(dir, 'go');
    // A namespace made now holds a copy of the mount: the storage must come back on that copy too.
    const reader = exec('unshare', [
      '-m',
      '--propagation',
      'private',
      'sh',
      '-c',
      `while [ ! -e '${go}' ]; do sleep 0.05; done; cat '${join(m, 'shared')}'`,
    ]);
    await powerCut();
    await writeFile(go, '');
    assert.equal((await reader).stdout, 'seen from the namespace');
  });

  test('qcow2 on the layer: a flushed NBD write into qemu-storage-daemon survives a cut, an unflushed one does not', async () => {
    const image = join(m, 'point.qcow2');
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', image, '16M']);
    await fsyncPath(image);
    await fsyncPath(m);
    const daemon = await exportImage({
      image,
      socket: join(dir, 'point.sock'),
      pidFile: join(dir, 'point.pid'),
      writable: true,
    });
    const nbd = await NbdClient.connect({ path: daemon.socket, exportName: 'disk', metaContexts: [] });
    await nbd.write(1 * MiB, Buffer.alloc(MiB, 0xab));
    await nbd.flush();
    await nbd.write(8 * MiB, Buffer.alloc(MiB, 0xcd)); // acknowledged by the daemon, never flushed
    await layer.cut();
    nbd.destroy();
    await daemon.stop(); // its exit flush fails: the power is gone
    await layer.restore();
    const check = await exec('qemu-img', ['check', image]).then(
      () => 0,
      (e: { code: number }) => e.code,
    );
    assert.ok(check === 0 || check === 3, `qemu-img check: no corruption (leaked clusters at most), exit ${check}`);
    await exec('qemu-io', ['-f', 'qcow2', '-r', '-c', `read -P 0xab ${1 * MiB} ${MiB}`, image]);
    await exec('qemu-io', ['-f', 'qcow2', '-r', '-c', `read -P 0 ${8 * MiB} ${MiB}`, image]);
    // The extent map (qemu-img asks the file's holes with lseek SEEK_DATA, which the layer leaves to the kernel).
    const { stdout } = await exec('qemu-img', ['map', '--output=json', image]);
    const data = (JSON.parse(stdout) as { start: number; length: number; data: boolean }[]).filter((e) => e.data);
    assert.deepEqual(
      data.map((e) => [e.start, e.length]),
      [[1 * MiB, MiB]],
    );
  });
});
