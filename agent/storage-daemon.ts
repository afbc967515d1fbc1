// A qcow2 image (with its backing chain) exported over NBD on a unix socket by a qemu-storage-daemon of its own:
// how the host process writes restore points and reads any point of a chain. The daemon's pid file is also its
// readiness signal, and lets a restarted host process stop a daemon its previous run left behind (it would hold
// the image's lock), once the process that pid names now is proven to be that daemon.
import { spawn } from 'node:child_process';
import { readFile, rm } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { NbdClient } from './nbd/client';

/**
 * How long the agent waits for any NBD reply (from a daemon of its own or from libvirt's QEMU) before it drops the
 * connection: a hung daemon must not hold a request, and the locks it holds, forever.
 */
export const NBD_REPLY_TIMEOUT_MS = 120_000;

export interface ImageExport {
  socket: string;
  /** False once the daemon exited (killed, crashed or stopped): its export answers nothing any more. */
  readonly running: boolean;
  /** Stops the daemon and waits for it to exit (a writable export flushes on exit). */
  stop(): Promise<void>;
}

const alive = (pid: number): boolean => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

// QEMU's option syntax: a comma inside a value is written twice (an operator's disk path may hold one).
const value = (s: string) => s.replaceAll(',', ',,');

async function stopPid(pid: number): Promise<void> {
  if (!alive(pid)) return;
  process.kill(pid, 'SIGTERM');
  for (let i = 0; i < 200 && alive(pid); i++) await sleep(25);
  if (alive(pid)) process.kill(pid, 'SIGKILL');
}

/**
 * Whether the process `pid` is the qemu-storage-daemon that was started with this pid file: its command line (from
 * /proc) names the program and the pid file. After a reboot, a pid a dead daemon's file names can be anyone's.
 */
export async function isExportDaemon(pid: number, pidFile: string): Promise<boolean> {
  const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
  const argv = cmdline.split('\0');
  const program = argv[0]?.split('/').at(-1);
  return program === 'qemu-storage-daemon' && argv.some((a, i) => a === pidFile && argv[i - 1] === '--pidfile');
}

/** Stops the daemon a pid file names, if it still runs and is proven to be that daemon; the pid file goes. */
export async function stopStaleExport(pidFile: string): Promise<void> {
  const pid = Number((await readFile(pidFile, 'utf8').catch(() => '')).trim());
  if (Number.isInteger(pid) && pid > 0 && (await isExportDaemon(pid, pidFile))) await stopPid(pid);
  await rm(pidFile, { force: true });
}

export interface ImageExportOptions {
  image: string;
  socket: string;
  pidFile: string;
  writable: boolean;
  /**
   * A read-only export that keeps writers out (a powered-off domain's image read for a view: its domain cannot start
   * meanwhile). Without it a read-only export shares the image with writers.
   */
  excludeWriters?: boolean;
  /** Dirty bitmaps of the image to export as `qemu:dirty-bitmap:<name>` meta contexts. */
  bitmaps?: readonly string[];
}

export async function exportImage(options: ImageExportOptions): Promise<ImageExport> {
  await stopStaleExport(options.pidFile);
  await rm(options.socket, { force: true });
  // A read-only export shares the image (and its chain) with the writer of a point begun on top of it: sealed
  // files never change, so no lock is needed to keep them consistent.
  const shared = options.writable ? '' : options.excludeWriters ? ',read-only=on' : ',read-only=on,force-share=on';
  const bitmaps = (options.bitmaps ?? []).map((b, i) => `,bitmaps.${i}=${value(b)}`).join('');
  const daemon = spawn(
    'qemu-storage-daemon',
    [
      ...['--blockdev', `driver=file,node-name=file0,filename=${value(options.image)}${shared}`],
      ...['--blockdev', `driver=qcow2,node-name=disk0,file=file0${shared}`],
      ...['--nbd-server', `addr.type=unix,addr.path=${value(options.socket)}`],
      ...[
        '--export',
        `type=nbd,id=export0,node-name=disk0,name=disk,writable=${options.writable ? 'on' : 'off'}${bitmaps}`,
      ],
      ...['--pidfile', options.pidFile],
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let stderr = '';
  daemon.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<void>((resolve) => daemon.once('exit', () => resolve()));
  for (let i = 0; i < 400; i++) {
    if (daemon.exitCode !== null || daemon.signalCode !== null) break;
    if ((await readFile(options.pidFile, 'utf8').catch(() => '')).trim() !== '') {
      return {
        socket: options.socket,
        get running() {
          return daemon.exitCode === null && daemon.signalCode === null;
        },
        async stop() {
          if (daemon.exitCode === null && daemon.signalCode === null) daemon.kill('SIGTERM');
          await exited;
          // Another daemon of the same image may have been started since: its pid file is its own.
          const named = (await readFile(options.pidFile, 'utf8').catch(() => '')).trim();
          if (named === '' || named === String(daemon.pid)) await rm(options.pidFile, { force: true });
        },
      };
    }
    await sleep(25);
  }
  daemon.kill('SIGKILL');
  throw new Error(`qemu-storage-daemon for ${options.image} did not start: ${stderr.trim()}`);
}

/** An image exported by a daemon of its own, and our NBD connection to it (the daemon stopped if we cannot connect). */
export async function connectImageExport(
  options: ImageExportOptions,
): Promise<{ daemon: ImageExport; nbd: NbdClient }> {
  const daemon = await exportImage(options);
  try {
    const nbd = await NbdClient.connect({
      path: options.socket,
      exportName: 'disk',
      metaContexts: [],
      replyTimeoutMs: NBD_REPLY_TIMEOUT_MS,
    });
    return { daemon, nbd };
  } catch (e) {
    await daemon.stop();
    throw e;
  }
}
