// The QMP client against a real qemu-storage-daemon: the same QMP server (and block layer) as in QEMU itself.
import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import {
  QmpClient,
  QmpConnectionError,
  QmpError,
  type QmpBlockDeviceInfo,
  type QmpBlockExportInfo,
  type QmpDirtyBitmapInfo,
  type QmpEvent,
} from '../../kvm/qmp';
import { ensureGuest } from '../../kvm/guest/guest';

const execFileAsync = promisify(execFile);

interface Daemon {
  process: ChildProcess;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  stderr: () => string;
}

// A daemon with one qcow2 node "disk0" exported over NBD as "exp0", and a QMP monitor on qmp.sock.
async function startDaemon(dir: string): Promise<{ daemon: Daemon; qmp: QmpClient }> {
  const image = path.join(dir, 'disk.qcow2');
  await execFileAsync('qemu-img', ['create', '-q', '-f', 'qcow2', image, '64M']);
  const qmpSocket = path.join(dir, 'qmp.sock');
  const child = spawn(
    'qemu-storage-daemon',
    [
      ...['--blockdev', `driver=qcow2,node-name=disk0,file.driver=file,file.filename=${image}`],
      ...['--nbd-server', `addr.type=unix,addr.path=${path.join(dir, 'nbd.sock')}`],
      ...['--export', 'type=nbd,id=exp0,node-name=disk0,name=disk0'],
      ...['--chardev', `socket,id=m,path=${qmpSocket},server=on,wait=off`, '--monitor', 'chardev=m'],
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let stderr = '';
  child.stderr?.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.on('exit', (code, signal) => resolve({ code, signal })),
  );
  const daemon = { process: child, exited, stderr: () => stderr };
  const qmp = await QmpClient.connect(qmpSocket, { retryForMs: 10_000 });
  return { daemon, qmp };
}

function stopDaemon(daemon: Daemon | undefined): void {
  if (daemon && daemon.process.exitCode === null && daemon.process.signalCode === null) daemon.process.kill('SIGKILL');
}

async function bitmapsOf(qmp: QmpClient, node: string): Promise<Record<string, QmpDirtyBitmapInfo>> {
  const nodes = await qmp.execute<QmpBlockDeviceInfo[]>('query-named-block-nodes');
  const info = nodes.find((n) => n['node-name'] === node);
  assert.ok(info, `node ${node} exists`);
  return Object.fromEntries((info['dirty-bitmaps'] ?? []).map((b): [string, QmpDirtyBitmapInfo] => [b.name ?? '', b]));
}

async function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const limit = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([promise, limit]);
  } finally {
    clearTimeout(timer);
  }
}

// QEMU's tools come with the KVM side's install (a fresh machine has none).
before(() => {
  ensureGuest();
});

describe('QMP client against qemu-storage-daemon', () => {
  let dir = '';
  let daemon: Daemon | undefined;
  let qmp: QmpClient;

  before(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'pf-qmp-'));
    ({ daemon, qmp } = await startDaemon(dir));
  });

  after(async () => {
    await qmp?.close();
    stopDaemon(daemon);
    await daemon?.exited;
    await rm(dir, { recursive: true, force: true });
  });

  it('reads the greeting and negotiates capabilities', async () => {
    assert.equal(qmp.greeting.QMP.version.qemu.major >= 7, true);
    assert.ok(Array.isArray(qmp.greeting.QMP.capabilities));
    // A command that exists only after negotiation answers.
    const commands = await qmp.execute<{ name: string }[]>('query-commands');
    assert.ok(commands.some((c) => c.name === 'block-dirty-bitmap-add'));
  });

  it('lists the block exports and named block nodes', async () => {
    const exports = await qmp.execute<QmpBlockExportInfo[]>('query-block-exports');
    assert.deepEqual(exports, [{ id: 'exp0', type: 'nbd', 'node-name': 'disk0', 'shutting-down': false }]);
    const nodes = await qmp.execute<QmpBlockDeviceInfo[]>('query-named-block-nodes');
    const disk = nodes.find((n) => n['node-name'] === 'disk0');
    assert.equal(disk?.drv, 'qcow2');
    assert.equal(disk?.image['virtual-size'], 64 * 1024 * 1024);
    assert.ok(
      nodes.some((n) => n.drv === 'file'),
      'the qcow2 node sits on a file node',
    );
  });

  it('adds a persistent bitmap, then in one transaction adds the next and disables the first', async () => {
    await qmp.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'cp1', persistent: true });
    let bitmaps = await bitmapsOf(qmp, 'disk0');
    assert.equal(bitmaps.cp1?.recording, true);
    assert.equal(bitmaps.cp1?.persistent, true);

    await qmp.transaction([
      { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 'cp2', persistent: true } },
      { type: 'block-dirty-bitmap-disable', data: { node: 'disk0', name: 'cp1' } },
    ]);
    bitmaps = await bitmapsOf(qmp, 'disk0');
    assert.equal(bitmaps.cp1?.recording, false);
    assert.equal(bitmaps.cp2?.recording, true);
    assert.equal(bitmaps.cp2?.persistent, true);
  });

  it('rolls a transaction back when one of its actions fails', async () => {
    await assert.rejects(
      qmp.transaction([
        { type: 'block-dirty-bitmap-add', data: { node: 'disk0', name: 'cp3', persistent: true } },
        { type: 'block-dirty-bitmap-disable', data: { node: 'disk0', name: 'no-such-bitmap' } },
      ]),
      (err) => err instanceof QmpError && err.command === 'transaction' && /no-such-bitmap/.test(err.desc),
    );
    assert.equal((await bitmapsOf(qmp, 'disk0')).cp3, undefined);
  });

  it('reports an unknown node as a QmpError with its class, desc and command', async () => {
    const failure = await qmp.execute('block-dirty-bitmap-add', { node: 'no-such-node', name: 'x' }).then(
      () => undefined,
      (err: unknown) => err,
    );
    assert.ok(failure instanceof QmpError);
    assert.equal(failure.errorClass, 'GenericError');
    assert.equal(failure.command, 'block-dirty-bitmap-add');
    assert.match(failure.desc, /no-such-node/);
    assert.match(failure.message, /block-dirty-bitmap-add/);
    // The connection is still usable after an error.
    assert.deepEqual(await qmp.execute('query-block-jobs'), []);
  });

  it('reports an unknown command as CommandNotFound', async () => {
    await assert.rejects(
      qmp.execute('no-such-command'),
      (err) => err instanceof QmpError && err.errorClass === 'CommandNotFound',
    );
  });

  it('delivers events to listeners and to waitForEvent', async () => {
    const seen: QmpEvent[] = [];
    const unsubscribe = qmp.on('*', (event) => seen.push(event));
    const deleted = qmp.waitForEvent<{ id: string }>('BLOCK_EXPORT_DELETED', (e) => e.data.id === 'exp0', {
      timeoutMs: 10_000,
    });
    await qmp.execute('block-export-del', { id: 'exp0' });
    const event = await deleted;
    unsubscribe();
    assert.equal(event.data.id, 'exp0');
    assert.ok(event.timestamp.seconds > 0);
    assert.ok(seen.some((e) => e.event === 'BLOCK_EXPORT_DELETED'));
    assert.deepEqual(await qmp.execute('query-block-exports'), []);
  });

  it('sees the daemon exit 0 on quit, with both bitmaps stored in the image', async () => {
    await qmp.execute('quit');
    const reason = await withTimeout(qmp.closed, 10_000, 'the QMP connection ending after quit');
    assert.ok(reason instanceof QmpConnectionError);
    assert.equal(qmp.isClosed, true);
    assert.deepEqual(await withTimeout(daemon!.exited, 10_000, 'the daemon exiting'), { code: 0, signal: null });
    await assert.rejects(qmp.execute('query-status'), QmpConnectionError);

    const { stdout } = await execFileAsync('qemu-img', ['info', '--output=json', path.join(dir, 'disk.qcow2')]);
    const info = JSON.parse(stdout) as {
      'format-specific': { data: { bitmaps?: { name: string; flags: string[] }[] } };
    };
    const stored = Object.fromEntries(
      (info['format-specific'].data.bitmaps ?? []).map((b): [string, string[]] => [b.name, b.flags]),
    );
    assert.deepEqual(stored, { cp1: [], cp2: ['auto'] }, 'cp1 stored disabled, cp2 enabled');
  });
});

describe('QMP client when the daemon dies', () => {
  let dir = '';
  let daemon: Daemon | undefined;

  before(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'pf-qmp-kill-'));
  });

  after(async () => {
    stopDaemon(daemon);
    await daemon?.exited;
    await rm(dir, { recursive: true, force: true });
  });

  it('rejects pending and later commands with QmpConnectionError', async () => {
    const started = await startDaemon(dir);
    daemon = started.daemon;
    const qmp = started.qmp;
    // A stopped daemon cannot answer, so the command is certainly still pending when the daemon is killed.
    daemon.process.kill('SIGSTOP');
    const pending = qmp.execute('query-block-exports');
    const event = qmp.waitForEvent('SHUTDOWN');
    daemon.process.kill('SIGKILL');
    await assert.rejects(
      withTimeout(pending, 10_000, 'the pending command'),
      (err) =>
        err instanceof QmpConnectionError && err.command === 'query-block-exports' && /no reply/.test(err.message),
    );
    await assert.rejects(event, QmpConnectionError);
    await assert.rejects(qmp.execute('query-status'), QmpConnectionError);
    assert.equal((await daemon.exited).signal, 'SIGKILL');
    await qmp.close(); // closing an ended connection is harmless
  });
});
