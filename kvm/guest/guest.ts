// The tiny test guest built by scripts/install-kvm.sh: how to get it, boot it, follow its serial console and check
// what it wrote. The on-disk format (canary in block 0, data blocks at pseudo-random places) is described in
// init.sh; the functions here mirror it.
import { execFile, execFileSync } from 'node:child_process';
import { open, readFile } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { parseCanary } from '../../agent/canary';
import { projectRoot } from '../../scripts/lib/dev-server';

export { parseCanary };

const execFileAsync = promisify(execFile);

export const installScript = path.join(projectRoot, 'scripts', 'install-kvm.sh');

/** The guest's block size: the canary and every data block are one 4 KiB block. */
export const GUEST_BLOCK_SIZE = 4096;
const DATA_PATTERN = /^PFDATA v1 seq=(\d+) k=(\d+) block=(\d+)\n/;

export interface GuestFiles {
  dir: string;
  kernel: string;
  initrd: string;
}

/**
 * Runs scripts/install-kvm.sh (installs QEMU if missing, builds the guest once; well under a second when done)
 * and returns the guest's directory.
 */
export function ensureGuest(): string {
  let stdout: string;
  try {
    stdout = execFileSync('bash', [installScript], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (err) {
    const stderr = (err as { stderr?: unknown }).stderr;
    const detail = typeof stderr === 'string' ? stderr.trim().split('\n').slice(-15).join('\n') : String(err);
    throw new Error(`${path.relative(projectRoot, installScript)} failed:\n${detail}`, { cause: err });
  }
  const dir = stdout.trim().split('\n').pop();
  if (!dir) throw new Error(`${installScript} printed no guest directory`);
  return dir;
}

export function guestFiles(dir: string = ensureGuest()): GuestFiles {
  return { dir, kernel: path.join(dir, 'vmlinuz'), initrd: path.join(dir, 'initrd.gz') };
}

/** Creates an empty qcow2 disk for the guest (a zeroed disk: the guest starts at sequence number 1). */
export async function createGuestDisk(diskPath: string, size = '64M'): Promise<void> {
  await execFileAsync('qemu-img', ['create', '-q', '-f', 'qcow2', diskPath, size]);
}

export interface GuestWorkload {
  /** Seconds between iterations (pf.pause). Default in the guest 0.2. */
  pauseSeconds?: number;
  /** Data blocks per iteration (pf.blocks). Default in the guest 4. */
  blocksPerIteration?: number;
  /** Print every n-th sequence number on the console (pf.every). Default in the guest 10. */
  printEvery?: number;
}

export function guestKernelCmdline(workload: GuestWorkload = {}): string {
  const words = ['console=ttyS0', 'quiet', 'panic=-1'];
  if (workload.pauseSeconds !== undefined) words.push(`pf.pause=${workload.pauseSeconds}`);
  if (workload.blocksPerIteration !== undefined) words.push(`pf.blocks=${workload.blocksPerIteration}`);
  if (workload.printEvery !== undefined) words.push(`pf.every=${workload.printEvery}`);
  return words.join(' ');
}

export interface GuestMachine {
  files: GuestFiles;
  disk: string;
  diskFormat?: 'qcow2' | 'raw';
  serialLog: string;
  qmpSocket: string;
  /** 'tcg' by default: on this machine kind /dev/kvm exists but hangs guests. Real hosts would pass 'kvm'. */
  accel?: string;
  memoryMiB?: number;
  workload?: GuestWorkload;
  /** Keep QEMU running after the guest powers off (state shutdown), e.g. for a final sync of its disk. */
  noShutdown?: boolean;
}

/** qemu-system-x86_64 arguments that boot the guest with one virtio disk (node disk0, device vblk0). */
export function guestQemuArgs(machine: GuestMachine): string[] {
  const format = machine.diskFormat ?? 'qcow2';
  return [
    ...['-accel', machine.accel ?? 'tcg', '-M', 'q35', '-m', String(machine.memoryMiB ?? 256), '-smp', '1'],
    ...['-nographic', '-nodefaults', '-no-reboot', ...(machine.noShutdown ? ['-no-shutdown'] : [])],
    ...['-serial', `file:${machine.serialLog}`, '-monitor', 'none'],
    ...['-kernel', machine.files.kernel, '-initrd', machine.files.initrd],
    ...['-append', guestKernelCmdline(machine.workload)],
    '-blockdev',
    `driver=${format},node-name=disk0,file.driver=file,file.filename=${machine.disk}`,
    ...['-device', 'virtio-blk-pci,drive=disk0,id=vblk0'],
    ...['-qmp', `unix:${machine.qmpSocket},server=on,wait=off`],
  ];
}

// --- The serial console ---

export type GuestLine =
  | { kind: 'ready'; diskBytes: number; resume: number }
  | { kind: 'seq'; seq: number }
  | { kind: 'clean-shutdown'; seq: number }
  | { kind: 'error'; message: string };

/** The guest's own lines of a serial log, in order (kernel messages and firmware noise are skipped). */
export function parseGuestLog(text: string): GuestLine[] {
  const lines: GuestLine[] = [];
  for (const match of text.matchAll(/pf-guest: ([^\r\n]*)/g)) {
    const body = match[1] ?? '';
    let m: RegExpMatchArray | null;
    if ((m = body.match(/^ready disk=(\d+) resume=(\d+)$/))) {
      lines.push({ kind: 'ready', diskBytes: Number(m[1]), resume: Number(m[2]) });
    } else if ((m = body.match(/^seq=(\d+)$/))) {
      lines.push({ kind: 'seq', seq: Number(m[1]) });
    } else if ((m = body.match(/^clean-shutdown seq=(\d+)$/))) {
      lines.push({ kind: 'clean-shutdown', seq: Number(m[1]) });
    } else if (body.startsWith('error: ')) {
      lines.push({ kind: 'error', message: body.slice('error: '.length) });
    }
  }
  return lines;
}

/**
 * Polls a serial log until `check` returns something other than undefined for the guest's lines so far, and
 * returns that. An error line from the guest rejects at once; so do the timeout and the signal (abort it when QEMU
 * exits, so that a dead guest is not waited for).
 */
export async function waitForGuest<T>(
  serialLog: string,
  check: (lines: GuestLine[]) => T | undefined,
  options: { timeoutMs: number; signal?: AbortSignal; intervalMs?: number },
): Promise<T> {
  const deadline = Date.now() + options.timeoutMs;
  for (;;) {
    const lines = parseGuestLog(await readFile(serialLog, 'utf8').catch(() => ''));
    const failure = lines.find((line) => line.kind === 'error');
    if (failure) throw new Error(`the guest failed: ${failure.message}`);
    const result = check(lines);
    if (result !== undefined) return result;
    if (options.signal?.aborted) {
      throw new Error(
        `stopped waiting for the guest (${describeReason(options.signal.reason)}); serial log so far:\n${await readFile(
          serialLog,
          'utf8',
        ).catch(() => '(none)')}`,
      );
    }
    if (Date.now() > deadline) throw new Error(`the guest did not get there within ${options.timeoutMs} ms`);
    await sleep(options.intervalMs ?? 50);
  }
}

/** What the guest said on a serial log so far; none while the log does not exist (a guest never started). */
export const readGuestLines = (serialLog: string): Promise<GuestLine[]> =>
  waitForGuest(serialLog, (lines) => lines, { timeoutMs: 0 });

/** The last iteration the guest said it wrote. */
export const lastSeq = (lines: GuestLine[]): number | undefined =>
  lines.flatMap((l) => (l.kind === 'seq' ? [l.seq] : [])).at(-1);

export type ReadyLine = Extract<GuestLine, { kind: 'ready' }>;

/** Waits for the guest's first ready line after the log's first `since` lines (it booted), and returns it. */
export const waitForReady = (serialLog: string, since: number, options: { timeoutMs: number }): Promise<ReadyLine> =>
  waitForGuest(serialLog, (lines) => lines.slice(since).find((l): l is ReadyLine => l.kind === 'ready'), options);

/**
 * Waits until the guest said it wrote iteration `n` or a later one, after the log's first `since` lines; returns
 * the last iteration it said.
 */
export const waitForSeq = (
  serialLog: string,
  n: number,
  options: { timeoutMs: number; since?: number },
): Promise<number> =>
  waitForGuest(
    serialLog,
    (lines) => {
      const seq = lastSeq(lines.slice(options.since ?? 0));
      return seq !== undefined && seq >= n ? seq : undefined;
    },
    options,
  );

// --- The disk ---

export interface DiskReadOptions {
  /** Default: qcow2 when the file starts with the qcow2 magic, else raw. */
  format?: 'qcow2' | 'raw';
  /** Read a qcow2 image that a running QEMU holds open (qemu-io -U); the data may be mid-change. */
  forceShare?: boolean;
}

/** The guest's canary: the last iteration whose data is on the disk (0 for a disk it never wrote). */
export async function readCanary(diskPath: string, options: DiskReadOptions = {}): Promise<number> {
  const [block] = await readDisk(diskPath, [{ offset: 0, length: GUEST_BLOCK_SIZE }], options);
  return parseCanary(block ?? Buffer.alloc(0));
}

/** The block numbers iteration `seq` writes, in order (the same arithmetic as init.sh). */
export function guestBlockNumbers(seq: number, diskBytes: number, blocksPerIteration: number): number[] {
  const diskBlocks = BigInt(Math.floor(diskBytes / GUEST_BLOCK_SIZE));
  const numbers: number[] = [];
  for (let k = 0; k < blocksPerIteration; k++) {
    const hash = (BigInt(seq) * 2654435761n + BigInt(k) * 2246822519n) % 4294967296n;
    numbers.push(Number(1n + ((hash / 256n) % (diskBlocks - 1n))));
  }
  return numbers;
}

export interface GuestDataBlock {
  seq: number;
  k: number;
  block: number;
}

/** What a data block says about its writer, or undefined for a block the guest never wrote. */
export function parseDataBlock(block: Buffer): GuestDataBlock | undefined {
  const match = block.subarray(0, 96).toString('latin1').match(DATA_PATTERN);
  if (!match) return undefined;
  return { seq: Number(match[1]), k: Number(match[2]), block: Number(match[3]) };
}

/** Reads guest blocks by number (one qemu-io process for all of them on a qcow2 image). */
export async function readGuestBlocks(
  diskPath: string,
  blockNumbers: number[],
  options: DiskReadOptions = {},
): Promise<Buffer[]> {
  const ranges = blockNumbers.map((n) => ({ offset: n * GUEST_BLOCK_SIZE, length: GUEST_BLOCK_SIZE }));
  return readDisk(diskPath, ranges, options);
}

/** Reads byte ranges of a raw or qcow2 disk image (through qemu-io for qcow2, so backing chains are followed). */
export async function readDisk(
  diskPath: string,
  ranges: { offset: number; length: number }[],
  options: DiskReadOptions = {},
): Promise<Buffer[]> {
  const format = options.format ?? (await sniffFormat(diskPath));
  if (format === 'raw') {
    const file = await open(diskPath, 'r');
    try {
      const buffers: Buffer[] = [];
      for (const { offset, length } of ranges) {
        const buffer = Buffer.alloc(length);
        const { bytesRead } = await file.read(buffer, 0, length, offset);
        buffers.push(buffer.subarray(0, bytesRead));
      }
      return buffers;
    } finally {
      await file.close();
    }
  }
  const args = ['-r', ...(options.forceShare ? ['-U'] : []), '-f', 'qcow2'];
  for (const { offset, length } of ranges) args.push('-c', `read -v ${offset} ${length}`);
  args.push(diskPath);
  const { stdout } = await execFileAsync('qemu-io', args, { maxBuffer: 64 * 1024 * 1024 });
  const dumps = parseQemuIoDumps(stdout);
  return ranges.map(({ offset, length }, i) => {
    const dump = dumps[i];
    if (!dump || dump.offset !== offset || dump.data.length !== length) {
      throw new Error(`qemu-io did not dump ${length} bytes at offset ${offset} of ${diskPath}`);
    }
    return dump.data;
  });
}

async function sniffFormat(diskPath: string): Promise<'qcow2' | 'raw'> {
  const file = await open(diskPath, 'r');
  try {
    const magic = Buffer.alloc(4);
    await file.read(magic, 0, 4, 0);
    return magic.equals(Buffer.from([0x51, 0x46, 0x49, 0xfb])) ? 'qcow2' : 'raw';
  } finally {
    await file.close();
  }
}

// qemu-io's `read -v` prints, for each read, lines of "<hex offset>:  xx xx ... xx  <ascii>" (16 bytes a line),
// then "read <n>/<n> bytes at offset <offset>" and a statistics line.
function parseQemuIoDumps(stdout: string): { offset: number; data: Buffer }[] {
  const dumps: { offset: number; data: Buffer }[] = [];
  let bytes: number[] = [];
  for (const line of stdout.split('\n')) {
    const hex = line.match(/^[0-9a-f]+: {2}((?:[0-9a-f]{2} )+)/);
    if (hex) {
      for (const pair of (hex[1] ?? '').trim().split(' ')) bytes.push(parseInt(pair, 16));
      continue;
    }
    const done = line.match(/^read (\d+)\/\d+ bytes at offset (\d+)/);
    if (done) {
      dumps.push({ offset: Number(done[2]), data: Buffer.from(bytes) });
      bytes = [];
    }
  }
  return dumps;
}

function describeReason(reason: unknown): string {
  return reason instanceof Error ? reason.message : String(reason);
}
