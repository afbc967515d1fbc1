// The lab's whole estate: hosts, source and replica VMs, power, checkpoints, change tracking,
// replica chains and backups, with durable metadata. The HTTP layer (server.ts) validates input
// and calls these methods; they throw HostApiError for answers other than success.

import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import {
  BLOCK_SIZE,
  type BackupPointInfo,
  type DiskInfo,
  type Extent,
  type ExtentData,
  type HostInfo,
  type PowerResult,
  type ReplicaInfo,
  type ReplicaView,
  type RestorePointInfo,
  type RestorePointSpec,
  type ShutdownResult,
  type VmInfo,
} from '../src/hypervisor/port';
import { crashPoint } from './crash';
import {
  backupDir,
  finishInterruptedSeals,
  migrateVersion1Names,
  moveRunningLayerFiles,
  sweepUnreferenced,
  vmDir,
} from './data-dir';
import { ReplicaDisk, SourceDisk } from './disks';
import { Mutex, WriteGate } from './lock';
import { conflict, HostApiError, notFound, trackingLost } from '../src/host-api/errors';
import { guestProfile, type Estate } from './estate';
import { canaryBlock, corruptBlockContent, GuestWorkload, readCanarySequence, type GuestProfile } from './guest';
import {
  finishSealing,
  STATE_VERSION,
  stem,
  type BackupMeta,
  type CheckpointMeta,
  type PointMeta,
  type ReferencePointMeta,
  type ReplicaMeta,
  type StateFile,
  type TrackingFile,
  type VmMeta,
} from './metadata';
import { fsyncPath, readJson, removeDurably, writeFileAtomic } from '../src/host-api/persist';
import { blocksToExtents, createLayers, destroyLayers, Layer } from './storage/layer';
import { readView, viewAllocatedBlocks, type View } from './storage/view';

const CONSOLIDATING = '*consolidate*';
const DEFAULT_PROFILE: GuestProfile = { blocksPerSecond: 10, hotSetFraction: 0.1, hotWriteShare: 0.8 };
const BACKUP_CHECKPOINT_PREFIX = '~backup-';
const READ_CHUNK_BYTES = 4 * 1024 * 1024;

/**
 * Read buffers reused in turn, so streaming a disk does not allocate (and garbage-collect) a
 * buffer per piece. Safe with three buffers because the sender flushes each piece to the socket
 * before asking for the next, and only one piece is read ahead.
 */
export class BufferRing {
  private readonly buffers: Buffer[];
  private turn = 0;

  constructor(extents: Extent[]) {
    let largest = 0;
    for (const c of readChunks(extents)) largest = Math.max(largest, c.length);
    this.buffers = Array.from({ length: 3 }, () => Buffer.allocUnsafe(largest));
  }

  take(length: number): Buffer {
    return this.buffers[this.turn++ % this.buffers.length]!.subarray(0, length);
  }
}

/** Extents cut into the pieces block reads are served in. */
export function* readChunks(extents: Extent[]): Generator<Extent> {
  for (const e of extents)
    for (let at = e.offset; at < e.offset + e.length; at += READ_CHUNK_BYTES)
      yield { offset: at, length: Math.min(READ_CHUNK_BYTES, e.offset + e.length - at) };
}

const now = (): string => new Date().toISOString();
const flatten = (m: Map<number, number>): number[] => [...m].flat();
function unflatten(a: number[]): Map<number, number> {
  const m = new Map<number, number>();
  for (let i = 0; i + 1 < a.length; i += 2) m.set(a[i]!, a[i + 1]!);
  return m;
}

class LabVm {
  guest: GuestWorkload | null = null;
  private boot: Promise<void> | null = null;
  private shutdown: Promise<void> | null = null;
  /** Counts hard stops, so a boot that was in flight during one knows to give up. */
  private haltEpoch = 0;
  private sleeps = new Set<{ timer: NodeJS.Timeout; resolve: (done: boolean) => void }>();
  /** Writes into each open restore point; closed by its seal or drop. */
  private readonly pointGates = new Map<string, WriteGate>();

  constructor(
    readonly site: LabSite,
    readonly meta: VmMeta,
    readonly source: Map<string, SourceDisk>,
    readonly replicaDisks: Map<string, ReplicaDisk>,
  ) {}

  get name(): string {
    return this.meta.name;
  }

  get replica(): ReplicaMeta {
    if (!this.meta.replica) throw conflict(`${this.name} is not a replica`);
    return this.meta.replica;
  }

  info(): VmInfo {
    return {
      name: this.name,
      host: this.meta.host,
      kind: this.meta.kind,
      powerState: this.meta.powerState,
      disks: this.meta.disks,
      lastStop: this.meta.lastStop ?? null,
    };
  }

  pointGate(pointId: string): WriteGate {
    let gate = this.pointGates.get(pointId);
    if (!gate) this.pointGates.set(pointId, (gate = new WriteGate()));
    return gate;
  }

  /** Forgets the gate of a point that is gone, so that a new point of that id starts open. */
  dropPointGate(pointId: string): void {
    this.pointGates.delete(pointId);
  }

  sourceDisk(id: string): SourceDisk {
    if (this.meta.kind !== 'source') throw conflict(`${this.name} is a replica; use the replica API`);
    const d = this.source.get(id);
    if (!d) throw notFound(`disk ${this.name}/${id}`, 'disk');
    return d;
  }

  replicaDisk(id: string): ReplicaDisk {
    const d = this.replicaDisks.get(id);
    if (!d) throw notFound(`disk ${this.name}/${id}`, 'disk');
    return d;
  }

  // Power -------------------------------------------------------------------------------------

  private sleep(ms: number): Promise<boolean> {
    return new Promise((resolve) => {
      const entry = {
        timer: setTimeout(() => {
          this.sleeps.delete(entry);
          resolve(true);
        }, ms),
        resolve,
      };
      this.sleeps.add(entry);
    });
  }

  private cancelSleeps(): void {
    for (const s of this.sleeps) {
      clearTimeout(s.timer);
      s.resolve(false);
    }
    this.sleeps.clear();
  }

  async powerOn(): Promise<PowerResult> {
    if (this.meta.powerState === 'Running') return { state: 'Running', alreadyInState: true };
    // As on a KVM host: nothing boots on top of a point still being written; it is sealed or discarded first.
    const open = this.meta.replica?.points.find((p) => !p.sealed);
    if (open) throw conflict(`restore point ${open.id} of ${this.name} is still being written`);
    if (this.meta.powerState === 'Stopping') await this.shutdown;
    if (this.meta.powerState === 'Off') this.startBoot();
    await this.boot;
    return { state: this.meta.powerState, alreadyInState: false };
  }

  /** Starting state for the boot time, then the guest runs. Used by power-on and lab restart. */
  startBoot(): void {
    this.meta.powerState = 'Starting';
    const persisted = this.site.persist();
    const epoch = this.haltEpoch;
    const boot = (async () => {
      await persisted;
      if (!(await this.sleep(this.meta.bootMs))) return;
      await this.startGuest();
      if (epoch !== this.haltEpoch) {
        // Powered off while the guest was starting: it must not keep running.
        await this.halt();
        return;
      }
      this.meta.powerState = 'Running';
      await this.site.persist();
    })().finally(() => (this.boot = null));
    // A boot started by the lab's own start-up has no caller to tell; a power-on awaits it and sees the failure.
    boot.catch((e: unknown) => this.site.log(`boot of ${this.name} failed: ${String(e)}`));
    this.boot = boot;
  }

  async startGuest(): Promise<void> {
    const targets = this.meta.disks.map((d) => {
      const blocks = d.sizeBytes / BLOCK_SIZE;
      if (this.meta.kind === 'source') {
        const disk = this.source.get(d.id)!;
        return { id: d.id, blocks, write: (runs: ExtentData[]) => disk.write(runs) };
      }
      const disk = this.replicaDisks.get(d.id)!;
      return { id: d.id, blocks, write: (runs: ExtentData[]) => disk.guestWrite(runs) };
    });
    const r = this.meta.replica;
    if (r && !r.consolidated && !r.running) {
      const layers = await this.site.newLayers(this, stem.running);
      crashPoint('power-on:after-running-files');
      for (const d of this.replicaDisks.values()) d.running = layers.get(d.id)!;
      r.running = true;
      await this.site.persist();
    }
    const identity = this.meta.replica?.sourceVm ?? this.name;
    const sequence = await this.canarySequence(this.currentView(this.meta.disks[0]!.id));
    this.guest = new GuestWorkload(identity, targets, this.meta.profile, sequence, (e) =>
      this.site.log(`guest ${this.name}: ${String(e)}`),
    );
    this.guest.start();
  }

  async shutdownGuest(timeoutMs: number): Promise<ShutdownResult> {
    if (this.meta.powerState === 'Off') return { outcome: 'already-off', state: 'Off' };
    if (this.meta.powerState === 'Starting') await this.boot;
    if (this.meta.powerState === 'Running') {
      this.meta.powerState = 'Stopping';
      const persisted = this.site.persist();
      this.shutdown = (async () => {
        await persisted;
        if (!(await this.sleep(this.meta.shutdownMs))) return;
        await this.guest?.stop(true);
        this.guest = null;
        this.meta.powerState = 'Off';
        this.meta.lastStop = 'guest-shutdown';
        await this.site.persist();
      })().finally(() => (this.shutdown = null));
    }
    const done = this.shutdown ?? Promise.resolve();
    let timer: NodeJS.Timeout | undefined;
    const timedOut = await Promise.race([
      done.then(() => false),
      new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(true), timeoutMs))),
    ]);
    clearTimeout(timer);
    if (timedOut) return { outcome: 'timed-out', state: this.meta.powerState };
    return { outcome: 'off', state: this.meta.powerState };
  }

  async powerOff(): Promise<PowerResult> {
    if (this.meta.powerState === 'Off') return { state: 'Off', alreadyInState: true };
    await this.halt();
    this.meta.powerState = 'Off';
    this.meta.lastStop = 'forced-off';
    await this.site.persist();
    return { state: 'Off', alreadyInState: false };
  }

  /** Stops the guest at once and cancels pending boot/shutdown; power state is left to the caller. */
  async halt(): Promise<void> {
    this.haltEpoch++;
    this.cancelSleeps();
    const guest = this.guest;
    this.guest = null;
    await guest?.stop(false);
  }

  // Views ---------------------------------------------------------------------------------------

  currentView(disk: string): View {
    if (this.meta.kind === 'source') return this.sourceDisk(disk).view(null);
    return this.replicaDisk(disk).runningView(this.headChain());
  }

  async canarySequence(view: View): Promise<number> {
    const first = this.meta.disks[0]!;
    const block = canaryBlock(first.sizeBytes);
    return readCanarySequence(await readView(view, block * BLOCK_SIZE, BLOCK_SIZE));
  }

  chainTo(pointId: string): string[] {
    const ids = this.replica.points.map((p) => p.id);
    const i = ids.indexOf(pointId);
    if (i < 0) throw notFound(`restore point ${this.name}/${pointId}`, 'pointId');
    return ids.slice(0, i + 1);
  }

  headChain(): string[] {
    const head = this.replica.headPointId;
    return head === null ? [] : this.chainTo(head);
  }

  replicaView(disk: string, view: ReplicaView): View {
    const d = this.replicaDisk(disk);
    return 'pointId' in view ? d.pointView(this.chainTo(view.pointId)) : d.runningView(this.headChain());
  }

  checkpointView(disk: string, checkpointId: string): View {
    const d = this.sourceDisk(disk);
    if (!d.checkpoints.has(checkpointId)) throw notFound(`checkpoint ${this.name}/${checkpointId}`, 'checkpointId');
    return d.view(checkpointId);
  }

  pointInfo(p: PointMeta): RestorePointInfo {
    let blocks = 0;
    for (const d of this.replicaDisks.values()) blocks += d.points.get(p.id)?.present.size ?? 0;
    return { ...p, bytesWritten: blocks * BLOCK_SIZE };
  }

  replicaInfo(): ReplicaInfo {
    const r = this.replica;
    return {
      name: this.name,
      host: this.meta.host,
      sourceVm: r.sourceVm,
      powerState: this.meta.powerState,
      disks: this.meta.disks,
      points: r.points.map((p) => this.pointInfo(p)),
      headPointId: r.headPointId,
      hasRunningLayer: r.running,
      consolidated: r.consolidated,
      consolidating: false, // the lab's consolidation is one step
    };
  }
}

export class LabSite {
  readonly hosts = new Map<string, HostInfo>();
  readonly vms = new Map<string, LabVm>();
  readonly backups = new Map<string, { meta: BackupMeta; layers: Map<string, Layer> }>();
  generation = 1;
  /** True when this run started after an unclean stop (tracking of earlier generations is gone). */
  trackingLostAtStart = false;
  private dead = false;
  /**
   * Set when saving the metadata failed. The state in memory may then hold changes that are not on disk (a seal, a
   * new point), so the lab stops changing anything: answering later calls from that state would diverge from what
   * a restart reloads.
   */
  private storeFailure: Error | null = null;
  private readonly controlLocks = new Map<string, Mutex>();
  private saveChain: Promise<void> = Promise.resolve();
  private pendingSave: Promise<void> | null = null;

  private constructor(
    readonly dataDir: string,
    readonly log: (message: string) => void,
  ) {}

  /** A layer's path without its extension (see stem in metadata.ts). */
  layerPath(vm: string, layerStem: string): string {
    return join(vmDir(this.dataDir, vm), layerStem);
  }

  /** A new layer of the VM per disk, its file names durable before any metadata names them. */
  async newLayers(vm: LabVm, stemOf: (disk: string) => string): Promise<Map<string, Layer>> {
    const disks = vm.meta.disks;
    const paths = disks.map((d) => ({ path: this.layerPath(vm.name, stemOf(d.id)), sizeBytes: d.sizeBytes }));
    const layers = await createLayers(vmDir(this.dataDir, vm.name), paths);
    return new Map(disks.map((d, i) => [d.id, layers[i]!]));
  }

  /** Removes layers the metadata no longer names (after it was persisted so). */
  private dropLayers(vm: LabVm, layers: Layer[]): Promise<void> {
    return destroyLayers(vmDir(this.dataDir, vm.name), layers);
  }

  private get statePath(): string {
    return join(this.dataDir, 'state.json');
  }

  private get trackingPath(): string {
    return join(this.dataDir, 'tracking.json');
  }

  private get markerPath(): string {
    return join(this.dataDir, 'clean-shutdown');
  }

  static async open(
    estate: Estate,
    dataDir: string,
    log: (message: string) => void = () => undefined,
  ): Promise<LabSite> {
    const site = new LabSite(dataDir, log);
    await mkdir(dataDir, { recursive: true });
    await site.takeLock();
    for (const s of estate.sites)
      for (const h of s.hosts) site.hosts.set(h.name, { name: h.name, site: s.name, role: s.role });

    const state = await readJson<StateFile>(site.statePath);
    const clean = (await readJson<object>(site.markerPath)) !== null;
    const tracking = state && clean ? await readJson<TrackingFile>(site.trackingPath) : null;
    const metas: VmMeta[] = state?.vms ?? [];
    const backups: BackupMeta[] = state?.backups ?? [];
    // Before any layer is opened: the names the metadata uses, the steps a crash interrupted, the files they left.
    if (state && state.version < STATE_VERSION) await migrateVersion1Names(dataDir, metas, log);
    await finishInterruptedSeals(dataDir, metas);
    await sweepUnreferenced(dataDir, metas, backups, log);
    site.generation = state?.generation ?? 1;
    if (state && !clean) {
      site.generation++;
      site.trackingLostAtStart = true;
      log(`unclean stop detected: change tracking lost (generation ${site.generation})`);
    }
    const known = new Set(metas.map((m) => m.name));
    const fresh: VmMeta[] = [];
    for (const s of estate.sites)
      for (const h of s.hosts)
        for (const v of h.vms)
          if (!known.has(v.name)) {
            const meta: VmMeta = {
              name: v.name,
              host: h.name,
              kind: 'source',
              powerState: v.power,
              disks: v.disks.map((d) => ({ id: d.id, sizeBytes: d.size })),
              profile: guestProfile(v),
              shutdownMs: v.shutdownMs,
              bootMs: v.bootMs,
              checkpoints: [],
              referencePoints: [],
            };
            metas.push(meta);
            fresh.push(meta);
          }

    for (const meta of metas) await site.loadVm(meta, tracking, fresh.includes(meta));
    for (const b of backups) {
      const layers = new Map<string, Layer>();
      for (const d of b.disks) layers.set(d.id, await Layer.open(join(backupDir(dataDir, b.id), d.id), d.sizeBytes));
      site.backups.set(b.id, { meta: b, layers });
    }
    for (const vm of site.vms.values()) {
      await site.finishMerge(vm);
      // A backup interrupted by a crash leaves its private checkpoint behind.
      for (const cp of vm.meta.checkpoints.filter((c) => c.id.startsWith(BACKUP_CHECKPOINT_PREFIX)))
        await site.deleteCheckpoint(vm, cp.id);
    }

    await removeDurably(site.markerPath);
    await site.persist();
    for (const vm of site.vms.values()) {
      if (vm.meta.powerState === 'Off') continue;
      // Fresh estate VMs start running at once; after a restart, VMs that ran boot again.
      if (fresh.includes(vm.meta)) {
        await vm.startGuest();
        vm.meta.powerState = 'Running';
      } else vm.startBoot();
    }
    await site.persist();
    return site;
  }

  /** Opens a VM's layers, or creates the empty disks of a new VM (`create`). */
  private async loadVm(meta: VmMeta, tracking: TrackingFile | null, create: boolean): Promise<void> {
    const dir = vmDir(this.dataDir, meta.name);
    const bases: Layer[] = [];
    if (create) {
      await mkdir(dir, { recursive: true });
      await fsyncPath(join(this.dataDir, 'vms'));
      const paths = meta.disks.map((d) => ({ path: join(dir, stem.base(d.id)), sizeBytes: d.sizeBytes }));
      bases.push(...(await createLayers(dir, paths)));
    } else for (const d of meta.disks) bases.push(await Layer.open(join(dir, stem.base(d.id)), d.sizeBytes));
    const source = new Map<string, SourceDisk>();
    const replicaDisks = new Map<string, ReplicaDisk>();
    for (const [i, d] of meta.disks.entries()) {
      const base = bases[i]!;
      if (meta.kind === 'source') {
        const disk = new SourceDisk(d.id, base);
        const t = tracking?.disks[`${meta.name}/${d.id}`];
        if (t) {
          disk.epoch = t.epoch;
          for (const [b, e] of unflatten(t.blocks)) disk.blockEpoch.set(b, e);
        }
        for (const cp of meta.checkpoints) {
          const cow = await Layer.open(join(dir, stem.checkpoint(cp.id, d.id)), d.sizeBytes);
          disk.checkpoints.set(cp.id, { cow, cowEpoch: unflatten(t?.checkpoints[cp.id] ?? []) });
        }
        source.set(d.id, disk);
      } else {
        const disk = new ReplicaDisk(d.id, base);
        for (const p of meta.replica!.points)
          disk.points.set(p.id, await Layer.open(join(dir, stem.point(p.id, d.id)), d.sizeBytes));
        if (meta.replica!.running) disk.running = await Layer.open(join(dir, stem.running(d.id)), d.sizeBytes);
        replicaDisks.set(d.id, disk);
      }
    }
    this.vms.set(meta.name, new LabVm(this, meta, source, replicaDisks));
  }

  // Persistence ---------------------------------------------------------------------------------

  private get lockPath(): string {
    return join(this.dataDir, 'lab.pid');
  }

  /** One lab per data directory: a second one would corrupt the first one's disks and metadata. */
  private async takeLock(): Promise<void> {
    const holder = await readJson<{ pid: number }>(this.lockPath);
    if (holder && holder.pid !== process.pid && processAlive(holder.pid))
      throw new Error(`data directory ${this.dataDir} is in use by lab process ${holder.pid}`);
    await writeFileAtomic(this.lockPath, JSON.stringify({ pid: process.pid }));
  }

  /** Saves metadata atomically; calls made while a save is queued share it. */
  persist(): Promise<void> {
    // A step still in flight when the lab stopped must not go on as if saved (and remove files it still names).
    if (this.dead) return Promise.reject(stopped());
    const refused = this.storeRefusal();
    if (refused) return Promise.reject(refused);
    if (!this.pendingSave) {
      const save = this.saveChain
        .then(() => {
          this.pendingSave = null;
          return this.writeState();
        })
        .catch((e: unknown) => {
          if (this.dead) throw e;
          if (!this.storeFailure) {
            this.storeFailure = e instanceof Error ? e : new Error(String(e));
            this.log(`saving state failed; refusing changes until restarted: ${String(e)}`);
          }
          throw this.storeRefusal()!;
        });
      this.pendingSave = save;
      this.saveChain = save.catch(() => undefined);
    }
    return this.pendingSave;
  }

  /** The answer to every change once saving the metadata failed; null while saving works. */
  storeRefusal(): HostApiError | null {
    if (!this.storeFailure) return null;
    return new HostApiError(
      503,
      'store_failed',
      `the lab's metadata store failed (${this.storeFailure.message}); it refuses changes until it is restarted, ` +
        'which reloads its state from disk',
    );
  }

  private async writeState(): Promise<void> {
    if (this.dead) throw stopped();
    if (this.storeFailure) throw this.storeFailure;
    const state: StateFile = {
      version: STATE_VERSION,
      generation: this.generation,
      vms: [...this.vms.values()].map((v) => v.meta),
      backups: [...this.backups.values()].map((b) => b.meta),
    };
    await writeFileAtomic(this.statePath, JSON.stringify(state));
  }

  /** Clean stop saves tracking and a marker; an unclean one (kill) leaves both out. */
  async stop(clean: boolean): Promise<void> {
    // After a failed save, memory is not what the disk says: saving tracking for it would be a lie.
    clean &&= !this.storeFailure;
    if (!clean) this.dead = true;
    for (const vm of this.vms.values()) await vm.halt();
    if (clean) {
      // Starting/Stopping VMs were interrupted by the host stop; they boot again on start.
      await this.persist();
      const tracking: TrackingFile = { generation: this.generation, disks: {} };
      for (const vm of this.vms.values())
        for (const d of vm.source.values()) {
          const checkpoints: Record<string, number[]> = {};
          for (const [id, s] of d.checkpoints) checkpoints[id] = flatten(s.cowEpoch);
          tracking.disks[`${vm.name}/${d.id}`] = { epoch: d.epoch, blocks: flatten(d.blockEpoch), checkpoints };
        }
      await writeFileAtomic(this.trackingPath, JSON.stringify(tracking));
      for (const vm of this.vms.values()) {
        for (const d of vm.source.values()) {
          await d.base.sync();
          for (const s of d.checkpoints.values()) await s.cow.sync();
        }
        for (const d of vm.replicaDisks.values()) {
          await d.base.sync();
          for (const l of d.points.values()) await l.sync();
          await d.running?.sync();
        }
      }
      await writeFileAtomic(this.markerPath, JSON.stringify({ stoppedAt: now() }));
      this.dead = true;
    } else {
      await this.saveChain;
    }
    for (const vm of this.vms.values()) {
      for (const d of vm.source.values()) await d.close();
      for (const d of vm.replicaDisks.values()) await d.close();
    }
    for (const b of this.backups.values()) for (const l of b.layers.values()) await l.close();
    await removeDurably(this.lockPath);
  }

  /** Runs control operations on one VM name one at a time (retried calls may arrive concurrently). */
  exclusive<T>(name: string, fn: () => Promise<T>): Promise<T> {
    let m = this.controlLocks.get(name);
    if (!m) this.controlLocks.set(name, (m = new Mutex()));
    return m.run(fn);
  }

  // Inventory -----------------------------------------------------------------------------------

  host(name: string): HostInfo {
    const h = this.hosts.get(name);
    if (!h) throw notFound(`host ${name}`, 'host');
    return h;
  }

  vm(host: string, name: string): LabVm {
    this.host(host);
    const vm = this.vms.get(name);
    if (!vm || vm.meta.host !== host) throw notFound(`VM ${host}/${name}`, 'vm');
    return vm;
  }

  listVms(host: string): VmInfo[] {
    this.host(host);
    return [...this.vms.values()].filter((v) => v.meta.host === host).map((v) => v.info());
  }

  async createVm(host: string, name: string, disks: DiskInfo[]): Promise<VmInfo> {
    if (this.host(host).role !== 'production') throw conflict(`host ${host} is not a production host`);
    const existing = this.vms.get(name);
    if (existing) {
      if (existing.meta.host === host && existing.meta.kind === 'source' && sameDisks(existing.meta.disks, disks))
        return existing.info();
      throw conflict(`a VM named ${name} already exists with another host or disks`);
    }
    await this.loadVm(
      {
        name,
        host,
        kind: 'source',
        powerState: 'Off',
        disks,
        profile: DEFAULT_PROFILE,
        shutdownMs: 1000,
        bootMs: 1000,
        checkpoints: [],
        referencePoints: [],
      },
      null,
      true,
    );
    await this.persist();
    return this.vm(host, name).info();
  }

  // Checkpoints and tracking --------------------------------------------------------------------

  async createCheckpoint(vm: LabVm, id: string): Promise<CheckpointMeta> {
    const existing = vm.meta.checkpoints.find((c) => c.id === id);
    if (existing) return existing;
    vm.sourceDisk(vm.meta.disks[0]!.id);
    const disks = [...vm.source.values()];
    const stores = await this.newLayers(vm, (disk) => stem.checkpoint(id, disk));
    // All disks are locked together so the checkpoint is consistent across them.
    const meta = await lockAll(disks, async () => {
      const epochs: Record<string, number> = {};
      for (const d of disks) {
        d.checkpoints.set(id, { cow: stores.get(d.id)!, cowEpoch: new Map() });
        epochs[d.id] = d.epoch;
      }
      const m: CheckpointMeta = { id, createdAt: now(), generation: this.generation, epochs };
      vm.meta.checkpoints.push(m);
      return m;
    });
    crashPoint('create-checkpoint:after-files');
    await this.persist();
    return meta;
  }

  async deleteCheckpoint(vm: LabVm, id: string): Promise<void> {
    if (!vm.meta.checkpoints.some((c) => c.id === id)) return;
    const disks = [...vm.source.values()];
    const layers = await lockAll(disks, () => {
      const out = disks.map((d) => d.checkpoints.get(id)!.cow);
      for (const d of disks) d.checkpoints.delete(id);
      vm.meta.checkpoints = vm.meta.checkpoints.filter((c) => c.id !== id);
      return Promise.resolve(out);
    });
    await this.persist();
    crashPoint('delete-checkpoint:after-metadata');
    await this.dropLayers(vm, layers);
  }

  async createReferencePoint(vm: LabVm, id: string, checkpointId: string): Promise<ReferencePointMeta> {
    const existing = vm.meta.referencePoints.find((r) => r.id === id);
    if (existing) {
      if (existing.checkpointId !== checkpointId)
        throw conflict(`reference point ${id} exists for checkpoint ${existing.checkpointId}`);
      return existing;
    }
    const cp = vm.meta.checkpoints.find((c) => c.id === checkpointId);
    if (!cp) throw notFound(`checkpoint ${vm.name}/${checkpointId}`, 'checkpointId');
    const meta: ReferencePointMeta = { ...cp, id, checkpointId, createdAt: now() };
    vm.meta.referencePoints.push(meta);
    await this.persist();
    return meta;
  }

  async deleteReferencePoint(vm: LabVm, id: string): Promise<void> {
    vm.meta.referencePoints = vm.meta.referencePoints.filter((r) => r.id !== id);
    await this.persist();
  }

  trackingValid(r: { generation: number }): boolean {
    return r.generation === this.generation;
  }

  changedBlocks(vm: LabVm, disk: string, referencePointId: string, checkpointId: string): number[] {
    const d = vm.sourceDisk(disk);
    const ref = vm.meta.referencePoints.find((r) => r.id === referencePointId);
    if (!ref) throw notFound(`reference point ${vm.name}/${referencePointId}`, 'referencePointId');
    const cp = vm.meta.checkpoints.find((c) => c.id === checkpointId);
    if (!cp) throw notFound(`checkpoint ${vm.name}/${checkpointId}`, 'checkpointId');
    if (!this.trackingValid(ref) || !this.trackingValid(cp))
      throw trackingLost(
        `change tracking of ${vm.name} since reference point ${referencePointId} was lost by an unclean host stop`,
      );
    const since = ref.epochs[disk]!;
    if (cp.epochs[disk]! < since)
      throw conflict(`checkpoint ${checkpointId} is older than reference point ${referencePointId}`);
    return d.changedBlocks(since, checkpointId);
  }

  /**
   * Writes one piece into a powered-off source VM's disk (failback); tracked like guest writes. Checked under the
   * disk lock, so that once fenceWrites has returned no write with an older token lands.
   */
  async writeSourceDisk(vm: LabVm, disk: string, frame: ExtentData, fence: string | undefined): Promise<void> {
    const d = vm.sourceDisk(disk);
    await d.lock.run(async () => {
      if (vm.meta.powerState !== 'Off') throw conflict(`${vm.name} is ${vm.meta.powerState}; writes need it Off`);
      if (vm.meta.writeFence !== undefined && fence !== vm.meta.writeFence)
        throw conflict(`writes to ${vm.name} are fenced: this writer's fence token is not the current one`);
      await d.writeLocked([frame]);
    });
  }

  async fenceWrites(vm: LabVm, token: string): Promise<void> {
    if (vm.meta.kind !== 'source') throw conflict(`${vm.name} is a replica; write fences guard source VM disks`);
    if (vm.meta.writeFence === token) return;
    // Taking every disk lock waits out the writes admitted under the previous fence.
    await lockAll([...vm.source.values()], async () => {
      vm.meta.writeFence = token;
    });
    await this.persist();
  }

  // Block reads ---------------------------------------------------------------------------------

  /** Reads extents through a view in ≤4 MiB pieces, each under the disk lock for a stable image. */
  async *readExtents(
    lock: { run<T>(fn: () => Promise<T>): Promise<T> },
    view: () => View,
    extents: { offset: number; length: number }[],
    ring?: BufferRing,
  ): AsyncGenerator<ExtentData> {
    // The next piece is read while the current one is on its way (double buffering).
    const read = (c: Extent) => {
      const into = ring?.take(c.length);
      const p = lock.run(() => readView(view(), c.offset, c.length, into));
      p.catch(() => undefined); // a consumer that stops early leaves the prefetch unawaited
      return p;
    };
    let next: { chunk: Extent; data: Promise<Buffer> } | null = null;
    for (const chunk of readChunks(extents)) {
      const current = next;
      next = { chunk, data: read(chunk) };
      if (current) yield { offset: current.chunk.offset, data: await current.data };
    }
    if (next) yield { offset: next.chunk.offset, data: await next.data };
  }

  // Replica side --------------------------------------------------------------------------------

  async createReplica(host: string, name: string, sourceVm: string, disks: DiskInfo[]): Promise<ReplicaInfo> {
    if (this.host(host).role !== 'dr') throw conflict(`host ${host} is not a DR host`);
    const existing = this.vms.get(name);
    if (existing) {
      if (
        existing.meta.host === host &&
        existing.meta.replica?.sourceVm === sourceVm &&
        sameDisks(existing.meta.disks, disks)
      )
        return existing.replicaInfo();
      throw conflict(`a VM named ${name} already exists with another host, source or disks`);
    }
    const src = this.vms.get(sourceVm);
    await this.loadVm(
      {
        name,
        host,
        kind: 'replica',
        powerState: 'Off',
        disks,
        profile: src?.meta.profile ?? DEFAULT_PROFILE,
        shutdownMs: src?.meta.shutdownMs ?? 1000,
        bootMs: src?.meta.bootMs ?? 1000,
        checkpoints: [],
        referencePoints: [],
        replica: { sourceVm, points: [], headPointId: null, running: false, consolidated: false, merging: null },
      },
      null,
      true,
    );
    await this.persist();
    return this.vm(host, name).replicaInfo();
  }

  private refuseConsolidated(vm: LabVm, what: string): void {
    if (vm.replica.consolidated) throw conflict(`${vm.name} is permanently failed over (consolidated): ${what}`);
  }

  async beginPoint(vm: LabVm, id: string, spec: RestorePointSpec): Promise<RestorePointInfo> {
    const r = vm.replica;
    this.refuseConsolidated(vm, 'no restore point can be opened on it');
    const existing = r.points.find((p) => p.id === id);
    if (existing) return vm.pointInfo(existing);
    if (r.running) throw conflict(`${vm.name} has a running layer (failed over); undo or commit it first`);
    const newestSealed = [...r.points].reverse().find((p) => p.sealed);
    if ((newestSealed?.id ?? null) !== r.headPointId)
      throw conflict(`${vm.name} is reverted to ${r.headPointId ?? 'its base'}`);
    // An open point left by an abandoned run is replaced: its blocks were never sealed.
    for (const stale of r.points.filter((p) => !p.sealed)) await this.dropPoint(vm, stale.id);
    const layers = await this.newLayers(vm, (disk) => stem.point(id, disk));
    crashPoint('begin-point:after-files');
    for (const d of vm.replicaDisks.values()) d.points.set(id, layers.get(d.id)!);
    const meta = newPointMeta(id, spec, false);
    r.points.push(meta);
    await this.persist();
    return vm.pointInfo(meta);
  }

  /** The layer of an open point that writes may go to; refused once the point is sealed (or being sealed). */
  openPointLayer(vm: LabVm, pointId: string, disk: string): Layer {
    const p = vm.replica.points.find((x) => x.id === pointId);
    if (!p) throw notFound(`restore point ${vm.name}/${pointId}`, 'pointId');
    if (p.sealed || vm.pointGate(pointId).closed) throw conflict(`restore point ${pointId} is sealed`);
    return vm.replicaDisk(disk).points.get(pointId)!;
  }

  /**
   * Writes one piece of an upload or a send into an open point. Checked for every piece, so that a writer that
   * was given up for dead (a partitioned proxy) stops at the seal instead of changing a sealed point.
   */
  writePoint(
    vm: LabVm,
    pointId: string,
    disk: string,
    offset: number,
    data: Buffer | readonly Buffer[],
  ): Promise<void> {
    const layer = this.openPointLayer(vm, pointId, disk);
    return vm.pointGate(pointId).track(layer.write(offset, data));
  }

  async sealPoint(vm: LabVm, id: string, metadata: Record<string, string> = {}): Promise<RestorePointInfo> {
    const p = vm.replica.points.find((x) => x.id === id);
    if (!p) throw notFound(`restore point ${vm.name}/${id}`, 'pointId');
    if (!p.sealed) {
      const gate = vm.pointGate(id);
      await gate.close();
      try {
        for (const d of vm.replicaDisks.values()) await d.points.get(id)!.sync();
      } catch (e) {
        gate.closed = false; // not sealed: the copy may go on and the seal be retried
        throw e;
      }
      p.metadata = { ...p.metadata, ...metadata };
      p.sealed = true;
      vm.replica.headPointId = id;
      await this.persist();
      vm.dropPointGate(id);
    }
    return vm.pointInfo(p);
  }

  async revert(vm: LabVm, pointId: string): Promise<ReplicaInfo> {
    this.refuseConsolidated(vm, 'it cannot be reverted');
    const p = vm.replica.points.find((x) => x.id === pointId);
    if (!p) throw notFound(`restore point ${vm.name}/${pointId}`, 'pointId');
    if (!p.sealed) throw conflict(`restore point ${pointId} is not sealed`);
    if (vm.meta.powerState !== 'Off') throw conflict(`${vm.name} is ${vm.meta.powerState}; revert needs it Off`);
    if (vm.replica.running) throw conflict(`${vm.name} has a running layer; discard it first`);
    vm.replica.headPointId = pointId;
    await this.persist();
    return vm.replicaInfo();
  }

  async mergeOldest(vm: LabVm, pointId: string): Promise<ReplicaInfo> {
    const r = vm.replica;
    const i = r.points.findIndex((p) => p.id === pointId);
    if (i < 0) return vm.replicaInfo(); // merged already
    if (i !== 0) throw conflict(`restore point ${pointId} is not the oldest (${r.points[0]!.id} is)`);
    if (!r.points[0]!.sealed) throw conflict(`restore point ${pointId} is not sealed`);
    if (r.points.length === 1 && !r.running)
      throw conflict(`restore point ${pointId} is the only one; retention keeps it`);
    r.merging = pointId;
    await this.persist();
    await this.finishMerge(vm);
    return vm.replicaInfo();
  }

  async consolidate(vm: LabVm): Promise<ReplicaInfo> {
    // Open points are dropped by the consolidation: their writers stop first.
    for (const p of vm.replica.points.filter((x) => !x.sealed)) await vm.pointGate(p.id).close();
    vm.replica.merging = CONSOLIDATING;
    await this.persist();
    await this.finishMerge(vm);
    return vm.replicaInfo();
  }

  /**
   * Completes the merge recorded in metadata; repeating a partly done merge is harmless. A consolidation holds every
   * disk's lock until its metadata is saved: a guest write into a base merged already would otherwise be
   * overwritten by the older blocks when a crash makes the merge run again.
   */
  private async finishMerge(vm: LabVm): Promise<void> {
    const r = vm.meta.replica;
    if (!r?.merging) return;
    const disks = [...vm.replicaDisks.values()];
    const doomed: Layer[] = [];
    if (r.merging === CONSOLIDATING) {
      const chain = vm.headChain();
      await lockAll(disks, async () => {
        for (const d of disks) {
          for (const id of chain) await d.mergeIntoBase(d.points.get(id)!);
          if (d.running) await d.mergeIntoBase(d.running);
          crashPoint('merge:after-first-disk');
          doomed.push(...d.points.values());
          if (d.running) doomed.push(d.running);
          d.points.clear();
          d.running = null;
        }
        r.points = [];
        r.headPointId = null;
        r.running = false;
        r.consolidated = true;
        r.merging = null;
        await this.persist();
      });
    } else {
      const id = r.merging;
      for (const d of disks)
        await d.lock.run(async () => {
          const layer = d.points.get(id);
          if (!layer) return;
          await d.mergeIntoBase(layer);
          crashPoint('merge:after-first-disk');
          d.points.delete(id);
          doomed.push(layer);
        });
      r.points = r.points.filter((p) => p.id !== id);
      if (r.headPointId === id) r.headPointId = null;
      r.merging = null;
      await this.persist();
    }
    await this.dropLayers(vm, doomed);
  }

  async discardRunning(vm: LabVm): Promise<ReplicaInfo> {
    const r = vm.replica;
    if (vm.meta.powerState !== 'Off') throw conflict(`${vm.name} is ${vm.meta.powerState}; power it off first`);
    const disks = [...vm.replicaDisks.values()];
    // Under the disk locks: a read of the running view in flight finishes before its layer goes.
    const layers = await lockAll(disks, async () => {
      const out = disks.flatMap((d) => (d.running ? [d.running] : []));
      for (const d of disks) d.running = null;
      return out;
    });
    r.running = false;
    r.headPointId = [...r.points].reverse().find((p) => p.sealed)?.id ?? null;
    await this.persist();
    crashPoint('discard-running:after-metadata');
    await this.dropLayers(vm, layers);
    return vm.replicaInfo();
  }

  /**
   * The running layer's files become the point's. The intent is saved first, so that a crash between the renames
   * is finished at start-up (finishInterruptedSeals) instead of opening the running layer's old name as a new,
   * empty layer.
   */
  async sealRunning(vm: LabVm, id: string, spec: RestorePointSpec): Promise<RestorePointInfo> {
    const r = vm.replica;
    this.refuseConsolidated(vm, 'its running state is its base, there is no running layer to seal');
    const existing = r.points.find((p) => p.id === id);
    if (existing) return vm.pointInfo(existing);
    if (vm.meta.powerState !== 'Off') throw conflict(`${vm.name} is ${vm.meta.powerState}; power it off first`);
    if (!r.running) throw conflict(`${vm.name} has no running layer`);
    // The running layer sits on the head; points above a reverted head belong to an abandoned branch.
    const headIndex = r.headPointId === null ? -1 : r.points.findIndex((p) => p.id === r.headPointId);
    for (const p of r.points.slice(headIndex + 1)) await this.dropPoint(vm, p.id);
    const disks = [...vm.replicaDisks.values()];
    const point = await lockAll(disks, async () => {
      for (const d of disks) {
        await d.running!.sync();
        await d.running!.close();
      }
      r.sealing = newPointMeta(id, spec, true);
      await this.persist();
      crashPoint('seal-running:after-intent');
      await moveRunningLayerFiles(
        vmDir(this.dataDir, vm.name),
        disks.map((d) => d.id),
        id,
      );
      for (const d of disks) {
        d.points.set(id, await Layer.open(this.layerPath(vm.name, stem.point(id, d.id)), d.sizeBytes));
        d.running = null;
      }
      const sealed = finishSealing(r);
      await this.persist();
      return sealed;
    });
    return vm.pointInfo(point);
  }

  /** Drops a point that was opened and never sealed; a sealed one is refused, an unknown one is gone already. */
  async discardPoint(vm: LabVm, id: string): Promise<void> {
    const p = vm.replica.points.find((x) => x.id === id);
    if (!p) return;
    if (p.sealed) throw conflict(`restore point ${id} is sealed; only an open point can be discarded`);
    await this.dropPoint(vm, id);
  }

  private async dropPoint(vm: LabVm, id: string): Promise<void> {
    await vm.pointGate(id).close();
    const disks = [...vm.replicaDisks.values()];
    const layers = await lockAll(disks, async () => {
      const out = disks.flatMap((d) => {
        const l = d.points.get(id);
        return l ? [l] : [];
      });
      for (const d of disks) d.points.delete(id);
      return out;
    });
    vm.replica.points = vm.replica.points.filter((p) => p.id !== id);
    await this.persist();
    crashPoint('drop-point:after-metadata');
    await this.dropLayers(vm, layers);
    vm.dropPointGate(id);
  }

  /**
   * Overwrites one block of one layer with corruptBlockContent, for tests of the verification: like a fault of the
   * storage, it bypasses copy-on-write, change tracking, seals and fences.
   */
  async corruptBlock(vm: LabVm, disk: string, block: number, layer: 'base' | { pointId: string }): Promise<void> {
    const data = corruptBlockContent(vm.name, disk, block);
    if (vm.meta.kind === 'source') {
      if (layer !== 'base') throw conflict(`${vm.name} is a source VM: it has no restore points, only its base`);
      const d = vm.sourceDisk(disk);
      await d.lock.run(() => d.base.write(block * BLOCK_SIZE, data));
      return;
    }
    const d = vm.replicaDisk(disk);
    let target = d.base;
    if (layer !== 'base') {
      const point = d.points.get(layer.pointId);
      if (!point) throw notFound(`restore point ${vm.name}/${layer.pointId}`, 'body.layer.pointId');
      target = point;
    }
    await d.lock.run(() => target.write(block * BLOCK_SIZE, data));
  }

  // Backups -------------------------------------------------------------------------------------

  async takeBackup(vm: LabVm): Promise<BackupPointInfo> {
    const id = `${vm.name}-${Date.now().toString(36)}-${this.backups.size + 1}`;
    const cpId = `${BACKUP_CHECKPOINT_PREFIX}${id}`;
    await this.createCheckpoint(vm, cpId);
    const layers = new Map<string, Layer>();
    try {
      // The backup's files come first; until its metadata is saved they are garbage to the start-up sweep.
      const dir = backupDir(this.dataDir, id);
      await mkdir(dir, { recursive: true });
      await fsyncPath(join(this.dataDir, 'backups'));
      const sources = [...vm.source.values()];
      const made = await createLayers(
        dir,
        sources.map((d) => ({ path: join(dir, d.id), sizeBytes: d.sizeBytes })),
      );
      for (const [i, d] of sources.entries()) {
        const layer = made[i]!;
        const extents = blocksToExtents(viewAllocatedBlocks(d.view(cpId)), 0, Number.MAX_SAFE_INTEGER).extents;
        for await (const chunk of this.readExtents(d.lock, () => d.view(cpId), extents))
          await layer.write(chunk.offset, chunk.data);
        await layer.sync();
        layers.set(d.id, layer);
      }
    } finally {
      await this.deleteCheckpoint(vm, cpId);
    }
    const meta: BackupMeta = { id, vm: vm.name, createdAt: now(), disks: vm.meta.disks };
    this.backups.set(id, { meta, layers });
    await this.persist();
    return meta;
  }

  backupLayer(backupId: string, disk: string): Layer {
    const b = this.backups.get(backupId);
    if (!b) throw notFound(`backup ${backupId}`, 'backupId');
    const l = b.layers.get(disk);
    if (!l) throw notFound(`disk ${disk} of backup ${backupId}`, 'disk');
    return l;
  }
}

const stopped = (): HostApiError => new HostApiError(503, 'lab_stopped', 'the lab is stopping: nothing more is saved');

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

function sameDisks(a: DiskInfo[], b: DiskInfo[]): boolean {
  return a.length === b.length && a.every((d, i) => d.id === b[i]!.id && d.sizeBytes === b[i]!.sizeBytes);
}

async function lockAll<T>(
  disks: { lock: { run<R>(fn: () => Promise<R>): Promise<R> } }[],
  fn: () => Promise<T>,
): Promise<T> {
  const [first, ...rest] = disks;
  if (!first) return fn();
  return first.lock.run(() => lockAll(rest, fn));
}

export type { LabVm };

/** A restore point's metadata as it is first written, open or (from a running layer) already sealed. */
function newPointMeta(id: string, spec: RestorePointSpec, sealed: boolean): PointMeta {
  return {
    id,
    createdAt: now(),
    kind: spec.kind,
    crashConsistent: spec.crashConsistent,
    metadata: spec.metadata ?? {},
    sealed,
  };
}
