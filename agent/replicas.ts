// The replica side of the port on a KVM DR host: restore points as qcow2 overlay chains in the host process's
// storage. Each disk has a base image; each point is an overlay on the previous one. An open point is written
// through a writable NBD export of its overlay (qemu-storage-daemon; the chain below is opened read-only); sealing
// flushes and closes that export and makes the point the head. Reads of a point go through a read-only export of
// its overlay, which sees the whole chain below it. Sealed files never change while anything stands on them.
import { execFile } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';
import { createHash } from 'node:crypto';
import { mkdir, readdir, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { CANARY_BYTES, parseCanary } from './canary';
import { digestsOf, verifyStored } from '../src/host-api/digests';
import { conflict, HostApiError, notFound } from '../src/host-api/errors';
import type { DigestsFrame, FramePiece } from '../src/host-api/frames';
import type { HostJobRunning } from '../src/host-api/schemas';
import { exists, fsyncPath, writeFileAtomic } from '../src/host-api/persist';
import {
  BLOCK_SIZE,
  type BlockDigests,
  type DiskInfo,
  type Extent,
  type ExtentData,
  type PowerResult,
  type PowerState,
  type ReplicaInfo,
  type ReplicaView,
  type RestorePointInfo,
  type RestorePointSpec,
  type ShutdownResult,
  type VmDefinition,
  type VmInfo,
  type WriteResult,
  type WriteVerification,
} from '../src/hypervisor/port';
import { HostJobs } from './jobs';
import { lines, VirshError, type Virsh } from './libvirt/virsh';
import { NbdClient } from './nbd/client';
import { acpiShutdown, destroyDomain, isNoSuchDomain, parseDomState, powerStateOf } from './power';
import { DefinitionError, domainXml, domainXmlOfRequest, type DomainSpec } from './definition';
import { READ_PIECE_BYTES, readPieces, toBlocks } from './source-domains';
import type { HostState, PointRecord, ReplicaRecord } from './state';
import { connectImageExport, stopStaleExport, type ImageExport } from './storage-daemon';

const run = promisify(execFile);
/** A qcow2 file whose reads fall through to `backing` wherever it holds nothing of its own. */
const createOverlay = (backing: string, file: string) =>
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', backing, '-F', 'qcow2', file]);

export const notOnKvmYet = (what: string): HostApiError =>
  new HostApiError(501, 'not_implemented', `${what} is not served by KVM hosts yet (only by the lab)`);

interface OpenExport {
  daemon: ImageExport;
  nbd: NbdClient;
}

export class KvmReplicas {
  private readonly locks = new Map<string, Promise<unknown>>();
  /** NBD exports by image file: writable ones of open points, read-only ones of sealed points. */
  private readonly exports = new Map<string, Promise<OpenExport>>();
  private readonly gates = new Map<string, { closed: boolean; inFlight: Set<Promise<void>> }>();

  private readonly jobs: HostJobs;

  constructor(
    private readonly options: {
      host: string;
      stateDir: string;
      state: HostState;
      virsh: Virsh;
      /** Where the firmware and kernels that replicas' definitions name may come from. */
      bootFileDirs: readonly string[];
      /** How long a request waits for a long operation before it answers 202 (it runs on). Default 2 s. */
      jobWaitMs?: number;
      /** A live commit's rate limit in MiB/s (libvirt's `--bandwidth`); none: as fast as the storage goes. */
      commitBandwidthMiBps?: number;
    },
  ) {
    this.jobs = new HostJobs(options.jobWaitMs ?? 2_000);
  }

  /**
   * Every export daemon a previous run of the process left (it was killed) is stopped: their pid files are in the
   * run directory, and nothing of this run uses them yet.
   */
  async stopLeftoverExports(): Promise<void> {
    const run = join(this.options.stateDir, 'run');
    for (const f of await readdir(run).catch(() => [])) if (f.endsWith('.nbd.pid')) await stopStaleExport(join(run, f));
  }

  async close(): Promise<void> {
    for (const image of [...this.exports.keys()]) await this.closeExport(image);
  }

  private exclusive<T>(replica: string, fn: () => Promise<T>): Promise<T> {
    const previous = this.locks.get(replica) ?? Promise.resolve();
    const next = previous.then(fn, fn);
    const tail = next.catch(() => undefined);
    this.locks.set(replica, tail);
    void tail.then(() => {
      if (this.locks.get(replica) === tail) this.locks.delete(replica);
    });
    return next;
  }

  private dirOf(replica: string): string {
    return join(this.options.stateDir, 'replicas', replica);
  }

  /** The replica's domain as made from its source's definition, its disks still to be named. */
  private domainSpec(replica: string, disks: DiskInfo[]): DomainSpec {
    return {
      name: replica,
      disks: new Map(disks.map((d) => [d.id, this.imageOf(replica, null, d.id)])),
      consoleLog: join(this.dirOf(replica), 'console.log'),
      nvram: join(this.dirOf(replica), 'nvram.fd'),
      bootFileDirs: this.options.bootFileDirs,
      macs: 'own',
    };
  }

  /** The definition, checked now (it must become this replica's domain), so a bad one is refused where it arrives. */
  private checkedDefinition(replica: string, disks: DiskInfo[], definition: VmDefinition): string {
    domainXmlOfRequest(definition.text, this.domainSpec(replica, disks));
    return definition.text;
  }

  private imageOf(replica: string, layer: string | null, disk: string): string {
    return join(this.dirOf(replica), `${layer ?? '_base'}.${disk}.qcow2`);
  }

  private record(replica: string): ReplicaRecord {
    const r = this.options.state.replica(replica);
    if (!r) throw notFound(`replica ${replica}`, 'replica');
    return r;
  }

  private async info(replica: string, r: ReplicaRecord): Promise<ReplicaInfo> {
    return {
      name: replica,
      host: this.options.host,
      sourceVm: r.sourceVm,
      powerState: (await this.domainState(replica)).power,
      disks: r.disks,
      points: r.points.map(pointInfo),
      headPointId: r.headPointId,
      hasRunningLayer: r.running,
      consolidated: r.consolidated,
      consolidating: r.consolidating && !r.consolidated,
    };
  }

  has(name: string): boolean {
    return this.options.state.replica(name) !== null;
  }

  names(): string[] {
    return this.options.state.replicaNames();
  }

  getReplica(replica: string): Promise<ReplicaInfo> {
    return this.info(replica, this.record(replica));
  }

  createReplica(replica: string, sourceVm: string, disks: DiskInfo[], definition?: VmDefinition): Promise<ReplicaInfo> {
    return this.exclusive(replica, async () => {
      const known = this.options.state.replica(replica);
      if (known) {
        const same = known.sourceVm === sourceVm && JSON.stringify(known.disks) === JSON.stringify(disks);
        if (!same) throw conflict(`a replica named ${replica} already exists with another source or disks`);
        // The source's definition as it is now (an operator may have given it memory): used at the next power-on.
        if (definition && definition.text !== known.definition) {
          known.definition = this.checkedDefinition(replica, disks, definition);
          await this.options.state.setReplica(replica, known);
        }
        return this.info(replica, known);
      }
      // Checked first, before libvirt is asked anything: a refused definition is a 400 and leaves nothing behind.
      const checked = definition ? this.checkedDefinition(replica, disks, definition) : null;
      // The replica's domain will carry its name: one another tool defined is not ours to redefine or power.
      if ((await this.uuidOfName(replica)) !== null)
        throw conflict(`a libvirt domain named ${replica} already exists on ${this.options.host}; it is not a replica`);
      // Files first, then the record: a crash in between leaves files no record names, made again on the retry.
      await mkdir(this.dirOf(replica), { recursive: true });
      for (const d of disks)
        await run('qemu-img', ['create', '-q', '-f', 'qcow2', this.imageOf(replica, null, d.id), String(d.sizeBytes)]);
      await fsyncPath(this.dirOf(replica));
      const record: ReplicaRecord = {
        sourceVm,
        disks,
        points: [],
        headPointId: null,
        merging: null,
        definition: checked,
        domainUuid: null,
        running: false,
        sealingRunning: null,
        consolidating: false,
        consolidated: false,
      };
      await this.options.state.setReplica(replica, record);
      return this.info(replica, record);
    });
  }

  beginRestorePoint(replica: string, pointId: string, spec: RestorePointSpec): Promise<RestorePointInfo> {
    return this.exclusive(replica, async () => {
      const r = this.record(replica);
      const existing = r.points.find((p) => p.id === pointId);
      if (existing) return pointInfo(existing);
      refuseConsolidated(replica, r);
      if (r.running)
        throw conflict(`${replica} has a running layer (it was failed over); no restore point goes under it`);
      const newestSealed = [...r.points].reverse().find((p) => p.sealed);
      if ((newestSealed?.id ?? null) !== r.headPointId)
        throw conflict(`${replica} is reverted to ${r.headPointId ?? 'its base'}`);
      // An open point left by an abandoned run is replaced: its blocks were never sealed.
      for (const stale of r.points.filter((p) => !p.sealed)) await this.dropPoint(replica, stale.id);
      for (const d of r.disks)
        await createOverlay(this.imageOf(replica, r.headPointId, d.id), this.imageOf(replica, pointId, d.id));
      await fsyncPath(this.dirOf(replica));
      const point = newPointRecord(pointId, spec, false);
      const next = this.record(replica);
      next.points.push(point);
      await this.options.state.setReplica(replica, next);
      this.gates.delete(`${replica}/${pointId}`); // a point of that id dropped before is another point
      return pointInfo(point);
    });
  }

  /** The open point's disk, checked: writes go nowhere else. */
  openPointDisk(replica: string, pointId: string, disk: string): DiskInfo {
    const r = this.record(replica);
    const p = r.points.find((x) => x.id === pointId);
    if (!p) throw notFound(`restore point ${replica}/${pointId}`, 'pointId');
    if (p.sealed) throw conflict(`restore point ${pointId} is sealed`);
    const d = r.disks.find((x) => x.id === disk);
    if (!d) throw notFound(`disk ${replica}/${disk}`, 'disk');
    return d;
  }

  /**
   * The image's NBD export, started when there is none; one whose daemon died or whose connection broke is replaced
   * (its writes that no flush covered were never acknowledged: their requests failed, and their senders repeat them).
   */
  private async exportOf(image: string, writable: boolean): Promise<NbdClient> {
    let open = this.exports.get(image);
    if (open) {
      const e = await open.catch(() => null);
      if (e && (!e.daemon.running || e.nbd.closed)) {
        if (this.exports.get(image) === open) await this.closeExport(image);
        return this.exportOf(image, writable);
      }
    }
    if (!open) {
      const key = createHash('sha256').update(image).digest('hex').slice(0, 16);
      const socket = join(this.options.stateDir, 'run', `${key}.nbd.sock`);
      const pidFile = join(this.options.stateDir, 'run', `${key}.nbd.pid`);
      open = connectImageExport({ image, socket, pidFile, writable });
      this.exports.set(image, open);
      open.catch(() => this.exports.delete(image));
    }
    return (await open).nbd;
  }

  /** Every export of the replica's files (its directory's: `web1/`, not `web10/`). */
  private async closeExportsOf(replica: string): Promise<void> {
    const dir = `${this.dirOf(replica)}/`;
    for (const image of [...this.exports.keys()]) if (image.startsWith(dir)) await this.closeExport(image);
  }

  private async closeExport(image: string): Promise<void> {
    const open = this.exports.get(image);
    if (!open) {
      // One a previous run of the process left behind still holds the image's lock.
      const key = createHash('sha256').update(image).digest('hex').slice(0, 16);
      await stopStaleExport(join(this.options.stateDir, 'run', `${key}.nbd.pid`));
      return;
    }
    this.exports.delete(image);
    const e = await open.catch(() => null);
    if (!e) return;
    await e.nbd.close().catch(() => e.nbd.destroy());
    await e.daemon.stop();
  }

  /**
   * One write request into an open point's disk: every piece through one writer export, checked as it arrives (so
   * nothing lands once the point's seal has begun), and the export flushed before the request answers, so that an
   * answered write is on stable storage. A writer that dies part-way fails the request; its sender repeats it.
   */
  async writePoint(
    replica: string,
    pointId: string,
    disk: string,
    receive: (
      sizeBytes: number,
      write: (piece: FramePiece) => Promise<void>,
      onDigests: (frame: DigestsFrame) => void,
    ) => Promise<number>,
  ): Promise<WriteResult> {
    const { sizeBytes } = this.openPointDisk(replica, pointId, disk);
    const image = this.imageOf(replica, pointId, disk);
    const gate = this.gateOf(replica, pointId);
    let writer: Promise<NbdClient> | undefined;
    const gated = async (step: () => Promise<void>): Promise<void> => {
      if (gate.closed) throw conflict(`restore point ${pointId} is sealed`);
      const done = step();
      gate.inFlight.add(done);
      try {
        await done;
      } finally {
        gate.inFlight.delete(done);
      }
    };
    const sent: DigestsFrame[] = [];
    const bytesWritten = await receive(
      sizeBytes,
      (piece) =>
        gated(async () => {
          const nbd = await (writer ??= this.exportOf(image, true));
          await nbd.write(piece.offset, piece.parts.length === 1 ? piece.parts[0]! : Buffer.concat(piece.parts));
        }),
      (d) => sent.push(d),
    );
    // The same connection that took the writes: a replacement daemon would flush nothing of theirs.
    if (writer)
      await gated(async () => (await writer!).flush()).catch(async (e: unknown) => {
        // QEMU fails every later flush of an image once one failed (it no longer trusts its page cache), also when
        // the space is back after the storage filled up: the daemon is replaced, and the sender repeats these writes.
        await this.closeExport(image).catch(() => undefined);
        throw e;
      });
    if (sent.length === 0) return { bytesWritten };
    // The source's digests came with the data: what the point now holds is read back and compared.
    let verification: WriteVerification | undefined;
    await gated(async () => {
      const nbd = await (writer ??= this.exportOf(image, true));
      verification = await verifyStored(sent, (e) => nbd.read(e.offset, e.length));
    });
    return { bytesWritten, verification: verification! };
  }

  /** The writes in flight into an open point, and whether its seal (or drop) has begun. */
  private gateOf(replica: string, pointId: string): { closed: boolean; inFlight: Set<Promise<void>> } {
    const key = `${replica}/${pointId}`;
    let gate = this.gates.get(key);
    if (!gate) this.gates.set(key, (gate = { closed: false, inFlight: new Set() }));
    return gate;
  }

  /** Refuses new writes into the point and waits for those in flight, so none reopens its image afterwards. */
  private async closeGate(replica: string, pointId: string): Promise<void> {
    const gate = this.gateOf(replica, pointId);
    gate.closed = true;
    await Promise.allSettled([...gate.inFlight]);
  }

  sealRestorePoint(replica: string, pointId: string, metadata?: Record<string, string>): Promise<RestorePointInfo> {
    return this.exclusive(replica, async () => {
      const r = this.record(replica);
      const p = r.points.find((x) => x.id === pointId);
      if (!p) throw notFound(`restore point ${replica}/${pointId}`, 'pointId');
      if (p.sealed) return pointInfo(p);
      await this.closeGate(replica, pointId);
      let bytesWritten = 0;
      for (const d of r.disks) {
        const image = this.imageOf(replica, pointId, d.id);
        await this.closeExport(image); // the daemon's exit flushes and releases the image
        await fsyncPath(image);
        // What the point holds of its own: written blocks, however often a retried copy wrote them.
        for (const e of await this.mapped({ image, open: false }, true)) bytesWritten += e.length;
      }
      Object.assign(p, { sealed: true, bytesWritten, metadata: { ...p.metadata, ...metadata } });
      r.headPointId = pointId;
      await this.options.state.setReplica(replica, r);
      return pointInfo(p);
    });
  }

  discardRestorePoint(replica: string, pointId: string): Promise<void> {
    return this.exclusive(replica, async () => {
      const p = this.record(replica).points.find((x) => x.id === pointId);
      if (!p) throw notFound(`restore point ${replica}/${pointId}`, 'pointId');
      if (p.sealed) throw conflict(`restore point ${pointId} is sealed; only an open point can be discarded`);
      await this.dropPoint(replica, pointId);
    });
  }

  /** Record first, then files: a crash in between leaves files no record names, removed at the next begin. */
  private async dropPoint(replica: string, pointId: string): Promise<void> {
    await this.closeGate(replica, pointId);
    const r = this.record(replica);
    r.points = r.points.filter((x) => x.id !== pointId);
    await this.options.state.setReplica(replica, r);
    for (const d of r.disks) {
      const image = this.imageOf(replica, pointId, d.id);
      await this.closeExport(image);
      await rm(image, { force: true });
    }
    await fsyncPath(this.dirOf(replica));
  }

  /**
   * Retention: the oldest point's data goes into the base (`qemu-img commit`), the next point is rebased onto the
   * base (its view is unchanged: it sees the same blocks, now found one layer lower), and the oldest file goes. The
   * merge is recorded first; each step can run again after a crash at any line.
   */
  mergeOldest(replica: string, pointId: string): Promise<ReplicaInfo | HostJobRunning> {
    return this.jobs.follow(`${replica}/merge`, `merging ${pointId} of ${replica} into its base`, () =>
      this.mergeOldestNow(replica, pointId),
    );
  }

  private mergeOldestNow(replica: string, pointId: string): Promise<ReplicaInfo> {
    return this.exclusive(replica, async () => {
      let r = this.record(replica);
      if (r.merging === null) {
        const i = r.points.findIndex((p) => p.id === pointId);
        if (i < 0) return this.info(replica, r); // merged already
        if (i !== 0) throw conflict(`restore point ${pointId} is not the oldest (${r.points[0]!.id} is)`);
        if (!r.points[0]!.sealed) throw conflict(`restore point ${pointId} is not sealed`);
        if (r.points.length === 1 && !r.running)
          throw conflict(`restore point ${pointId} is the only one; retention keeps it`);
        // The guest's QEMU holds the chain open: its files are not rewritten under it.
        await this.refuseRunning(replica, 'merging its oldest point');
        r.merging = pointId;
        await this.options.state.setReplica(replica, r);
      }
      await this.finishMerge(replica);
      r = this.record(replica);
      return this.info(replica, r);
    });
  }

  private async finishMerge(replica: string): Promise<void> {
    const r = this.record(replica);
    const oldest = r.merging;
    if (oldest === null) return;
    const next = r.points[r.points.findIndex((p) => p.id === oldest) + 1];
    // Exports read through the base: their cached metadata would not see the commit.
    await this.closeExportsOf(replica);
    for (const d of r.disks) {
      const file = this.imageOf(replica, oldest, d.id);
      const base = this.imageOf(replica, null, d.id);
      if (await exists(file)) {
        await run('qemu-img', ['commit', '-q', '-d', file]);
        const above = next ? this.imageOf(replica, next.id, d.id) : r.running ? this.runningImage(replica, d.id) : null;
        if (above) await run('qemu-img', ['rebase', '-u', '-b', base, '-F', 'qcow2', above]);
        await fsyncPath(base);
        await rm(file, { force: true });
      }
    }
    await fsyncPath(this.dirOf(replica));
    r.points = r.points.filter((p) => p.id !== oldest);
    if (r.headPointId === oldest) r.headPointId = null;
    r.merging = null;
    await this.options.state.setReplica(replica, r);
  }

  listRestorePoints(replica: string): RestorePointInfo[] {
    return this.record(replica).points.map(pointInfo);
  }

  // The replica as a VM: its libvirt domain, made from the source's definition, boots from a running layer ------

  /**
   * The replica's libvirt domain, by the UUID libvirt gave it when the agent defined it, so that a domain another tool
   * defined under the replica's name is never taken for it; null: the agent has defined none.
   */
  private async domainOf(replica: string): Promise<string | null> {
    const r = this.record(replica);
    if (r.domainUuid !== null) return r.domainUuid;
    const uuid = await this.uuidOfName(replica);
    if (uuid === null) return null;
    // One an earlier release defined (it kept no UUID) boots from nothing but the replica's own files.
    const sources = lines(await this.options.virsh.run(['domblklist', uuid]))
      .map((l) => l.split(/\s+/).slice(1).join(' '))
      .filter((source) => source !== '-');
    if (sources.length === 0 || !sources.every((source) => source.startsWith(`${this.dirOf(replica)}/`)))
      throw conflict(`a libvirt domain named ${replica} exists on ${this.options.host} that this agent did not define`);
    await this.options.state.updateReplica(replica, (x) => void (x.domainUuid = uuid));
    return uuid;
  }

  private async uuidOfName(name: string): Promise<string | null> {
    return this.options.virsh.run(['domuuid', name]).then(
      (out) => out.trim(),
      (e: unknown) => {
        if (isNoSuchDomain(e)) return null;
        throw e;
      },
    );
  }

  /** libvirt's state of the replica's domain (`ref`: its UUID); a replica never powered on has none, and is Off. */
  private async domainState(replica: string): Promise<{ state: string; power: PowerState; ref: string | null }> {
    const ref = await this.domainOf(replica);
    const off = { state: 'shut off', power: 'Off' as const, ref };
    if (ref === null) return off;
    try {
      const { state } = parseDomState(await this.options.virsh.run(['domstate', '--reason', ref]));
      return { state, power: powerStateOf(state), ref };
    } catch (e) {
      if (isNoSuchDomain(e)) return off;
      throw e;
    }
  }

  private async refuseRunning(replica: string, what: string): Promise<void> {
    const { power } = await this.domainState(replica);
    if (power !== 'Off') throw conflict(`${replica} is ${power}; ${what} needs it Off`);
  }

  /** What the replica's domain is made from: its source's definition as last replicated (null: none reached it). */
  definition(replica: string): VmDefinition | null {
    const text = this.record(replica).definition;
    return text === null ? null : { format: 'libvirt-domain-xml', text };
  }

  async vmInfo(replica: string): Promise<VmInfo> {
    const r = this.record(replica);
    return {
      name: replica,
      host: this.options.host,
      kind: 'replica',
      powerState: (await this.domainState(replica)).power,
      disks: r.disks,
      lastStop: null,
    };
  }

  private runningImage(replica: string, disk: string): string {
    return this.imageOf(replica, '_running', disk);
  }

  /** Exports of the running layer hold its metadata as it was when they opened: closed whenever it changes. */
  private async closeRunningExports(replica: string, r: ReplicaRecord): Promise<void> {
    for (const d of r.disks) await this.closeExport(this.runningImage(replica, d.id));
  }

  /** What the replica's domain boots from: its running layer, or the base once it is consolidated. */
  private bootImage(replica: string, r: ReplicaRecord, disk: string): string {
    return r.consolidated ? this.imageOf(replica, null, disk) : this.runningImage(replica, disk);
  }

  /**
   * Boots the replica from its head: a running layer (an overlay per disk on the head point) is made first,
   * recorded, and the domain defined anew from the source's definition on these files, then started.
   */
  powerOn(replica: string, options: { sourceOff?: boolean } = {}): Promise<PowerResult> {
    return this.exclusive(replica, async () => {
      await this.finishSealingRunning(replica);
      const { state, ref } = await this.domainState(replica);
      if (state === 'running') return { state: 'Running', alreadyInState: true };
      if (state === 'paused') {
        await this.options.virsh.run(['resume', ref!]);
        return { state: 'Running', alreadyInState: false };
      }
      let r = this.record(replica);
      if (r.consolidating) await this.finishConsolidation(replica);
      r = this.record(replica);
      if (r.definition === null)
        throw conflict(`no definition of ${r.sourceVm} has reached ${replica}: replicate it from its KVM host first`);
      refuseOpenPoint(replica, r);
      if (!r.consolidated && !r.running) {
        for (const d of r.disks)
          await createOverlay(this.imageOf(replica, r.headPointId, d.id), this.runningImage(replica, d.id));
        await fsyncPath(this.dirOf(replica));
        r.running = true;
        await this.options.state.setReplica(replica, r);
      }
      // Exports of the running layer read it as it was: the guest is about to change it.
      await this.closeRunningExports(replica, r);
      // Defined anew at every power-on (the definition or the layers may have changed), under the same UUID.
      let xml: string;
      try {
        xml = domainXml(r.definition, {
          ...this.domainSpec(replica, r.disks),
          ...(ref ? { uuid: ref } : {}),
          disks: new Map(r.disks.map((d) => [d.id, this.bootImage(replica, r, d.id)])),
          // The source's network identity only while the source is off: otherwise both may be on one network.
          macs: options.sourceOff ? 'source' : 'own',
        });
      } catch (e) {
        // Kept before this host checked as it does now (an older agent, other boot-file directories): no retry helps.
        if (!(e instanceof DefinitionError)) throw e;
        throw conflict(`the definition of ${r.sourceVm} that ${replica} keeps is refused now: ${e.message}`);
      }
      const file = join(this.options.stateDir, 'xml', `${replica}.xml`);
      await writeFileAtomic(file, xml);
      await this.options.virsh.run(['define', file]);
      const uuid = ref ?? (await this.uuidOfName(replica));
      if (uuid === null) throw new Error(`${replica} was defined and has no UUID`);
      if (ref === null) await this.options.state.updateReplica(replica, (x) => void (x.domainUuid = uuid));
      await this.options.virsh.run(['start', uuid]);
      return { state: 'Running', alreadyInState: false };
    });
  }

  shutdownGuest(replica: string, timeoutMs: number, signal?: AbortSignal): Promise<ShutdownResult> {
    return this.exclusive(replica, async () => {
      const { state, ref } = await this.domainState(replica);
      if (state === 'shut off') return { outcome: 'already-off', state: 'Off' };
      const end = await acpiShutdown(this.options.virsh, ref!, timeoutMs, () => this.domainState(replica), signal);
      return end.off ? { outcome: 'off', state: 'Off' } : { outcome: 'timed-out', state: end.state };
    });
  }

  powerOff(replica: string): Promise<PowerResult> {
    return this.exclusive(replica, async () => {
      const { state, ref } = await this.domainState(replica);
      if (state === 'shut off') return { state: 'Off', alreadyInState: true };
      await destroyDomain(this.options.virsh, ref!);
      return { state: 'Off', alreadyInState: false };
    });
  }

  /** Makes the replica show (and boot from) that sealed point; later points are kept. */
  revert(replica: string, pointId: string): Promise<ReplicaInfo> {
    return this.exclusive(replica, async () => {
      const r = this.record(replica);
      refuseConsolidated(replica, r);
      const p = r.points.find((x) => x.id === pointId);
      if (!p) throw notFound(`restore point ${replica}/${pointId}`, 'pointId');
      if (!p.sealed) throw conflict(`restore point ${pointId} is not sealed`);
      await this.refuseRunning(replica, 'a revert');
      if (r.running) throw conflict(`${replica} has a running layer; discard it first`);
      r.headPointId = pointId;
      await this.options.state.setReplica(replica, r);
      return this.info(replica, r);
    });
  }

  /** Undo: what the replica wrote since power-on goes; the head returns to the newest sealed point. */
  discardRunningLayer(replica: string): Promise<ReplicaInfo> {
    // Refused at once, not behind the consolidation that holds the replica's lock.
    if (this.record(replica).consolidating) throw halfDoneConsolidation(replica);
    return this.exclusive(replica, async () => {
      await this.refuseRunning(replica, 'discarding its running layer');
      // A seal of the running layer a crash cut off is finished: the point it was becoming was asked for.
      await this.finishSealingRunning(replica);
      const r = this.record(replica);
      if (r.consolidated) throw conflict(`${replica} is permanently failed over: its running state is its base`);
      // Part of the layers may be in the base already: undoing now would lose them. The permanent failover is
      // finished by asking for it again.
      if (r.consolidating)
        throw conflict(
          `a permanent failover of ${replica} is half done: finish it (ask for the permanent failover again)`,
        );
      // Record first: a crash before the files go leaves files no record names, made anew at the next power-on.
      r.running = false;
      r.headPointId = [...r.points].reverse().find((p) => p.sealed)?.id ?? null;
      await this.options.state.setReplica(replica, r);
      await this.closeRunningExports(replica, r);
      for (const d of r.disks) await rm(this.runningImage(replica, d.id), { force: true });
      await fsyncPath(this.dirOf(replica));
      return this.info(replica, r);
    });
  }

  /** The stopped running layer becomes a sealed point on the head (e.g. failback-protective). */
  sealRunningLayer(replica: string, pointId: string, spec: RestorePointSpec): Promise<RestorePointInfo> {
    return this.exclusive(replica, async () => {
      await this.finishSealingRunning(replica);
      let r = this.record(replica);
      const existing = r.points.find((p) => p.id === pointId);
      if (existing) return pointInfo(existing);
      if (r.consolidated) throw conflict(`${replica} is permanently failed over: there is no running layer to seal`);
      await this.refuseRunning(replica, 'sealing its running layer');
      if (!r.running) throw conflict(`${replica} has no running layer`);
      // The running layer stands on the head; points above a reverted head belong to an abandoned branch.
      const headIndex = r.headPointId === null ? -1 : r.points.findIndex((p) => p.id === r.headPointId);
      for (const p of r.points.slice(headIndex + 1)) await this.dropPoint(replica, p.id);
      r = this.record(replica);
      await this.closeRunningExports(replica, r);
      r.sealingRunning = newPointRecord(pointId, spec, true);
      await this.options.state.setReplica(replica, r);
      await this.finishSealingRunning(replica);
      return pointInfo(this.record(replica).points.find((p) => p.id === pointId)!);
    });
  }

  /** Renames the running layer's files to the point's, as recorded; each step can run again after a crash. */
  private async finishSealingRunning(replica: string): Promise<void> {
    const r = this.record(replica);
    const point = r.sealingRunning;
    if (!point) return;
    for (const d of r.disks) {
      const from = this.runningImage(replica, d.id);
      if (await exists(from)) {
        await fsyncPath(from);
        await rename(from, this.imageOf(replica, point.id, d.id));
      }
    }
    await fsyncPath(this.dirOf(replica));
    r.points.push(point);
    r.headPointId = point.id;
    r.running = false;
    r.sealingRunning = null;
    await this.options.state.setReplica(replica, r);
  }

  /**
   * Permanent failover: the head's chain and the running layer are merged into the base, which the replica then
   * runs on alone. A running replica is committed live (`virsh blockcommit --active --pivot`), a stopped one with
   * `qemu-img commit`. Recorded first; a repeated commit of the same layers writes the same blocks again.
   */
  consolidate(replica: string): Promise<ReplicaInfo | HostJobRunning> {
    return this.jobs.follow(`${replica}/consolidate`, `consolidating ${replica}`, () => this.consolidateNow(replica));
  }

  private consolidateNow(replica: string): Promise<ReplicaInfo> {
    return this.exclusive(replica, async () => {
      const r = this.record(replica);
      if (r.consolidated) return this.info(replica, r);
      refuseOpenPoint(replica, r);
      if (!r.consolidating) {
        r.consolidating = true;
        await this.options.state.setReplica(replica, r);
      }
      await this.finishConsolidation(replica);
      return this.info(replica, this.record(replica));
    });
  }

  /**
   * The merges and consolidations a crash of the agent cut off go on in the background (each was recorded before its
   * first file changed); their outcome goes to the next request for them.
   */
  resumeRecordedOperations(): void {
    for (const replica of this.names()) {
      const r = this.record(replica);
      const merging = r.merging;
      if (merging !== null)
        this.jobs.resume(`${replica}/merge`, `merging ${merging} of ${replica} into its base`, () =>
          this.mergeOldestNow(replica, merging),
        );
      if (r.consolidating && !r.consolidated)
        this.jobs.resume(`${replica}/consolidate`, `consolidating ${replica}`, () => this.consolidateNow(replica));
    }
  }

  private async finishConsolidation(replica: string): Promise<void> {
    const r = this.record(replica);
    await this.closeExportsOf(replica);
    const { power, ref } = await this.domainState(replica);
    const live = power !== 'Off';
    for (const d of r.disks) {
      const base = this.imageOf(replica, null, d.id);
      if (live) await this.commitLive(ref!, d.id, base);
      else {
        const top = r.running
          ? this.runningImage(replica, d.id)
          : r.headPointId && this.imageOf(replica, r.headPointId, d.id);
        if (top && (await exists(top))) await run('qemu-img', ['commit', '-q', '-b', base, top]);
      }
      await fsyncPath(base);
    }
    // Every layer's data is in the bases now: the files go, then the record says so.
    for (const d of r.disks) {
      await rm(this.runningImage(replica, d.id), { force: true });
      for (const p of r.points) await rm(this.imageOf(replica, p.id, d.id), { force: true });
    }
    await fsyncPath(this.dirOf(replica));
    Object.assign(r, { points: [], headPointId: null, running: false, consolidating: false, consolidated: true });
    await this.options.state.setReplica(replica, r);
  }

  /**
   * A running replica's disk committed into its base by QEMU (libvirt's active block commit) and pivoted onto it.
   * Followed step by step from what libvirt shows, never by one virsh call that waits: the job one an earlier run
   * started (or left ready, cut off before its pivot) is followed or pivoted, and a disk already on its base is done.
   */
  private async commitLive(domain: string, disk: string, base: string): Promise<void> {
    for (;;) {
      const sources = await this.options.virsh.run(['domblklist', domain]);
      const current = lines(sources)
        .map((l) => l.split(/\s+/))
        .find(([target]) => target === disk)?.[1];
      if (current === base) return;
      const job = parseBlockJob(await this.options.virsh.run(['blockjob', domain, disk, '--info', '--raw']));
      if (job === null) {
        const bandwidth = this.options.commitBandwidthMiBps;
        await this.options.virsh.run([
          'blockcommit',
          ...[domain, disk, '--active'],
          ...(bandwidth ? ['--bandwidth', String(bandwidth)] : []),
        ]);
      } else if (job.end > 0 && job.cur === job.end) {
        // Ready: the base holds every block; the pivot switches the guest onto it. Not ready yet: asked again.
        await this.options.virsh.run(['blockjob', domain, disk, '--pivot']).catch((e: unknown) => {
          if (!(e instanceof VirshError && /not ready|ready|not yet/i.test(e.detail))) throw e;
        });
      } else await sleep(250);
    }
  }

  /**
   * The blocks the replica wrote since power-on: its running layer's own clusters. Read while the replica runs
   * (failback's first phase), the file's metadata may lack the newest clusters; its second phase reads the sealed
   * layer, which has them all.
   */
  async runningLayerExtents(replica: string, disk: string): Promise<Extent[]> {
    const r = this.record(replica);
    if (!r.running) throw conflict(`${replica} has no running layer`);
    if (!r.disks.some((d) => d.id === disk)) throw notFound(`disk ${replica}/${disk}`, 'disk');
    return this.mapped({ image: this.runningImage(replica, disk), open: false }, true);
  }

  /**
   * The image a view shows, and its disk: a point, or (the replica off) its running state. An open point is read
   * through its writer's export, which has every write it acknowledged (a final sync is verified before its seal).
   */
  private viewImage(
    replica: string,
    view: ReplicaView,
    disk: string,
  ): { image: string; sizeBytes: number; open: boolean } {
    const r = this.record(replica);
    if (!('pointId' in view)) {
      const d = r.disks.find((x) => x.id === disk);
      if (!d) throw notFound(`disk ${replica}/${disk}`, 'disk');
      if (!r.running && !r.consolidated) throw conflict(`${replica} has no running layer`);
      return { image: this.bootImage(replica, r, disk), sizeBytes: d.sizeBytes, open: false };
    }
    const p = r.points.find((x) => x.id === view.pointId);
    if (!p) throw notFound(`restore point ${replica}/${view.pointId}`, 'pointId');
    const d = r.disks.find((x) => x.id === disk);
    if (!d) throw notFound(`disk ${replica}/${disk}`, 'disk');
    return { image: this.imageOf(replica, p.id, disk), sizeBytes: d.sizeBytes, open: !p.sealed };
  }

  viewDiskSize(replica: string, view: ReplicaView, disk: string): number {
    return this.viewImage(replica, view, disk).sizeBytes;
  }

  /**
   * `qemu-img map` of a point's overlay: `ownOnly` keeps what that layer itself holds. An open point's writer is
   * flushed first, so that the file's own metadata names every cluster it acknowledged.
   */
  private async mapped({ image, open }: { image: string; open: boolean }, ownOnly: boolean): Promise<Extent[]> {
    if (open) await (await this.exportOf(image, true)).flush();
    const { stdout } = await run('qemu-img', ['map', '-U', '--output=json', image], { maxBuffer: 256 * 1024 * 1024 });
    const entries = JSON.parse(stdout) as {
      start: number;
      length: number;
      depth: number;
      present: boolean;
      data: boolean;
    }[];
    return toBlocks(
      entries
        .filter((e) => (ownOnly ? e.depth === 0 && e.present : e.present && e.data))
        .map((e) => ({ offset: e.start, length: e.length })),
    );
  }

  async allocatedExtents(replica: string, view: ReplicaView, disk: string): Promise<Extent[]> {
    return this.mapped(this.viewImage(replica, view, disk), false);
  }

  async pointExtents(replica: string, pointId: string, disk: string): Promise<Extent[]> {
    return this.mapped(this.viewImage(replica, { pointId }, disk), true);
  }

  async *readExtents(replica: string, view: ReplicaView, disk: string, extents: Extent[]): AsyncGenerator<ExtentData> {
    const { image, open } = this.viewImage(replica, view, disk);
    const nbd = await this.exportOf(image, open);
    for await (const piece of nbd.readExtents([...readPieces(extents)], { pieceSize: READ_PIECE_BYTES })) yield piece;
  }

  async blockDigests(
    replica: string,
    view: ReplicaView,
    disk: string,
    range: { startBlock: number; count: number },
  ): Promise<BlockDigests> {
    const whole = [{ offset: range.startBlock * BLOCK_SIZE, length: range.count * BLOCK_SIZE }];
    return digestsOf(this.readExtents(replica, view, disk, whole), range.startBlock);
  }

  async readCanary(replica: string, view: ReplicaView): Promise<number> {
    const [first] = this.record(replica).disks;
    if (!first) return 0;
    for await (const piece of this.readExtents(replica, view, first.id, [{ offset: 0, length: BLOCK_SIZE }])) {
      try {
        return parseCanary(piece.data.subarray(0, CANARY_BYTES));
      } catch {
        return 0; // not our guest's canary
      }
    }
    return 0;
  }
}

function newPointRecord(id: string, spec: RestorePointSpec, sealed: boolean): PointRecord {
  return {
    id,
    createdAt: new Date().toISOString(),
    kind: spec.kind,
    crashConsistent: spec.crashConsistent,
    metadata: spec.metadata ?? {},
    bytesWritten: 0,
    sealed,
  };
}

/** `virsh blockjob --info --raw` of a disk: its job's progress, or null when none runs. */
export function parseBlockJob(text: string): { cur: number; end: number } | null {
  const cur = /\bcur=(\d+)/.exec(text)?.[1];
  const end = /\bend=(\d+)/.exec(text)?.[1];
  return cur === undefined || end === undefined ? null : { cur: Number(cur), end: Number(end) };
}

/** Part of the layers may be in the base already: undoing now would lose them; only finishing is safe. */
const halfDoneConsolidation = (replica: string): HostApiError =>
  conflict(`a permanent failover of ${replica} is half done: finish it (ask for the permanent failover again)`);

function refuseConsolidated(replica: string, r: ReplicaRecord): void {
  if (r.consolidated || r.consolidating) throw conflict(`${replica} is permanently failed over (consolidated)`);
}

/** A point still being written (a replication in flight) must be sealed or discarded first. */
function refuseOpenPoint(replica: string, r: ReplicaRecord): void {
  const open = r.points.find((p) => !p.sealed);
  if (open) throw conflict(`restore point ${open.id} of ${replica} is still being written`);
}

function pointInfo(p: PointRecord): RestorePointInfo {
  return {
    id: p.id,
    createdAt: p.createdAt,
    kind: p.kind,
    crashConsistent: p.crashConsistent,
    metadata: p.metadata,
    bytesWritten: p.bytesWritten,
    sealed: p.sealed,
  };
}
