import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import type { DemoPorts } from './ports';

/** What .data/demo.pid says about the demo that runs on this checkout's state. */
interface DemoRecord {
  pid: number;
  startedAt: string;
  ports: DemoPorts;
  /** The Temporal server it started (detached: it outlives a demo killed with SIGKILL). */
  serverPid?: number;
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * A pid is reused once its process is gone: where /proc tells, its command line must still say what it was (a
 * zombie's is empty, so it counts as gone).
 */
export function runs(pid: number, commandPart: string): boolean {
  if (!alive(pid)) return false;
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(commandPart);
  } catch {
    return true;
  }
}

function read(file: string): DemoRecord | undefined {
  try {
    return JSON.parse(readFileSync(file, 'utf8')) as DemoRecord;
  } catch {
    return undefined;
  }
}

/**
 * One demo at a time on a checkout's state (.data/temporal and .data/lab), whatever ports it uses. The pid file
 * also lets a refusal say that the port is held by this checkout's own demo, and how to stop it.
 */
export class DemoPidFile {
  private record: DemoRecord | undefined;

  constructor(
    private readonly file: string,
    /** Only a server that runs on this checkout's database file counts as the one an earlier demo left. */
    private readonly serverDbFile: string,
  ) {}

  /** Refuses while another demo of this checkout runs; stops a server that a killed one left behind. */
  async claim(ports: DemoPorts, print: (line: string) => void): Promise<void> {
    const earlier = read(this.file);
    if (earlier && earlier.pid !== process.pid && runs(earlier.pid, 'demo.ts')) {
      const { temporal, lab } = earlier.ports;
      throw new Error(
        `Another demo of this checkout is running (pid ${earlier.pid}, since ${earlier.startedAt}; Temporal on port ` +
          `${temporal}, lab on port ${lab}), and two cannot share its state in ${dirname(this.file)}.\n` +
          `Stop it with Ctrl-C in its terminal, or: kill -TERM ${earlier.pid}`,
      );
    }
    if (earlier?.serverPid && runs(earlier.serverPid, this.serverDbFile)) {
      print(
        `Stopping the Temporal server (pid ${earlier.serverPid}) that a killed demo of this checkout left running...`,
      );
      await stopOrphanGroup(earlier.serverPid, this.serverDbFile, 'The Temporal server');
    }
    this.record = { pid: process.pid, startedAt: new Date().toISOString(), ports };
    this.write();
  }

  recordServer(pid: number | undefined): void {
    if (!this.record) return;
    this.record.serverPid = pid;
    this.write();
  }

  /** Removes the file if it is still ours. */
  release(): void {
    if (this.record && read(this.file)?.pid === process.pid) rmSync(this.file, { force: true });
  }

  private write(): void {
    mkdirSync(dirname(this.file), { recursive: true });
    writeFileSync(this.file, `${JSON.stringify(this.record)}\n`);
  }
}

/**
 * Stops a process group that an earlier run started and left behind when it was killed: the group is led by the
 * process, whose command line must still hold the marker (its pid may have been reused).
 */
export async function stopOrphanGroup(pid: number, marker: string, what: string, graceMs = 3_000): Promise<void> {
  const signalGroup = (signal: NodeJS.Signals): void => {
    try {
      process.kill(-pid, signal);
    } catch {
      // Gone already.
    }
  };
  signalGroup('SIGTERM');
  const gone = async (): Promise<boolean> => {
    for (let waited = 0; waited < graceMs; waited += 100) {
      if (!runs(pid, marker)) return true;
      await delay(100);
    }
    return false;
  };
  if (await gone()) return;
  signalGroup('SIGKILL');
  if (!(await gone())) throw new Error(`${what} with pid ${pid} did not stop; stop it with kill -KILL ${pid}.`);
}
