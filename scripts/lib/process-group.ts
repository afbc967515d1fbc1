import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { setTimeout as delay } from 'node:timers/promises';

/** A long-running program that our process started, in a process group of its own. */
export interface ProcessGroup {
  process: ChildProcess;
  pid: number;
  /** Resolves with the exit code (null after a signal) once the program has exited. */
  exited: Promise<number | null>;
  /** Whether it has exited already. */
  readonly done: boolean;
  signal(signal: NodeJS.Signals): void;
  /** The stop signal, then SIGKILL if it is still there after the grace. */
  stop(graceMs: number, signal?: NodeJS.Signals): Promise<void>;
}

/**
 * Starts a program in a process group of its own: Ctrl-C in the terminal reaches only our process, which stops
 * what it started in order (workers first, servers last, the database at the very end) instead of everything dying
 * at once. Detached, it would outlive us: whatever way our process exits, the group is killed with it.
 */
export function spawnProcessGroup(command: string, args: string[], options: SpawnOptions): ProcessGroup {
  const child = spawn(command, args, { ...options, detached: true });
  const exited = new Promise<number | null>((resolveExit) => {
    child.once('exit', (code) => resolveExit(code));
    // A program that cannot start at all (ENOENT, EACCES) emits only 'error'.
    child.once('error', () => resolveExit(127));
  });
  let done = false;
  const signal = (sig: NodeJS.Signals): void => {
    if (done || child.pid === undefined) return;
    try {
      process.kill(-child.pid, sig);
    } catch {
      // The group is gone already.
    }
  };
  const killOnExit = (): void => signal('SIGKILL');
  process.once('exit', killOnExit);
  void exited.then(() => {
    done = true;
    process.off('exit', killOnExit);
  });
  return {
    process: child,
    pid: child.pid ?? -1,
    exited,
    get done() {
      return done;
    },
    signal,
    async stop(graceMs, stopSignal = 'SIGTERM') {
      signal(stopSignal);
      const stopped = await Promise.race([exited.then(() => true), delay(graceMs).then(() => false)]);
      if (!stopped) {
        signal('SIGKILL');
        await exited;
      }
    },
  };
}
