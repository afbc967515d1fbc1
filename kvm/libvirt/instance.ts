// A private libvirt "host" on this machine: its own libvirtd and virtlogd in a mount namespace of their own, with
// /run/libvirt, /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt and /etc/libvirt bound to a directory.
// Tests and the demo start two, a production and a DR host, so that nothing works only because both sides share one
// daemon; each is reached by its own connection URI, as a remote host would be.
import { spawnSync } from 'node:child_process';
import { copyFileSync, cpSync, existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { projectRoot } from '../../scripts/lib/dev-server';
import { Virsh } from '../../agent/libvirt/virsh';

/** Where tests, benchmarks and the demo keep libvirt's QEMU capability probe between instances. */
export const CAPABILITIES_CACHE = join(projectRoot, '.cache', 'libvirt-capabilities');

const BOUND = ['run', 'lib', 'cache', 'log', 'etc'] as const;
const MOUNT_POINTS: Record<(typeof BOUND)[number], string> = {
  run: '/run/libvirt',
  lib: '/var/lib/libvirt',
  cache: '/var/cache/libvirt',
  log: '/var/log/libvirt',
  etc: '/etc/libvirt',
};

// QEMU runs as root without libvirt's relabelling and private /dev: a test host has no separate users to protect,
// and the guests' files stay ours to read after they stop.
const QEMU_CONF = `
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
namespaces = [ ]
security_driver = "none"
`;

export interface LibvirtInstanceOptions {
  /** Where its state lives; created when missing, reused when present (its domains and checkpoints survive). */
  dir: string;
  /**
   * A directory that keeps libvirt's QEMU capability probe between instances: the first start of a fresh instance
   * probes QEMU for about 8 s, later ones read the cache.
   */
  capabilitiesCache?: string;
  /** How long to wait for the daemon's socket. Default 30 s. */
  startTimeoutMs?: number;
}

function run(command: string, args: string[]): void {
  const r = spawnSync(command, args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${command} ${args.join(' ')} failed: ${(r.stderr || r.stdout || '').trim()}`);
}

const pidIn = (file: string): number | undefined => {
  try {
    const pid = Number(readFileSync(file, 'utf8').trim());
    return Number.isInteger(pid) && pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
};

const alive = (pid: number | undefined): pid is number => {
  if (pid === undefined) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

async function stopProcess(pid: number | undefined, graceMs: number): Promise<void> {
  if (!alive(pid)) return;
  process.kill(pid, 'SIGTERM');
  for (const until = Date.now() + graceMs; Date.now() < until && alive(pid);) await sleep(50);
  if (alive(pid)) process.kill(pid, 'SIGKILL');
}

export class LibvirtInstance {
  readonly virsh: Virsh;

  private constructor(
    readonly dir: string,
    readonly uri: string,
  ) {
    this.virsh = new Virsh(uri);
  }

  static async start(options: LibvirtInstanceOptions): Promise<LibvirtInstance> {
    const { dir } = options;
    for (const d of BOUND) mkdirSync(join(dir, d), { recursive: true });
    if (!existsSync(join(dir, 'etc', 'qemu.conf'))) {
      cpSync('/etc/libvirt', join(dir, 'etc'), { recursive: true });
      writeFileSync(join(dir, 'etc', 'qemu.conf'), readFileSync(join(dir, 'etc', 'qemu.conf'), 'utf8') + QEMU_CONF);
    }
    const caps = join(dir, 'cache', 'qemu', 'capabilities');
    if (options.capabilitiesCache && existsSync(options.capabilitiesCache)) {
      mkdirSync(caps, { recursive: true });
      for (const f of readdirSync(options.capabilitiesCache))
        copyFileSync(join(options.capabilitiesCache, f), join(caps, f));
    }
    for (const m of Object.values(MOUNT_POINTS)) mkdirSync(m, { recursive: true });
    const instance = new LibvirtInstance(dir, `qemu+unix:///system?socket=${join(dir, 'run', 'libvirt-sock')}`);
    const binds = BOUND.map((d) => `mount --bind '${join(dir, d)}' '${MOUNT_POINTS[d]}'`).join(' && ');
    // The namespace lives as long as its daemons: virtlogd holds it while libvirtd is restarted (nsenter).
    run('unshare', [
      '-m',
      '--propagation',
      'private',
      'sh',
      '-c',
      `${binds} && virtlogd -d -p '${instance.virtlogdPidFile}' && ${instance.libvirtdCommand()}`,
    ]);
    await instance.waitReady(options.startTimeoutMs ?? 30_000);
    if (options.capabilitiesCache && existsSync(caps)) {
      mkdirSync(options.capabilitiesCache, { recursive: true });
      for (const f of readdirSync(caps)) copyFileSync(join(caps, f), join(options.capabilitiesCache, f));
    }
    return instance;
  }

  private get libvirtdPidFile(): string {
    return join(this.dir, 'run', 'libvirtd.pid');
  }

  private get virtlogdPidFile(): string {
    return join(this.dir, 'run', 'virtlogd.pid');
  }

  private libvirtdCommand(): string {
    return `libvirtd -d -p '${this.libvirtdPidFile}'`;
  }

  private async waitReady(timeoutMs: number): Promise<void> {
    let last: unknown;
    for (const until = Date.now() + timeoutMs; Date.now() < until; await sleep(100)) {
      try {
        // domcapabilities waits for the QEMU probe, so the first real call afterwards is fast.
        await this.virsh.run(['domcapabilities', '--virttype', 'qemu'], { timeoutMs: 20_000 });
        return;
      } catch (e) {
        last = e;
      }
    }
    throw new Error(`libvirtd in ${this.dir} did not answer within ${timeoutMs} ms: ${String(last)}`);
  }

  /** Pids of the QEMU processes this instance's libvirtd started (they outlive libvirtd). */
  qemuPids(): number[] {
    const dir = join(this.dir, 'run', 'qemu');
    if (!existsSync(dir)) return [];
    return readdirSync(dir)
      .filter((f) => f.endsWith('.pid') && f !== 'driver.pid') // driver.pid is libvirtd's own
      .map((f) => pidIn(join(dir, f)))
      .filter(alive);
  }

  /** Restarts only libvirtd, as an operator's package upgrade would; running guests and backup jobs go on. */
  async restartDaemon(): Promise<void> {
    await this.stopDaemon();
    await this.startDaemon();
  }

  /** Stops only libvirtd (a host whose libvirt is down): running guests go on, every libvirt call fails. */
  async stopDaemon(): Promise<void> {
    await stopProcess(pidIn(this.libvirtdPidFile), 10_000);
  }

  /** Starts libvirtd again after stopDaemon, in the instance's namespace, and waits until it answers. */
  async startDaemon(): Promise<void> {
    const holder = pidIn(this.virtlogdPidFile);
    if (!alive(holder)) throw new Error(`libvirt instance in ${this.dir}: virtlogd is gone, start the instance again`);
    run('nsenter', ['-t', String(holder), '-m', 'sh', '-c', this.libvirtdCommand()]);
    await this.waitReady(30_000);
  }

  /** Stops the guests (SIGTERM, so their persistent bitmaps stay valid), then libvirtd and virtlogd. */
  async stop(): Promise<void> {
    await Promise.all(this.qemuPids().map((pid) => stopProcess(pid, 5_000)));
    await stopProcess(pidIn(this.libvirtdPidFile), 10_000);
    await stopProcess(pidIn(this.virtlogdPidFile), 5_000);
  }
}
