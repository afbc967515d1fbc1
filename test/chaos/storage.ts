// The DR host's storage in the fault suite's KVM rounds, as faults can hit it: a small ext4 filesystem of its own on
// a loop device (the suite fills it: "disk full"), and over it the powercut FUSE layer (test/chaos/powercut/), whose
// unflushed writes a simulated power cut drops. Both are built by scripts/install-chaos-tools.sh.
import { execFile, execFileSync, spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { readdir, rm, statfs, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { promisify } from 'node:util';
import { projectRoot } from '../../scripts/lib/dev-server';

const run = promisify(execFile);
const MiB = 1024 * 1024;
/** The files that fill the DR storage: beside the host process's state, never in it. */
const FILLER = 'chaos-filler-';

export interface ChaosTools {
  toxiproxyServer: string;
  powercut: string;
}

/** Runs scripts/install-chaos-tools.sh (builds what is missing; well under a second when done). */
export function chaosTools(): ChaosTools {
  const script = join(projectRoot, 'scripts', 'install-chaos-tools.sh');
  let out: string;
  try {
    out = execFileSync('bash', [script], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (e) {
    const stderr = (e as { stderr?: unknown }).stderr;
    const detail = typeof stderr === 'string' ? stderr.trim() : String(e);
    throw new Error(`scripts/install-chaos-tools.sh failed:\n${detail}`, { cause: e });
  }
  const dir = out.trim().split('\n').pop()!;
  return { toxiproxyServer: join(dir, 'toxiproxy-server'), powercut: join(dir, 'powercut') };
}

/** Waits for a line matching `ready` on the process's stdout; rejects if it exits first. */
function lineFrom(child: ChildProcessWithoutNullStreams, ready: RegExp, what: string, ms = 15_000): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`${what}: nothing after ${ms} ms: ${out}`)), ms);
    const onData = (d: Buffer) => {
      out += d.toString();
      if (ready.test(out)) {
        clearTimeout(timer);
        child.stdout.off('data', onData);
        child.off('exit', onExit);
        resolve();
      }
    };
    const onExit = (code: number | null) => {
      clearTimeout(timer);
      reject(new Error(`${what} exited (${code}): ${out}`));
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    child.once('exit', onExit);
  });
}

const exited = (child: ChildProcessWithoutNullStreams): boolean => child.exitCode !== null || child.signalCode !== null;

/**
 * The powercut layer mounted at `mountPoint` over `backing`: `cut()` is the power cut (every unflushed write gone, every
 * later operation EIO), `restore()` the storage coming back with what was durable.
 */
export class PowerCutLayer {
  private child!: ChildProcessWithoutNullStreams;
  /** Power cuts so far. */
  cuts = 0;

  private constructor(
    private readonly binary: string,
    readonly backing: string,
    readonly mountPoint: string,
  ) {}

  static async mount(options: { binary: string; backing: string; mountPoint: string }): Promise<PowerCutLayer> {
    mkdirSync(options.backing, { recursive: true });
    mkdirSync(options.mountPoint, { recursive: true });
    const layer = new PowerCutLayer(options.binary, options.backing, options.mountPoint);
    await layer.start();
    return layer;
  }

  private async start(): Promise<void> {
    this.child = spawn(this.binary, ['--backing', this.backing, '--mount', this.mountPoint]);
    await lineFrom(this.child, /^ready$/m, `powercut on ${this.mountPoint}`);
  }

  /** The power cut. Whoever still uses the mount gets EIO from now on. */
  async cut(): Promise<void> {
    const done = lineFrom(this.child, /^cut$/m, `powercut on ${this.mountPoint}`, 5_000);
    this.child.kill('SIGUSR1');
    await done;
    this.cuts++;
  }

  /**
   * The storage back after a cut, with what was durable. The mount itself stays: processes in other mount namespaces
   * (a private libvirtd's, and its QEMUs) share it, and would not see a new one.
   */
  async restore(): Promise<void> {
    const done = lineFrom(this.child, /^restored$/m, `powercut on ${this.mountPoint}`, 30_000);
    this.child.kill('SIGUSR2');
    await done;
  }

  private async detach(): Promise<void> {
    await run('umount', ['-l', this.mountPoint]).catch(() => undefined);
    const child = this.child;
    for (let i = 0; i < 100 && !exited(child); i++) await delay(50);
    // Still held open by a process the suite did not kill: its connection is aborted with the process.
    if (!exited(child)) {
      const gone = new Promise((r) => child.once('exit', r));
      child.kill('SIGKILL');
      await gone;
    }
  }

  /** A clean unmount: everything made durable first (unless the power is cut). */
  async unmount(): Promise<void> {
    if (exited(this.child)) return;
    const gone = new Promise((r) => this.child.once('exit', r));
    this.child.kill('SIGTERM');
    await Promise.race([gone, delay(10_000)]);
    await this.detach();
  }
}

/**
 * A small ext4 filesystem of its own on a loop device (no blocks reserved for root: the host process runs as root),
 * mounted at `mountPoint`; `fill()` takes every free block with a filler file, `free()` gives them back.
 */
export class LoopFilesystem {
  private constructor(
    readonly image: string,
    readonly mountPoint: string,
  ) {}

  static async create(options: { image: string; mountPoint: string; sizeMiB: number }): Promise<LoopFilesystem> {
    mkdirSync(options.mountPoint, { recursive: true });
    await run('truncate', ['-s', `${options.sizeMiB}M`, options.image]);
    await run('mkfs.ext4', ['-q', '-F', '-m', '0', '-E', 'nodiscard', options.image]);
    await run('mount', ['-o', 'loop', options.image, options.mountPoint]);
    return new LoopFilesystem(options.image, options.mountPoint);
  }

  async freeBytes(): Promise<number> {
    const s = await statfs(this.mountPoint);
    return s.bavail * s.bsize;
  }

  /** Takes every free block; returns how many bytes that was. */
  async fill(): Promise<number> {
    const before = await this.freeBytes();
    const filler = (name: string) => join(this.mountPoint, `${FILLER}${name}`);
    await run('fallocate', ['-l', String(Math.max(before - MiB, 4096)), filler('0')]).catch(() => undefined);
    // fallocate leaves what its extents' metadata needed: the rest is taken in smaller and smaller files.
    let n = 1;
    for (const size of [64 * 1024, 4096])
      while (
        await writeFile(filler(String(n++)), Buffer.alloc(size)).then(
          () => n < 10_000,
          () => false,
        )
      );
    return before - (await this.freeBytes());
  }

  async free(): Promise<void> {
    for (const f of await readdir(this.mountPoint))
      if (f.startsWith(FILLER)) await rm(join(this.mountPoint, f), { force: true });
    // ext4 hands freed blocks back at its next journal commit: now, not in up to five seconds.
    await run('sync', ['-f', this.mountPoint]);
  }

  async unmount(): Promise<void> {
    await run('umount', [this.mountPoint]).catch(() => run('umount', ['-l', this.mountPoint]));
  }
}
