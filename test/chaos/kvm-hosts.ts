// Two KVM hosts as the suite's hosts: each a private libvirt instance of this machine (its own libvirtd) with our host
// process (`npm run kvm-host`, a process of its own that a fault can kill), three tiny real guests writing on the
// production host. The DR host process keeps its state (replicas' qcow2 chains, host-state.json) on the DR storage: a
// small ext4 on a loop device, seen through the powercut layer. The workers reach each host process through
// Toxiproxy and the recorder. The faults only a real host suffers: either host process SIGKILLed, a
// qemu-storage-daemon SIGKILLed, a production guest's QEMU SIGKILLed, libvirtd restarted, the DR storage full, the
// connection between the workers and a host cut or stalled mid-transfer, and the DR host's power cut (its storage
// loses what was not flushed; its host process, storage daemons and replicas die with it, and come back).
import { mkdirSync, writeFileSync } from 'node:fs';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { parseGuestLog, readCanary, type GuestLine } from '../../kvm/guest/guest';
import { CAPABILITIES_CACHE, LibvirtInstance } from '../../kvm/libvirt/instance';
import { lines } from '../../agent/libvirt/virsh';
import { freePort } from '../../scripts/lib/dev-server';
import { connectHypervisor } from '../../src/config/hypervisor';
import { parseConfiguration } from '../../src/config/load';
import type { ReplicaView } from '../../src/contract';
import type { HypervisorPort } from '../../src/hypervisor/port';
import type { ClosablePort } from '../../src/hypervisor/routed';
import { replicaNameOf } from '../../src/activities/inventory';
import { defineTestGuest, kvmHostArgs, KVM_HOST_LISTENING } from '../kvm/helpers';
import { testServerTls } from '../tls';
import { chaosConfiguration, KVM_ESTATE, KVM_GUEST_DISK_BYTES, vmsOf } from './estate';
import {
  KVM_FAULTS,
  SUITE_FAULTS,
  type ChaosHosts,
  type FaultContext,
  type HostCheckContext,
  type HostFaultKind,
} from './hosts';
import { digestOf, imageFileBytes } from './images';
import { ManagedProcess } from './processes';
import type { Upstream } from './recorder';
import { chaosTools, LoopFilesystem, PowerCutLayer, type ChaosTools } from './storage';
import { Toxiproxy, type Toxic } from './toxiproxy';

const MiB = 1024 * 1024;
/** The guests write two blocks and their canary five times a second, and say every sequence number. */
const GUEST_WORKLOAD = { pauseSeconds: 0.2, blocksPerIteration: 2, printEvery: 1 };
/** The DR storage: room for every replica's chain with its points, and for the filler to take. */
const DR_STORAGE_MIB = 1024;
const REPLICA_SUFFIX = replicaNameOf('');
const READY_TIMEOUT_MS = 90_000;

interface KvmHost {
  name: string;
  role: 'production' | 'dr';
  stateDir: string;
  url: string;
  libvirt: LibvirtInstance;
  agent: ManagedProcess;
}

interface StorageDaemon {
  pid: number;
  ppid: number;
  pidFile: string;
  /** It exports a point being written (not a read-only view). */
  writable: boolean;
}

/** Every qemu-storage-daemon of this machine that names a pid file (ours always do), with its parent. */
async function storageDaemons(): Promise<StorageDaemon[]> {
  const out: StorageDaemon[] = [];
  for (const entry of await readdir('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const argv = (await readFile(`/proc/${entry}/cmdline`, 'utf8').catch(() => '')).split('\0');
    if (argv[0]?.split('/').at(-1) !== 'qemu-storage-daemon') continue;
    const pidFile = argv[argv.indexOf('--pidfile') + 1];
    if (!argv.includes('--pidfile') || !pidFile) continue;
    const stat = await readFile(`/proc/${entry}/stat`, 'utf8').catch(() => '');
    const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
    out.push({ pid: Number(entry), ppid, pidFile, writable: argv.some((a) => a.includes('writable=on')) });
  }
  return out;
}

const kill = (pid: number): void => {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // Gone already.
  }
};

/** The last sequence number the guest's lines say is on its disk: its last write, or where it resumed. */
function durableSeq(guestLines: GuestLine[]): number | undefined {
  for (let i = guestLines.length - 1; i >= 0; i--) {
    const l = guestLines[i]!;
    if (l.kind === 'seq' || l.kind === 'clean-shutdown') return l.seq;
    if (l.kind === 'ready') return l.resume;
  }
  return undefined;
}

const readLines = async (log: string): Promise<GuestLine[]> =>
  parseGuestLog(await readFile(log, 'utf8').catch(() => ''));

/** The first line a guest says after `since` lines that it booted (its canary), or undefined if it fails or never does. */
async function readyAfter(log: string, since: number, timeoutMs: number): Promise<number | undefined> {
  for (const end = Date.now() + timeoutMs; Date.now() < end; await delay(250)) {
    const after = (await readLines(log)).slice(since);
    for (const l of after) {
      if (l.kind === 'ready') return l.resume;
      if (l.kind === 'error') return undefined;
    }
  }
  return undefined;
}

export class KvmHosts implements ChaosHosts {
  readonly estate = KVM_ESTATE;
  readonly faultKinds = [...SUITE_FAULTS, ...KVM_FAULTS];
  // Real guests take seconds to stop, copy and boot: the faults spread over more of the round, which runs longer.
  readonly timing = { faultWindowMs: 15_000, runForMs: 40_000 };
  private port: ClosablePort | undefined;
  private prod!: KvmHost;
  private dr!: KvmHost;
  private tools!: ChaosTools;
  private storage!: LoopFilesystem;
  private layer!: PowerCutLayer;
  private toxiproxy!: Toxiproxy;
  /** What close() undoes, last first (also after a start that failed half-way). */
  private readonly stops: (() => Promise<void>)[] = [];
  private storageFull = false;
  /** Set by close(): nothing is started again, however a round that runs on asks. */
  private closing = false;

  // What this round's faults did, for the operator afterwards and for the checks.
  /** Production VMs whose QEMU the suite killed. */
  private readonly crashed = new Set<string>();
  /** Replicas a DR power cut stopped, with the last sequence number their guest said was on its disk before it. */
  private readonly cutStopped = new Map<string, number>();
  /** The replica's guest's first boot after the round's first power-on of it: where it resumed. */
  private readonly firstBoot = new Map<string, number>();
  /** Guests being followed after a power-on, until they say they booted. */
  private readonly watching: Promise<void>[] = [];
  /** Comparisons made as things happened; the round's checks collect them. */
  private readonly results: { name: string; ok: boolean; detail: string }[] = [];
  /** Power cuts already answered by comparing every point again. */
  private cutsChecked = 0;

  constructor(private readonly o: { workDir: string; log: (line: string) => void }) {}

  get direct(): ClosablePort {
    if (!this.port) throw new Error('the KVM hosts are not started');
    return this.port;
  }

  private imageOf(vm: string): string {
    return join(this.o.workDir, 'prod', `${vm}.qcow2`);
  }

  private serialOf(vm: string): string {
    return join(this.o.workDir, 'prod', `${vm}.serial`);
  }

  private consoleOf(replica: string): string {
    return join(this.dr.stateDir, 'replicas', replica, 'console.log');
  }

  async start(): Promise<void> {
    const { workDir } = this.o;
    this.tools = chaosTools();
    const vms = vmsOf(this.estate);
    const prodDir = join(workDir, 'prod');
    const drDir = join(workDir, 'dr');
    mkdirSync(prodDir, { recursive: true });
    mkdirSync(drDir, { recursive: true });

    this.storage = await LoopFilesystem.create({
      image: join(drDir, 'storage.img'),
      mountPoint: join(drDir, 'storage'),
      sizeMiB: DR_STORAGE_MIB,
    });
    this.stops.push(() => this.storage.unmount());
    this.layer = await PowerCutLayer.mount({
      binary: this.tools.powercut,
      backing: join(this.storage.mountPoint, 'state'),
      mountPoint: join(drDir, 'state'),
    });
    this.stops.push(() => this.layer.unmount());

    const host = async (
      name: string,
      role: 'production' | 'dr',
      dir: string,
      stateDir: string,
      guests: string[],
    ): Promise<KvmHost> => {
      const libvirt = await LibvirtInstance.start({ dir: join(dir, 'libvirt'), capabilitiesCache: CAPABILITIES_CACHE });
      this.stops.push(() => libvirt.stop());
      for (const vm of guests)
        await defineTestGuest(libvirt.virsh, {
          name: vm,
          dir,
          image: this.imageOf(vm),
          serialLog: this.serialOf(vm),
          workload: GUEST_WORKLOAD,
          diskSize: `${KVM_GUEST_DISK_BYTES / MiB}M`,
          memoryMiB: 128,
        });
      const domainsFile = join(dir, 'domains');
      writeFileSync(domainsFile, guests.map((g) => `${g}\n`).join(''));
      const port = await freePort();
      const agent = new ManagedProcess(
        `${name} host process`,
        await kvmHostArgs({ name, role, libvirtUri: libvirt.virsh.uri, stateDir, port, domainsFile }),
        {},
        KVM_HOST_LISTENING,
      );
      await agent.start();
      // A clean stop: the host process stops its export daemons (a SIGKILL would leave them running); any left go.
      this.stops.push(async () => {
        await agent.close(10_000);
        for (const d of await storageDaemons()) if (d.pidFile.startsWith(`${stateDir}/`)) kill(d.pid);
      });
      return { name, role, stateDir, url: `https://127.0.0.1:${port}`, libvirt, agent };
    };
    this.prod = await host(this.estate.productionHost, 'production', prodDir, join(prodDir, 'state'), vms);
    this.dr = await host(this.estate.drHost, 'dr', drDir, this.layer.mountPoint, []);
    this.toxiproxy = await Toxiproxy.start(this.tools.toxiproxyServer, await freePort());
    this.stops.push(async () => this.toxiproxy.close());
    this.port = connectHypervisor(
      parseConfiguration(
        JSON.stringify(chaosConfiguration(this.estate, { production: this.prod.url, dr: this.dr.url })),
        'the KVM hosts',
      ),
    );
    this.stops.push(async () => this.port?.close());
    // The guests boot and write before the seeding begins.
    for (const vm of vms) await this.direct.powerOn({ host: this.estate.productionHost, vm });
    for (const vm of vms)
      if ((await readyAfter(this.serialOf(vm), 0, READY_TIMEOUT_MS)) === undefined)
        throw new Error(`guest ${vm} did not boot: ${await readFile(this.serialOf(vm), 'utf8').catch(() => '')}`);
    this.o.log(
      `chaos: KVM hosts ${this.prod.name} (${this.prod.url}) and ${this.dr.name} (${this.dr.url}, its state on ` +
        `${DR_STORAGE_MIB} MiB of ext4 through the powercut layer), guests ${vms.join(', ')} writing`,
    );
  }

  /** Each host process, over mutual TLS; the recorder serves its calls with a certificate naming that host. */
  async upstreams(): Promise<Record<string, Upstream>> {
    const upstream = async (h: KvmHost): Promise<Upstream> => ({
      url: h.url,
      servername: h.name,
      tls: await testServerTls([h.name]),
    });
    return { [this.prod.name]: await upstream(this.prod), [this.dr.name]: await upstream(this.dr) };
  }

  /** A Toxiproxy proxy per host, in front of the recorder's listener for it: faults cut or stall what goes through. */
  async workerUrls(recorderUrls: Record<string, string>): Promise<Record<string, string>> {
    const urls: Record<string, string> = {};
    for (const host of [this.prod.name, this.dr.name]) {
      const listen = await freePort();
      await this.toxiproxy.createProxy(host, listen, new URL(recorderUrls[host]!).host);
      urls[host] = `https://127.0.0.1:${listen}`;
    }
    return urls;
  }

  /** Read from the image file itself: a checkpoint of the suite's own would end the view a session reads. */
  sourceImage(vm: string): Promise<string> {
    return digestOf(this.estate.vmDisks[vm]!, () => imageFileBytes(this.imageOf(vm)));
  }

  /** Reverted to a point or its running layer discarded after a DR power cut: it resumes from that point instead. */
  runningReplaced(host: string, replica: string): void {
    if (host === this.dr.name) this.cutStopped.delete(replica);
  }

  /**
   * A replica powered on: its guest's console is followed until it says it booted, and where it resumed is kept (the
   * round's first boot of each replica), and compared with what its guest had said before a DR power cut stopped it.
   */
  poweredOn(host: string, vm: string): void {
    if (host !== this.dr.name || !vm.endsWith(REPLICA_SUFFIX)) return;
    const source = vm.slice(0, -REPLICA_SUFFIX.length);
    const log = this.consoleOf(vm);
    const before = this.cutStopped.get(vm);
    this.cutStopped.delete(vm);
    this.watching.push(
      readLines(log).then(async (known) => {
        const resume = await readyAfter(log, known.length, READY_TIMEOUT_MS);
        if (resume === undefined) {
          if (before !== undefined) this.cutStopped.set(vm, before); // not booted: the next power-on answers
          return;
        }
        if (!this.firstBoot.has(source)) this.firstBoot.set(source, resume);
        if (before !== undefined)
          this.results.push({
            name: 'a replica keeps what its guest made durable through a DR power cut',
            ok: resume >= before,
            detail: `${vm}: resumed at ${resume}, its guest had said ${before} before the cut`,
          });
      }),
    );
  }

  // Faults --------------------------------------------------------------------------------------------------------

  async inject(kind: HostFaultKind, ctx: FaultContext): Promise<boolean> {
    if (this.closing) return false;
    const c = ctx.chance;
    switch (kind) {
      case 'agentKill': {
        const host = c.pick([this.prod, this.dr]);
        ctx.note(`SIGKILL ${host.agent.name}, restart after ${ctx.downMs} ms`);
        await host.agent.bounce(ctx.downMs);
        return true;
      }
      case 'storageDaemonKill': {
        // Daemons run while a point is written or read: the fault waits a little for one.
        let ours: StorageDaemon[] = [];
        for (const end = Date.now() + 15_000; ours.length === 0 && Date.now() < end; await delay(200))
          ours = (await storageDaemons()).filter((d) => this.ownerOf(d) !== undefined);
        if (ours.length === 0) return false;
        const d = c.pick(ours);
        ctx.note(`SIGKILL qemu-storage-daemon ${d.pid} of ${this.ownerOf(d)!.name} (${d.pidFile})`);
        kill(d.pid);
        return true;
      }
      case 'sourceQemuKill': {
        const running = await this.qemuPids(this.prod);
        if (running.length === 0) return false;
        const [vm, pid] = c.pick(running);
        ctx.note(`SIGKILL the QEMU of ${vm} (${pid}) on ${this.prod.name}`);
        kill(pid);
        this.crashed.add(vm);
        return true;
      }
      case 'libvirtdRestart': {
        const host = c.pick([this.prod, this.dr]);
        ctx.note(`libvirtd of ${host.name} restarted`);
        await host.libvirt.restartDaemon();
        return true;
      }
      case 'drDiskFull': {
        const { durationMs, at } = await this.aim(ctx, [2_000, 15_000]);
        if (this.storageFull) return false;
        this.storageFull = true;
        const taken = await this.storage.fill();
        ctx.note(`the DR storage full (${Math.round(taken / MiB)} MiB taken) for ${durationMs} ms${at}`);
        ctx.later(delay(durationMs).then(() => this.freeStorage()));
        return true;
      }
      case 'networkCut':
      case 'networkStall':
        return this.network(kind, ctx);
      case 'drPowerCut':
        return this.powerCut(ctx);
      default:
        return false;
    }
  }

  /** Short (1–6 s unless said otherwise), or aimed at a session in its critical window and long enough to halt it. */
  private async aim(
    { chance: c, sessionInWindow }: FaultContext,
    short: [number, number] = [1_000, 6_000],
  ): Promise<{ durationMs: number; aimed: boolean; at: string }> {
    const aimed = c.chance(0.5);
    const durations = { short: c.int(...short), aimed: c.int(8_000, 20_000) };
    const session = aimed ? await sessionInWindow(15_000) : undefined;
    return session
      ? { durationMs: durations.aimed, aimed: true, at: ` aimed at ${session}` }
      : { durationMs: durations.short, aimed: false, at: '' };
  }

  /** A toxic on the connections between the workers and one host, for a while. */
  private async network(kind: 'networkCut' | 'networkStall', ctx: FaultContext): Promise<boolean> {
    const c = ctx.chance;
    const host = c.pick([this.prod, this.dr]).name;
    const stream = c.pick(['upstream', 'downstream'] as const);
    const { durationMs, aimed, at } = await this.aim(ctx);
    let toxic: Toxic | 'down';
    if (kind === 'networkCut') {
      const how = c.pick(['reset_peer', 'timeout', 'limit_data', 'down'] as const);
      if (how === 'reset_peer') toxic = { type: how, stream, attributes: { timeout: c.int(0, 2_000) } };
      else if (how === 'timeout') toxic = { type: how, stream, attributes: { timeout: c.int(100, 3_000) } };
      else if (how === 'limit_data') toxic = { type: how, stream, attributes: { bytes: c.int(0, 1024 * 1024) } };
      else toxic = 'down';
    } else {
      const how = c.pick(['latency', 'bandwidth', 'slicer', 'timeout'] as const);
      if (how === 'latency')
        toxic = {
          type: how,
          stream,
          attributes: { latency: aimed ? c.int(5_000, 15_000) : c.int(200, 3_000), jitter: c.int(0, 500) },
        };
      else if (how === 'bandwidth') toxic = { type: how, stream, attributes: { rate: c.int(16, 512) } };
      else if (how === 'slicer')
        toxic = {
          type: how,
          stream,
          attributes: { average_size: 64, size_variation: 32, delay: c.int(1_000, 20_000) },
        };
      else toxic = { type: 'timeout', stream, attributes: { timeout: 0 } }; // held until the toxic goes
    }
    ctx.note(`${host}: connections ${toxic === 'down' ? 'down' : JSON.stringify(toxic)} for ${durationMs} ms${at}`);
    if (toxic === 'down') {
      await this.toxiproxy.setEnabled(host, false);
      ctx.later(delay(durationMs).then(() => this.toxiproxy.setEnabled(host, true)));
    } else {
      const name = `chaos-${Date.now()}-${c.int(0, 1e9)}`;
      await this.toxiproxy.addToxic(host, name, toxic);
      ctx.later(delay(durationMs).then(() => this.toxiproxy.removeToxic(host, name)));
    }
    return true;
  }

  /**
   * The DR host loses power: its storage keeps only what was flushed, and its host process, the storage daemons and
   * the replicas' QEMUs die at once. Then the storage comes back and the host process starts again on it.
   */
  private async powerCut(ctx: FaultContext): Promise<boolean> {
    // Half of the cuts wait (up to 15 s) for a point being written: what its writer acknowledged must survive.
    let at = '';
    if (ctx.chance.chance(0.5))
      for (const end = Date.now() + 15_000; Date.now() < end && !at; await delay(100)) {
        const writer = (await storageDaemons()).find((d) => d.writable && this.ownerOf(d) === this.dr);
        if (writer) at = ` while a point is written (${writer.pidFile})`;
      }
    /** The replicas running at the cut, and the last sequence number each one's guest said was on its disk. */
    const said = new Map<string, number>();
    await this.dr.agent.restart({
      beforeKill: async () => {
        // Read while the storage still answers (in the host process's turn: no other cut or restart of it between).
        for (const replica of await this.runningReplicas())
          said.set(replica, durableSeq(await readLines(this.consoleOf(replica))) ?? 0);
        ctx.note(
          `DR power cut${at}: its storage cut, its host process, storage daemons and replicas (${[...said.keys()].join(', ') || 'none running'}) killed; back after ${ctx.downMs} ms`,
        );
        await this.layer.cut();
      },
      whileDown: async () => {
        for (const d of await storageDaemons()) if (this.ownerOf(d) === this.dr) kill(d.pid);
        for (const [replica, pid] of await this.qemuPids(this.dr)) {
          kill(pid);
          // One that started since the look above said nothing yet: all it had was on its disk before.
          if (!said.has(replica)) said.set(replica, 0);
        }
        // Each stopped with the cut, whether killed here or already gone: its guest powers off at the first write
        // that fails.
        for (const [replica, seq] of said) this.cutStopped.set(replica, seq);
        await delay(ctx.downMs);
        await this.layer.restore();
      },
    });
    return true;
  }

  private async freeStorage(): Promise<void> {
    if (!this.storageFull) return;
    await this.storage.free();
    this.storageFull = false;
  }

  /** The host a storage daemon works for, by where its pid file is; undefined for one that is not ours. */
  private ownerOf(d: StorageDaemon): KvmHost | undefined {
    return [this.prod, this.dr].find((h) => d.pidFile.startsWith(`${h.stateDir}/`));
  }

  /** The running QEMUs of a host's domains, by domain. */
  private async qemuPids(host: KvmHost): Promise<[string, number][]> {
    const out: [string, number][] = [];
    for (const name of await host.libvirt.virsh.domains()) {
      const pid = Number(await readFile(join(host.libvirt.dir, 'run', 'qemu', `${name}.pid`), 'utf8').catch(() => ''));
      if (pid > 0 && host.libvirt.qemuPids().includes(pid)) out.push([name, pid]);
    }
    return out;
  }

  private async runningReplicas(): Promise<string[]> {
    return lines(await this.dr.libvirt.virsh.run(['list', '--name'])).filter((n) => n.endsWith(REPLICA_SUFFIX));
  }

  // Healing and the operator --------------------------------------------------------------------------------------

  async heal(note: (line: string) => void): Promise<string[]> {
    const started: string[] = [];
    if (this.closing) return started;
    for (const host of [this.prod, this.dr]) {
      const answers = await host.libvirt.virsh.run(['version'], { timeoutMs: 10_000 }).then(
        () => true,
        () => false,
      );
      if (!answers) {
        note(`libvirtd of ${host.name} does not answer: restarted`);
        await host.libvirt.restartDaemon();
      }
      if (await host.agent.ensureRunning()) started.push(host.agent.name);
    }
    await this.toxiproxy.reset();
    await this.freeStorage();
    return started;
  }

  async afterSettle(
    views: Map<string, ReplicaView>,
    operator: HypervisorPort,
    note: (line: string) => void,
  ): Promise<void> {
    const { productionHost, drHost } = this.estate;
    /** An operator's action after a fault: one that fails is a violation (the hosts must allow it), not a crash. */
    const act = async (what: string, action: () => Promise<unknown>): Promise<void> => {
      note(`operator ${what}`);
      const failed = await action().then(
        () => undefined,
        (e: unknown) => (e instanceof Error ? e.message : String(e)),
      );
      this.results.push({
        name: 'the operator’s action after a host fault works',
        ok: !failed,
        detail: `${what}: ${failed}`,
      });
    };
    // A guest whose write found the DR storage full was paused by its QEMU; the space is back: it goes on.
    for (const replica of await this.runningReplicas()) {
      const state = await this.dr.libvirt.virsh.run(['domstate', '--reason', replica]);
      if (/paused \(I\/O error\)/i.test(state))
        await act(`resumes ${replica}, paused on an I/O error while the DR storage was full`, () =>
          this.dr.libvirt.virsh.run(['resume', replica]),
        );
    }
    // A production VM the suite crashed, that nothing started again since: its operator starts it.
    for (const vm of this.crashed) {
      const state = views.get(vm)?.state;
      if (state !== 'Ready' && state !== 'Unseeded') continue;
      if ((await this.direct.getVm({ host: productionHost, vm })).powerState !== 'Off') continue;
      await act(`powers ${vm} on after its QEMU was killed`, () => operator.powerOn({ host: productionHost, vm }));
    }
    this.crashed.clear();
    // A replica the DR power cut stopped, that its entity says runs: its operator starts it once the host is back.
    for (const replica of [...this.cutStopped.keys()]) {
      const vm = replica.slice(0, -REPLICA_SUFFIX.length);
      const state = views.get(vm)?.state;
      const info = await this.direct.getReplica({ host: drHost, replica });
      if ((state !== 'Failover' && state !== 'PermanentFailover') || info.powerState !== 'Off') {
        this.cutStopped.delete(replica);
        continue;
      }
      await act(`powers ${replica} on again after the DR power cut`, () =>
        operator.powerOn({ host: drHost, vm: replica }),
      );
    }
  }

  // Invariants ----------------------------------------------------------------------------------------------------

  async check({ checks, since, ledger, views, settledViews }: HostCheckContext): Promise<void> {
    await Promise.all(this.watching.splice(0));
    for (const r of this.results.splice(0)) checks.check(r.name, r.ok, r.detail);
    // After a power cut every sealed point is compared with its checkpoint again: none may have lost a block.
    if (this.layer.cuts > this.cutsChecked) {
      ledger.verifiedPoints.clear();
      this.cutsChecked = this.layer.cuts;
    }

    // The replica of this round's planned failover boots where the source's guest stopped: the canary on the
    // powered-off source's disk. (A later boot, after a power cut, goes on from what the replica wrote since.)
    for (const vm of vmsOf(this.estate)) {
      const last = settledViews.get(vm)?.lastRun;
      const resume = this.firstBoot.get(vm);
      const forcedOlder = /forced failover to helper restore point 1/.test(last?.outcome ?? '');
      if (views.get(vm)?.state !== 'Failover' || last?.kind !== 'plannedFailover' || forcedOlder) continue;
      if (new Date(last.at) < since || resume === undefined) continue; // not this round's, or never booted
      const source = await readCanary(this.imageOf(vm), { forceShare: true });
      checks.check(
        'the replica resumes at the source’s last write',
        resume === source,
        `${vm}: the replica resumed at ${resume}, the powered-off source's canary is ${source}`,
      );
    }
    this.firstBoot.clear();

    // Nothing left behind: daemons outliving their host process, domains of no one, block or backup jobs, pauses.
    const daemons = await storageDaemons();
    for (const host of [this.prod, this.dr]) {
      const orphans = daemons.filter((d) => this.ownerOf(d) === host && d.ppid !== host.agent.pid);
      checks.check(
        'no storage daemon outlives its host process',
        orphans.length === 0,
        `${host.name}: ${orphans.map((d) => `${d.pid} (${d.pidFile})`).join(', ')}`,
      );
    }
    const allowed = new Map([
      [this.prod, new Set(vmsOf(this.estate))],
      [this.dr, new Set(vmsOf(this.estate).map(replicaNameOf))],
    ]);
    for (const [host, names] of allowed) {
      const domains = await host.libvirt.virsh.domains();
      const strangers = domains.filter((d) => !names.has(d));
      checks.check(
        'no domain but the VMs and their replicas',
        strangers.length === 0,
        `${host.name}: ${strangers.join(', ')}`,
      );
      for (const domain of lines(await host.libvirt.virsh.run(['list', '--name']))) {
        const state = await host.libvirt.virsh.run(['domstate', '--reason', domain]);
        checks.check('no domain left paused once the round settled', !/^paused/.test(state), `${domain}: ${state}`);
        const job = await host.libvirt.virsh.run(['domjobinfo', domain]).catch(() => '');
        checks.check(
          'no backup job (checkpoint view) left once the round settled',
          !/Operation:\s+Backup/.test(job),
          `${host.name}/${domain}`,
        );
        // domblklist (virsh -q): a target and its source per line.
        const disks = lines(await host.libvirt.virsh.run(['domblklist', domain])).map((l) => l.split(/\s+/)[0]!);
        for (const disk of disks) {
          const info = (await host.libvirt.virsh.run(['blockjob', domain, disk, '--info']).catch(() => '')).trim();
          checks.check(
            'no block job left once the round settled',
            info === '' || /no current block job/i.test(info),
            `${host.name}/${domain}/${disk}: ${info}`,
          );
        }
      }
    }
  }

  /**
   * The host processes' output, libvirt's log of each QEMU (why it stopped: a guest shutdown, a kill, an I/O error),
   * and every guest's console (a guest that meets a write error says so and powers off).
   */
  async evidence(dir: string): Promise<void> {
    const copy = async (from: string, to: string) => {
      const text = await readFile(from, 'utf8').catch((e: unknown) => `(not read: ${String(e)})`);
      writeFileSync(join(dir, to), text);
    };
    for (const h of [this.prod, this.dr]) {
      writeFileSync(join(dir, `${h.name}.agent.log`), h.agent.output);
      const qemuLogs = join(h.libvirt.dir, 'log', 'qemu');
      for (const f of await readdir(qemuLogs).catch(() => [])) await copy(join(qemuLogs, f), `${h.name}.qemu.${f}`);
    }
    for (const vm of vmsOf(this.estate)) {
      await copy(this.serialOf(vm), `${vm}.console.log`);
      await copy(this.consoleOf(replicaNameOf(vm)), `${replicaNameOf(vm)}.console.log`);
    }
  }

  async close(): Promise<void> {
    this.closing = true;
    for (const stop of this.stops.splice(0).reverse())
      await stop().catch((e: unknown) => this.o.log(`closing: ${String(e)}`));
  }
}
