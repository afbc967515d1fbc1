// The agent's export daemons and their pid files (review M4): at start-up the agent stops only a process it can prove
// is the qemu-storage-daemon of that pid file, never whatever process a reused pid now belongs to.
import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { exportImage, isExportDaemon, stopStaleExport } from '../../agent/storage-daemon';
import { exists } from '../../src/host-api/persist';

const exec = promisify(execFile);
const alive = (child: ChildProcess) => child.exitCode === null && child.signalCode === null;

describe('export daemons left by a killed agent', () => {
  let dir: string;
  const children: ChildProcess[] = [];
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'pf-qsd-'));
  });
  after(async () => {
    for (const c of children) c.kill('SIGKILL');
    await rm(dir, { recursive: true, force: true });
  });

  test('a pid file naming an unrelated process: the process runs on, the pid file goes', async () => {
    const unrelated = spawn('sleep', ['60'], { stdio: 'ignore' });
    children.push(unrelated);
    const pidFile = join(dir, 'a.nbd.pid');
    await writeFile(pidFile, `${unrelated.pid}\n`);
    assert.equal(await isExportDaemon(unrelated.pid!, pidFile), false);
    await stopStaleExport(pidFile);
    await new Promise((r) => setTimeout(r, 200));
    assert.ok(alive(unrelated), 'the unrelated process still runs');
    assert.equal(await exists(pidFile), false);
  });

  test('another daemon (another pid file) is not taken for the one a pid file names', async () => {
    const image = join(dir, 'other.qcow2');
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', image, '1M']);
    const other = await exportImage({
      image,
      socket: join(dir, 'other.sock'),
      pidFile: join(dir, 'other.nbd.pid'),
      writable: false,
    });
    try {
      const pid = (await readFile(join(dir, 'other.nbd.pid'), 'utf8')).trim();
      const pidFile = join(dir, 'b.nbd.pid');
      await writeFile(pidFile, `${pid}\n`);
      await stopStaleExport(pidFile);
      assert.equal(other.running, true, 'the daemon of another pid file runs on');
    } finally {
      await other.stop();
    }
    assert.equal(other.running, false);
  });

  test('the daemon a pid file names is stopped; one killed is seen as not running', async () => {
    const image = join(dir, 'own.qcow2');
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', image, '1M']);
    const pidFile = join(dir, 'own.nbd.pid');
    const own = await exportImage({ image, socket: join(dir, 'own.sock'), pidFile, writable: true });
    const pid = Number((await readFile(pidFile, 'utf8')).trim());
    assert.equal(await isExportDaemon(pid, pidFile), true);
    await stopStaleExport(pidFile);
    for (let i = 0; i < 100 && own.running; i++) await new Promise((r) => setTimeout(r, 50));
    assert.equal(own.running, false, 'stopped');
    assert.equal(await exists(pidFile), false);
    await own.stop(); // stopping one already gone is a no-op
  });
});
