// The tiny guest boots under QEMU, writes its checkable workload, powers off cleanly on the ACPI power button, and
// the next boot resumes from the canary it left.
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import {
  createGuestDisk,
  ensureGuest,
  guestBlockNumbers,
  guestFiles,
  guestQemuArgs,
  parseDataBlock,
  parseGuestLog,
  readCanary,
  readGuestBlocks,
  waitForGuest,
  type GuestFiles,
  type GuestLine,
} from '../../kvm/guest/guest';
import { QmpClient, type QmpStatusInfo } from '../../kvm/qmp';

const BOOT_TIMEOUT_MS = 60_000; // under TCG, on a busy two-core machine
const BLOCKS_PER_ITERATION = 4;

interface RunningGuest {
  qemu: ChildProcess;
  qmp: QmpClient;
  serialLog: string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Aborted when QEMU exits, so that waits on the guest end at once. */
  gone: AbortSignal;
  stderr: () => string;
  bootMs: number;
}

const seqLines = (lines: GuestLine[]) => lines.flatMap((l) => (l.kind === 'seq' ? [l.seq] : []));

describe('the tiny test guest', () => {
  let files: GuestFiles;
  let dir = '';
  let disk = '';
  const guests: RunningGuest[] = [];

  before(async () => {
    files = guestFiles(ensureGuest());
    dir = await mkdtemp(path.join(os.tmpdir(), 'pf-guest-'));
    disk = path.join(dir, 'disk.qcow2');
    await createGuestDisk(disk, '64M');
  });

  after(async () => {
    for (const guest of guests) {
      await guest.qmp.close().catch(() => undefined);
      if (guest.qemu.exitCode === null && guest.qemu.signalCode === null) guest.qemu.kill('SIGKILL');
      await guest.exited;
    }
    await rm(dir, { recursive: true, force: true });
  });

  async function boot(name: string): Promise<RunningGuest> {
    const serialLog = path.join(dir, `${name}.serial.log`);
    const qmpSocket = path.join(dir, `${name}.qmp`);
    const started = Date.now();
    const qemu = spawn(
      'qemu-system-x86_64',
      guestQemuArgs({
        files,
        disk,
        serialLog,
        qmpSocket,
        workload: { pauseSeconds: 0.05, blocksPerIteration: BLOCKS_PER_ITERATION, printEvery: 1 },
      }),
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    let stderr = '';
    qemu.stderr?.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
    const gone = new AbortController();
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
      qemu.on('exit', (code, signal) => {
        gone.abort(new Error(`QEMU exited (code ${code}, signal ${signal}): ${stderr.trim()}`));
        resolve({ code, signal });
      }),
    );
    const qmp = await QmpClient.connect(qmpSocket, { retryForMs: 10_000, signal: gone.signal });
    const guest: RunningGuest = { qemu, qmp, serialLog, exited, gone: gone.signal, stderr: () => stderr, bootMs: 0 };
    guests.push(guest);
    assert.equal((await qmp.execute<QmpStatusInfo>('query-status')).status, 'running');
    await waitForGuest(serialLog, (lines) => lines.find((l) => l.kind === 'ready'), {
      timeoutMs: BOOT_TIMEOUT_MS,
      signal: gone.signal,
    });
    guest.bootMs = Date.now() - started;
    return guest;
  }

  // Presses the ACPI power button and waits for QEMU to exit; returns the last sequence number the guest printed.
  async function powerDown(guest: RunningGuest): Promise<{ lastSeq: number; shutdownMs: number }> {
    const shutdown = guest.qmp.waitForEvent<{ guest: boolean; reason: string }>('SHUTDOWN');
    const started = Date.now();
    await guest.qmp.execute('system_powerdown');
    const event = await shutdown;
    assert.deepEqual(event.data, { guest: true, reason: 'guest-shutdown' });
    const exit = await Promise.race([
      guest.exited,
      new Promise<never>((_, reject) =>
        setTimeout(() => reject(new Error('QEMU did not exit within 20 s of the power button')), 20_000).unref(),
      ),
    ]);
    const shutdownMs = Date.now() - started;
    assert.deepEqual(exit, { code: 0, signal: null }, guest.stderr());
    const lines = parseGuestLog(await readLog(guest.serialLog));
    const last = lines.at(-1);
    if (last?.kind !== 'clean-shutdown')
      assert.fail(`the last line is not the clean-shutdown marker: ${JSON.stringify(last)}`);
    const lastSeq = last.seq;
    assert.equal(Math.max(...seqLines(lines)), lastSeq, 'the marker names the last sequence number printed');
    return { lastSeq, shutdownMs };
  }

  let firstRunLastSeq = 0;

  it('boots, writes, powers off on the ACPI button and leaves the canary at its last sequence number', async (t) => {
    assert.equal(await readCanary(disk), 0, 'a new disk has no canary');
    const guest = await boot('first');
    const ready = parseGuestLog(await readLog(guest.serialLog)).find((l) => l.kind === 'ready');
    assert.deepEqual(ready, { kind: 'ready', diskBytes: 64 * 1024 * 1024, resume: 0 });
    await waitForGuest(guest.serialLog, (lines) => (seqLines(lines).length >= 3 ? true : undefined), {
      timeoutMs: BOOT_TIMEOUT_MS,
      signal: guest.gone,
    });
    const { lastSeq, shutdownMs } = await powerDown(guest);
    t.diagnostic(`boot to ready ${guest.bootMs} ms; power button to QEMU exit ${shutdownMs} ms; last seq ${lastSeq}`);
    assert.deepEqual(
      seqLines(parseGuestLog(await readLog(guest.serialLog))),
      Array.from({ length: lastSeq }, (_, i) => i + 1),
      'a fresh disk starts at 1, and every iteration is printed once',
    );
    assert.equal(await readCanary(disk), lastSeq);

    // The last iteration's data blocks are on the disk, each naming its writer.
    const numbers = guestBlockNumbers(lastSeq, 64 * 1024 * 1024, BLOCKS_PER_ITERATION);
    const blocks = (await readGuestBlocks(disk, numbers)).map(parseDataBlock);
    assert.deepEqual(
      blocks,
      numbers.map((block, k) => ({ seq: lastSeq, k, block })),
    );
    firstRunLastSeq = lastSeq;
  });

  it('resumes from the canary on the next boot', async (t) => {
    assert.ok(firstRunLastSeq > 0, 'the first boot ran');
    const guest = await boot('second');
    await waitForGuest(guest.serialLog, (lines) => (seqLines(lines).length >= 2 ? true : undefined), {
      timeoutMs: BOOT_TIMEOUT_MS,
      signal: guest.gone,
    });
    const { lastSeq, shutdownMs } = await powerDown(guest);
    t.diagnostic(`boot to ready ${guest.bootMs} ms; power button to QEMU exit ${shutdownMs} ms; last seq ${lastSeq}`);
    const lines = parseGuestLog(await readLog(guest.serialLog));
    assert.deepEqual(lines[0], { kind: 'ready', diskBytes: 64 * 1024 * 1024, resume: firstRunLastSeq });
    assert.equal(seqLines(lines)[0], firstRunLastSeq + 1, 'the first iteration after the canary');
    assert.ok(lastSeq > firstRunLastSeq);
    assert.equal(await readCanary(disk), lastSeq);
  });
});

const readLog = (file: string) => readFile(file, 'utf8');
