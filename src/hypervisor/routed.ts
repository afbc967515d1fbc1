// One estate whose hosts are served by different host-API servers (the lab for some, our host process on each KVM
// host for others): every call goes to the port serving the host it names.

import { NotFoundError } from './errors';
import type {
  BackupPointInfo,
  BackupRef,
  BlockDigests,
  BlockRange,
  CallOptions,
  CanaryReading,
  CheckpointInfo,
  DiskRef,
  Extent,
  ExtentData,
  ExtentPage,
  FencedTransferOptions,
  HostInfo,
  HypervisorPort,
  PageRequest,
  PowerOnOptions,
  PowerResult,
  ReferencePointInfo,
  ReplicaDiskRef,
  ReplicaInfo,
  ReplicaRef,
  ReplicaSpec,
  ReplicaView,
  RestorePointInfo,
  RestorePointSpec,
  ShutdownResult,
  ReadOptions,
  SendOptions,
  TransferOptions,
  VmDefinition,
  VmInfo,
  VmRef,
  VmSpec,
  WriteResult,
} from './port';

/** A port that holds connections to release. */
export type ClosablePort = HypervisorPort & { close(): void };

export interface Routes {
  /** Host name → the port serving it, in the configured order. Hosts may share a port. */
  hosts: ReadonlyMap<string, ClosablePort>;
  /** The backup repository's port, if one is configured. */
  backups?: ClosablePort;
}

const unknownHost = (host: string): NotFoundError =>
  new NotFoundError(`host ${host} not found: no host API server is configured for it`, { host });
const noBackupRepository = (): NotFoundError => new NotFoundError('no backup repository is configured');

/** Fails when iterated, as the ports' own block streams fail on a refused read. */
function refusedStream(error: Error): AsyncIterable<ExtentData> {
  return { [Symbol.asyncIterator]: () => ({ next: () => Promise.reject(error) }) };
}

export class RoutedHypervisor implements HypervisorPort {
  constructor(private readonly routes: Routes) {}

  /** Closes each port once, however many hosts it serves. */
  close(): void {
    const ports = new Set([...this.routes.hosts.values(), ...(this.routes.backups ? [this.routes.backups] : [])]);
    for (const port of ports) port.close();
  }

  private portOf(host: string): ClosablePort {
    const port = this.routes.hosts.get(host);
    if (!port) throw unknownHost(host);
    return port;
  }

  private get backups(): ClosablePort {
    if (!this.routes.backups) throw noBackupRepository();
    return this.routes.backups;
  }

  /**
   * A block stream of the port serving `host`, handed on as it is: a port recognises its own kind of stream when it
   * is written back (HostApiHypervisor forwards the framed bytes without decoding them).
   */
  private streamOf(host: string, read: (port: HypervisorPort) => AsyncIterable<ExtentData>): AsyncIterable<ExtentData> {
    const port = this.routes.hosts.get(host);
    return port ? read(port) : refusedStream(unknownHost(host));
  }

  /** Each port's own hosts; a server that plays more hosts than are routed to it (a lab) does not add them. */
  async listHosts(o?: CallOptions): Promise<HostInfo[]> {
    const ports = new Set(this.routes.hosts.values());
    const answers = await Promise.all([...ports].map(async (port) => ({ port, hosts: await port.listHosts(o) })));
    const known = new Map<string, HostInfo>();
    for (const { port, hosts } of answers)
      for (const h of hosts) if (this.routes.hosts.get(h.name) === port) known.set(h.name, h);
    return [...this.routes.hosts.keys()].flatMap((name) => known.get(name) ?? []);
  }

  async listVms(host: string, o?: CallOptions): Promise<VmInfo[]> {
    return this.portOf(host).listVms(host, o);
  }

  async getVm(ref: VmRef, o?: CallOptions): Promise<VmInfo> {
    return this.portOf(ref.host).getVm(ref, o);
  }

  async createVm(ref: VmRef, spec: VmSpec, o?: CallOptions): Promise<VmInfo> {
    return this.portOf(ref.host).createVm(ref, spec, o);
  }

  async shutdownGuest(ref: VmRef, timeoutMs: number, o?: CallOptions): Promise<ShutdownResult> {
    return this.portOf(ref.host).shutdownGuest(ref, timeoutMs, o);
  }

  async powerOff(ref: VmRef, o?: CallOptions): Promise<PowerResult> {
    return this.portOf(ref.host).powerOff(ref, o);
  }

  async powerOn(ref: VmRef, o?: PowerOnOptions): Promise<PowerResult> {
    return this.portOf(ref.host).powerOn(ref, o);
  }

  async createCheckpoint(ref: VmRef, checkpointId: string, o?: CallOptions): Promise<CheckpointInfo> {
    return this.portOf(ref.host).createCheckpoint(ref, checkpointId, o);
  }

  async deleteCheckpoint(ref: VmRef, checkpointId: string, o?: CallOptions): Promise<void> {
    return this.portOf(ref.host).deleteCheckpoint(ref, checkpointId, o);
  }

  async createReferencePoint(
    ref: VmRef,
    referencePointId: string,
    checkpointId: string,
    o?: CallOptions,
  ): Promise<ReferencePointInfo> {
    return this.portOf(ref.host).createReferencePoint(ref, referencePointId, checkpointId, o);
  }

  async listReferencePoints(ref: VmRef, o?: CallOptions): Promise<ReferencePointInfo[]> {
    return this.portOf(ref.host).listReferencePoints(ref, o);
  }

  async deleteReferencePoint(ref: VmRef, referencePointId: string, o?: CallOptions): Promise<void> {
    return this.portOf(ref.host).deleteReferencePoint(ref, referencePointId, o);
  }

  async listChangedExtents(
    ref: DiskRef,
    range: { referencePointId: string; checkpointId: string },
    page?: PageRequest,
    o?: CallOptions,
  ): Promise<ExtentPage> {
    return this.portOf(ref.host).listChangedExtents(ref, range, page, o);
  }

  async listAllocatedExtents(
    ref: DiskRef,
    checkpointId: string,
    page?: PageRequest,
    o?: CallOptions,
  ): Promise<ExtentPage> {
    return this.portOf(ref.host).listAllocatedExtents(ref, checkpointId, page, o);
  }

  async blockDigests(ref: DiskRef, checkpointId: string, range: BlockRange, o?: CallOptions): Promise<BlockDigests> {
    return this.portOf(ref.host).blockDigests(ref, checkpointId, range, o);
  }

  readExtents(ref: DiskRef, checkpointId: string, extents: Extent[], o?: ReadOptions): AsyncIterable<ExtentData> {
    return this.streamOf(ref.host, (port) => port.readExtents(ref, checkpointId, extents, o));
  }

  async readCanary(ref: VmRef, checkpointId: string, o?: CallOptions): Promise<CanaryReading> {
    return this.portOf(ref.host).readCanary(ref, checkpointId, o);
  }

  async writeExtents(ref: DiskRef, data: AsyncIterable<ExtentData>, o?: FencedTransferOptions): Promise<WriteResult> {
    return this.portOf(ref.host).writeExtents(ref, data, o);
  }

  async getVmDefinition(ref: VmRef, o?: CallOptions): Promise<VmDefinition | null> {
    return this.portOf(ref.host).getVmDefinition(ref, o);
  }

  async fenceWrites(ref: VmRef, token: string, o?: CallOptions): Promise<void> {
    return this.portOf(ref.host).fenceWrites(ref, token, o);
  }

  async createReplica(ref: ReplicaRef, spec: ReplicaSpec, o?: CallOptions): Promise<ReplicaInfo> {
    return this.portOf(ref.host).createReplica(ref, spec, o);
  }

  async getReplica(ref: ReplicaRef, o?: CallOptions): Promise<ReplicaInfo> {
    return this.portOf(ref.host).getReplica(ref, o);
  }

  async beginRestorePoint(
    ref: ReplicaRef,
    pointId: string,
    spec: RestorePointSpec,
    o?: CallOptions,
  ): Promise<RestorePointInfo> {
    return this.portOf(ref.host).beginRestorePoint(ref, pointId, spec, o);
  }

  async writeRestorePoint(
    ref: ReplicaDiskRef,
    pointId: string,
    data: AsyncIterable<ExtentData>,
    o?: TransferOptions,
  ): Promise<WriteResult> {
    return this.portOf(ref.host).writeRestorePoint(ref, pointId, data, o);
  }

  /**
   * Host to host where one server serves both hosts. Servers of different hosts do not know each other (a KVM
   * host process serves only its own host), so then the blocks pass through the caller instead: the same bytes,
   * one hop more.
   */
  async sendToRestorePoint(
    source: DiskRef & { checkpointId: string },
    target: ReplicaDiskRef & { pointId: string },
    extents: Extent[],
    o?: SendOptions,
  ): Promise<WriteResult> {
    const sourcePort = this.portOf(source.host);
    const targetPort = this.portOf(target.host);
    if (sourcePort === targetPort) return sourcePort.sendToRestorePoint(source, target, extents, o);
    const blocks = sourcePort.readExtents(source, source.checkpointId, extents, {
      signal: o?.signal,
      digests: o?.verify ?? false,
    });
    return targetPort.writeRestorePoint(target, target.pointId, blocks, {
      signal: o?.signal,
      onProgress: o?.onProgress,
    });
  }

  async sealRestorePoint(
    ref: ReplicaRef,
    pointId: string,
    seal?: { metadata?: Record<string, string> },
    o?: CallOptions,
  ): Promise<RestorePointInfo> {
    return this.portOf(ref.host).sealRestorePoint(ref, pointId, seal, o);
  }

  async discardRestorePoint(ref: ReplicaRef, pointId: string, o?: CallOptions): Promise<void> {
    return this.portOf(ref.host).discardRestorePoint(ref, pointId, o);
  }

  async listRestorePoints(ref: ReplicaRef, o?: CallOptions): Promise<RestorePointInfo[]> {
    return this.portOf(ref.host).listRestorePoints(ref, o);
  }

  async revertReplica(ref: ReplicaRef, pointId: string, o?: CallOptions): Promise<ReplicaInfo> {
    return this.portOf(ref.host).revertReplica(ref, pointId, o);
  }

  async mergeOldestRestorePoint(ref: ReplicaRef, pointId: string, o?: CallOptions): Promise<ReplicaInfo> {
    return this.portOf(ref.host).mergeOldestRestorePoint(ref, pointId, o);
  }

  async consolidateReplica(ref: ReplicaRef, o?: CallOptions): Promise<ReplicaInfo> {
    return this.portOf(ref.host).consolidateReplica(ref, o);
  }

  async discardRunningLayer(ref: ReplicaRef, o?: CallOptions): Promise<ReplicaInfo> {
    return this.portOf(ref.host).discardRunningLayer(ref, o);
  }

  async sealRunningLayer(
    ref: ReplicaRef,
    pointId: string,
    spec: RestorePointSpec,
    o?: CallOptions,
  ): Promise<RestorePointInfo> {
    return this.portOf(ref.host).sealRunningLayer(ref, pointId, spec, o);
  }

  async listRunningLayerExtents(ref: ReplicaDiskRef, page?: PageRequest, o?: CallOptions): Promise<ExtentPage> {
    return this.portOf(ref.host).listRunningLayerExtents(ref, page, o);
  }

  async listReplicaAllocatedExtents(
    ref: ReplicaDiskRef,
    view: ReplicaView,
    page?: PageRequest,
    o?: CallOptions,
  ): Promise<ExtentPage> {
    return this.portOf(ref.host).listReplicaAllocatedExtents(ref, view, page, o);
  }

  async listRestorePointExtents(
    ref: ReplicaDiskRef,
    pointId: string,
    page?: PageRequest,
    o?: CallOptions,
  ): Promise<ExtentPage> {
    return this.portOf(ref.host).listRestorePointExtents(ref, pointId, page, o);
  }

  readReplicaExtents(
    ref: ReplicaDiskRef,
    view: ReplicaView,
    extents: Extent[],
    o?: CallOptions,
  ): AsyncIterable<ExtentData> {
    return this.streamOf(ref.host, (port) => port.readReplicaExtents(ref, view, extents, o));
  }

  async replicaBlockDigests(
    ref: ReplicaDiskRef,
    view: ReplicaView,
    range: BlockRange,
    o?: CallOptions,
  ): Promise<BlockDigests> {
    return this.portOf(ref.host).replicaBlockDigests(ref, view, range, o);
  }

  async readReplicaCanary(ref: ReplicaRef, view: ReplicaView, o?: CallOptions): Promise<CanaryReading> {
    return this.portOf(ref.host).readReplicaCanary(ref, view, o);
  }

  async listBackups(vm: string, o?: CallOptions): Promise<BackupPointInfo[]> {
    return this.backups.listBackups(vm, o);
  }

  async listBackupExtents(ref: BackupRef, page?: PageRequest, o?: CallOptions): Promise<ExtentPage> {
    return this.backups.listBackupExtents(ref, page, o);
  }

  readBackupExtents(ref: BackupRef, extents: Extent[], o?: CallOptions): AsyncIterable<ExtentData> {
    const port = this.routes.backups;
    return port ? port.readBackupExtents(ref, extents, o) : refusedStream(noBackupRepository());
  }
}
