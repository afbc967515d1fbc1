// The replica side of the port on a KVM DR host: restore points as qcow2 overlay chains in the host process's
// storage. Each disk has a base image; each point is an overlay on the previous one. An open point is written
// through a writable NBD export of its overlay (qemu-storage-daemon; the chain below is opened read-only); sealing
// flushes and closes that export and makes the point the head. Reads of a point go through a read-only export of
// its overlay, which sees the whole chain below it. Sealed files never change while anything stands on them.
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { access, mkdir, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { GUEST_BLOCK_SIZE, parseCanary } from '../guest/guest';
import { digestsOf } from '../../src/host-api/digests';
import { conflict, HostApiError, notFound } from '../../src/host-api/errors';
import { fsyncDir } from '../../src/host-api/persist';
import {
  BLOCK_SIZE,
  type BlockDigests,
  type DiskInfo,
  type Extent,
  type ExtentData,
  type ReplicaInfo,
  type ReplicaView,
  type RestorePointInfo,
  type RestorePointSpec,
} from '../../src/hypervisor/port';
import { NbdClient } from '../../src/nbd/client';
import { READ_PIECE_BYTES, readPieces, toBlocks } from './source-domains';
import type { HostState, PointRecord, ReplicaRecord } from './state';
import { exportImage, stopStaleExport, type ImageExport } from './storage-daemon';

const run = promisify(execFile);
const exists = (path: string) =>
  access(path).then(
    () => true,
    () => false,
  );

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

  constructor(private readonly options: { host: string; stateDir: string; state: HostState }) {}

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

  private imageOf(replica: string, layer: string | null, disk: string): string {
    return join(this.dirOf(replica), `${layer ?? '_base'}.${disk}.qcow2`);
  }

  private record(replica: string): ReplicaRecord {
    const r = this.options.state.replica(replica);
    if (!r) throw notFound(`replica ${replica}`, 'replica');
    return r;
  }

  private info(replica: string, r: ReplicaRecord): ReplicaInfo {
    return {
      name: replica,
      host: this.options.host,
      sourceVm: r.sourceVm,
      powerState: 'Off',
      disks: r.disks,
      points: r.points.map(pointInfo),
      headPointId: r.headPointId,
      hasRunningLayer: false,
      consolidated: false,
    };
  }

  names(): string[] {
    return this.options.state.replicaNames();
  }

  getReplica(replica: string): ReplicaInfo {
    return this.info(replica, this.record(replica));
  }

  createReplica(replica: string, sourceVm: string, disks: DiskInfo[]): Promise<ReplicaInfo> {
    return this.exclusive(replica, async () => {
      const known = this.options.state.replica(replica);
      if (known) {
        const same = known.sourceVm === sourceVm && JSON.stringify(known.disks) === JSON.stringify(disks);
        if (!same) throw conflict(`a replica named ${replica} already exists with another source or disks`);
        return this.info(replica, known);
      }
      // Files first, then the record: a crash in between leaves files no record names, made again on the retry.
      await mkdir(this.dirOf(replica), { recursive: true });
      for (const d of disks)
        await run('qemu-img', ['create', '-q', '-f', 'qcow2', this.imageOf(replica, null, d.id), String(d.sizeBytes)]);
      await fsyncDir(this.dirOf(replica));
      const record: ReplicaRecord = { sourceVm, disks, points: [], headPointId: null, merging: null };
      await this.options.state.setReplica(replica, record);
      return this.info(replica, record);
    });
  }

  beginRestorePoint(replica: string, pointId: string, spec: RestorePointSpec): Promise<RestorePointInfo> {
    return this.exclusive(replica, async () => {
      const r = this.record(replica);
      const existing = r.points.find((p) => p.id === pointId);
      if (existing) return pointInfo(existing);
      const newestSealed = [...r.points].reverse().find((p) => p.sealed);
      if ((newestSealed?.id ?? null) !== r.headPointId)
        throw conflict(`${replica} is reverted to ${r.headPointId ?? 'its base'}`);
      // An open point left by an abandoned run is replaced: its blocks were never sealed.
      for (const stale of r.points.filter((p) => !p.sealed)) await this.dropPoint(replica, stale.id);
      for (const d of r.disks) {
        await run('qemu-img', [
          'create',
          '-q',
          '-f',
          'qcow2',
          '-b',
          this.imageOf(replica, r.headPointId, d.id),
          '-F',
          'qcow2',
          this.imageOf(replica, pointId, d.id),
        ]);
      }
      await fsyncDir(this.dirOf(replica));
      const point: PointRecord = {
        id: pointId,
        createdAt: new Date().toISOString(),
        kind: spec.kind,
        crashConsistent: spec.crashConsistent,
        metadata: spec.metadata ?? {},
        bytesWritten: 0,
        sealed: false,
      };
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

  private async exportOf(image: string, writable: boolean): Promise<NbdClient> {
    let open = this.exports.get(image);
    if (!open) {
      const key = createHash('sha256').update(image).digest('hex').slice(0, 16);
      const socket = join(this.options.stateDir, 'run', `${key}.nbd.sock`);
      const pidFile = join(this.options.stateDir, 'run', `${key}.nbd.pid`);
      open = exportImage({ image, socket, pidFile, writable }).then(async (daemon) => {
        try {
          return { daemon, nbd: await NbdClient.connect({ path: socket, exportName: 'disk', metaContexts: [] }) };
        } catch (e) {
          await daemon.stop();
          throw e;
        }
      });
      this.exports.set(image, open);
      open.catch(() => this.exports.delete(image));
    }
    return (await open).nbd;
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

  /** Writes one piece into an open point; checked for every piece, so nothing lands once its seal has begun. */
  async writePoint(
    replica: string,
    pointId: string,
    disk: string,
    offset: number,
    parts: readonly Buffer[],
  ): Promise<void> {
    const gate = this.gateOf(replica, pointId);
    if (gate.closed) throw conflict(`restore point ${pointId} is sealed`);
    this.openPointDisk(replica, pointId, disk);
    const write = (async () => {
      const nbd = await this.exportOf(this.imageOf(replica, pointId, disk), true);
      await nbd.write(offset, parts.length === 1 ? parts[0]! : Buffer.concat(parts));
    })();
    gate.inFlight.add(write);
    try {
      await write;
    } finally {
      gate.inFlight.delete(write);
    }
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

  async countWritten(replica: string, pointId: string, bytes: number): Promise<void> {
    await this.exclusive(replica, async () => {
      const r = this.record(replica);
      const p = r.points.find((x) => x.id === pointId);
      if (!p || p.sealed) return;
      p.bytesWritten += bytes;
      await this.options.state.setReplica(replica, r);
    });
  }

  sealRestorePoint(replica: string, pointId: string, metadata?: Record<string, string>): Promise<RestorePointInfo> {
    return this.exclusive(replica, async () => {
      const r = this.record(replica);
      const p = r.points.find((x) => x.id === pointId);
      if (!p) throw notFound(`restore point ${replica}/${pointId}`, 'pointId');
      if (p.sealed) return pointInfo(p);
      await this.closeGate(replica, pointId);
      for (const d of r.disks) {
        const image = this.imageOf(replica, pointId, d.id);
        const open = this.exports.get(image);
        if (open) await (await open).nbd.flush();
        await this.closeExport(image); // the daemon's exit flushes and releases the image
        await run('sync', ['-f', image]);
      }
      Object.assign(p, { sealed: true, metadata: { ...p.metadata, ...metadata } });
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
    await fsyncDir(this.dirOf(replica));
  }

  /**
   * Retention: the oldest point's data goes into the base (`qemu-img commit`), the next point is rebased onto the
   * base (its view is unchanged: it sees the same blocks, now found one layer lower), and the oldest file goes. The
   * merge is recorded first; each step can run again after a crash at any line.
   */
  mergeOldest(replica: string, pointId: string): Promise<ReplicaInfo> {
    return this.exclusive(replica, async () => {
      let r = this.record(replica);
      if (r.merging === null) {
        const i = r.points.findIndex((p) => p.id === pointId);
        if (i < 0) return this.info(replica, r); // merged already
        if (i !== 0) throw conflict(`restore point ${pointId} is not the oldest (${r.points[0]!.id} is)`);
        if (!r.points[0]!.sealed) throw conflict(`restore point ${pointId} is not sealed`);
        if (r.points.length === 1) throw conflict(`restore point ${pointId} is the only one; retention keeps it`);
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
    for (const image of [...this.exports.keys()])
      if (image.startsWith(this.dirOf(replica))) await this.closeExport(image);
    for (const d of r.disks) {
      const file = this.imageOf(replica, oldest, d.id);
      const base = this.imageOf(replica, null, d.id);
      if (await exists(file)) {
        await run('qemu-img', ['commit', '-q', '-d', file]);
        if (next)
          await run('qemu-img', ['rebase', '-u', '-b', base, '-F', 'qcow2', this.imageOf(replica, next.id, d.id)]);
        await run('sync', ['-f', base]);
        await rm(file, { force: true });
      }
    }
    await fsyncDir(this.dirOf(replica));
    r.points = r.points.filter((p) => p.id !== oldest);
    r.merging = null;
    await this.options.state.setReplica(replica, r);
  }

  listRestorePoints(replica: string): RestorePointInfo[] {
    return this.record(replica).points.map(pointInfo);
  }

  /** The sealed point a view shows, and its disk. */
  private viewImage(replica: string, view: ReplicaView, disk: string): { image: string; sizeBytes: number } {
    if (!('pointId' in view)) throw notOnKvmYet("a replica's running layer");
    const r = this.record(replica);
    const p = r.points.find((x) => x.id === view.pointId);
    if (!p) throw notFound(`restore point ${replica}/${view.pointId}`, 'pointId');
    if (!p.sealed) throw conflict(`restore point ${view.pointId} is not sealed yet`);
    const d = r.disks.find((x) => x.id === disk);
    if (!d) throw notFound(`disk ${replica}/${disk}`, 'disk');
    return { image: this.imageOf(replica, p.id, disk), sizeBytes: d.sizeBytes };
  }

  viewDiskSize(replica: string, view: ReplicaView, disk: string): number {
    return this.viewImage(replica, view, disk).sizeBytes;
  }

  /** `qemu-img map` of a point's overlay: `ownOnly` keeps what that layer itself holds. */
  private async mapped(image: string, ownOnly: boolean): Promise<Extent[]> {
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
    return this.mapped(this.viewImage(replica, view, disk).image, false);
  }

  async pointExtents(replica: string, pointId: string, disk: string): Promise<Extent[]> {
    return this.mapped(this.viewImage(replica, { pointId }, disk).image, true);
  }

  async *readExtents(replica: string, view: ReplicaView, disk: string, extents: Extent[]): AsyncGenerator<ExtentData> {
    const nbd = await this.exportOf(this.viewImage(replica, view, disk).image, false);
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
        return parseCanary(piece.data.subarray(0, GUEST_BLOCK_SIZE));
      } catch {
        return 0; // not our guest's canary
      }
    }
    return 0;
  }
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
