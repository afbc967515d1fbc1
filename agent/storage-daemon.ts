// A qcow2 image (with its backing chain) exported over NBD on a unix socket by a qemu-storage-daemon of its own:
// how the host process writes restore points and reads any point of a chain. The daemon's pid file is also its
// readiness signal, and lets a restarted host process stop a daemon its previous run left behind (it would hold
// the image's lock).
import { spawn } from 'node:child_process';
import { readFile, rm } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';

export interface ImageExport {
  socket: string;
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

async function stopPid(pid: number): Promise<void> {
  if (!alive(pid)) return;
  process.kill(pid, 'SIGTERM');
  for (let i = 0; i < 200 && alive(pid); i++) await sleep(25);
  if (alive(pid)) process.kill(pid, 'SIGKILL');
}

/** Stops the daemon a pid file names, if it still runs. */
export async function stopStaleExport(pidFile: string): Promise<void> {
  const pid = Number((await readFile(pidFile, 'utf8').catch(() => '')).trim());
  if (Number.isInteger(pid) && pid > 0) await stopPid(pid);
  await rm(pidFile, { force: true });
}

export async function exportImage(options: {
  image: string;
  socket: string;
  pidFile: string;
  writable: boolean;
}): Promise<ImageExport> {
  await stopStaleExport(options.pidFile);
  await rm(options.socket, { force: true });
  // A read-only export shares the image (and its chain) with the writer of a point begun on top of it: sealed
  // files never change, so no lock is needed to keep them consistent.
  const shared = options.writable ? '' : ',read-only=on,force-share=on';
  const daemon = spawn(
    'qemu-storage-daemon',
    [
      ...['--blockdev', `driver=file,node-name=file0,filename=${options.image}${shared}`],
      ...['--blockdev', `driver=qcow2,node-name=disk0,file=file0${shared}`],
      ...['--nbd-server', `addr.type=unix,addr.path=${options.socket}`],
      ...['--export', `type=nbd,id=export0,node-name=disk0,name=disk,writable=${options.writable ? 'on' : 'off'}`],
      ...['--pidfile', options.pidFile],
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let stderr = '';
  daemon.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<void>((resolve) => daemon.once('exit', () => resolve()));
  for (let i = 0; i < 400; i++) {
    if (daemon.exitCode !== null) break;
    if ((await readFile(options.pidFile, 'utf8').catch(() => '')).trim() !== '') {
      return {
        socket: options.socket,
        async stop() {
          if (daemon.exitCode === null) daemon.kill('SIGTERM');
          await exited;
          await rm(options.pidFile, { force: true });
        },
      };
    }
    await sleep(25);
  }
  daemon.kill('SIGKILL');
  throw new Error(`qemu-storage-daemon for ${options.image} did not start: ${stderr.trim()}`);
}
