// The hypervisor port: what the orchestrator needs from Hyper-V, KVM or the lab site.
// Shaped after the real primitives: Hyper-V checkpoints + RCT reference points + Replica
// recovery points, QEMU external snapshots + persistent dirty bitmaps. Offsets and lengths are
// bytes, always multiples of BLOCK_SIZE (the change-tracking granularity).

export const BLOCK_SIZE = 65536;

export type PowerState = 'Running' | 'Off' | 'Starting' | 'Stopping';
export type SiteRole = 'production' | 'dr';

export interface HostInfo {
  name: string;
  site: string;
  role: SiteRole;
}

export interface DiskInfo {
  id: string;
  sizeBytes: number;
}

export interface VmInfo {
  name: string;
  host: string;
  /** `replica` VMs live on DR hosts and are managed through the replica methods. */
  kind: 'source' | 'replica';
  powerState: PowerState;
  disks: DiskInfo[];
  /**
   * How the VM last went Off, as the host recorded it (Hyper-V's event log, libvirt's shut-off reason): a clean
   * guest shutdown, or a forced power-off. Null while it has never stopped. A retried shutdown after a worker
   * crash reads it here instead of guessing.
   */
  lastStop: 'guest-shutdown' | 'forced-off' | null;
}

/**
 * How a VM is defined on its hypervisor, carried to its replica so that the DR host can boot it as the same machine
 * (processors, memory, devices) on its own disks. Opaque to the orchestrator; only a host of the same kind reads it.
 */
export interface VmDefinition {
  format: 'libvirt-domain-xml';
  text: string;
}

export interface ReplicaSpec {
  sourceVm: string;
  disks: DiskInfo[];
  /** The source's definition as of this replication; a host that defines replicas itself (the lab) needs none. */
  definition?: VmDefinition;
}

/** A new VM (failback to a new VM). */
export interface VmSpec {
  disks: DiskInfo[];
  /** The definition to make it from (the replica's); a host that defines VMs itself (the lab) needs none. */
  definition?: VmDefinition;
}

export interface VmRef {
  host: string;
  vm: string;
}

export interface DiskRef extends VmRef {
  disk: string;
}

export interface ReplicaRef {
  host: string;
  replica: string;
}

export interface ReplicaDiskRef extends ReplicaRef {
  disk: string;
}

export interface Extent {
  offset: number;
  length: number;
}

/** One page of extents, in ascending offset order; pass `nextCursor` back for the next page. */
export interface ExtentPage {
  extents: Extent[];
  nextCursor?: string;
}

export interface PageRequest {
  cursor?: string;
  /** Maximum extents per page. */
  limit?: number;
}

/** A run of block data; `data.length` is a multiple of BLOCK_SIZE. */
export interface ExtentData {
  offset: number;
  data: Buffer;
}

export interface CallOptions {
  signal?: AbortSignal;
}

export interface PowerOnOptions extends CallOptions {
  /**
   * The replica's source VM is off (planned failover, undoing a failback): the replica is the machine and takes its
   * MAC addresses. Otherwise (the default) a replica gets MAC addresses of its own, as its source may run on the
   * same network (a regular failover). Means nothing for a source VM.
   */
  sourceOff?: boolean;
}

export interface TransferOptions extends CallOptions {
  /** Called as block data goes out, with the running byte total (for activity heartbeats). */
  onProgress?: (bytes: number) => void;
}

/** A read of a checkpoint's blocks. */
export interface ReadOptions extends CallOptions {
  /**
   * The stream also carries the source's digest of every block it reads: handed unchanged to writeRestorePoint, the
   * DR host verifies what it stored against them (WriteResult.verification), with no second pass over either side.
   */
  digests?: boolean;
}

/** A host-to-host copy. */
export interface SendOptions extends TransferOptions {
  /** The DR host reads back what it stored and compares it with what the source read (WriteResult.verification). */
  verify?: boolean;
}

/** A write that a fence may refuse (see fenceWrites). */
export interface FencedTransferOptions extends TransferOptions {
  fence?: string;
}

export interface PowerResult {
  state: PowerState;
  /** True when the VM already was in the requested state: nothing was done. */
  alreadyInState: boolean;
}

export interface ShutdownResult {
  /** `timed-out`: the guest is still shutting down; the caller decides whether to power off hard. */
  outcome: 'off' | 'already-off' | 'timed-out';
  state: PowerState;
}

export interface CheckpointInfo {
  id: string;
  vm: string;
  createdAt: string;
}

export interface ReferencePointInfo {
  id: string;
  vm: string;
  checkpointId: string;
  createdAt: string;
  /** False once the host lost change tracking for it (unclean stop): use digests instead. */
  trackingValid: boolean;
}

export interface BlockDigests {
  /** Fast hash of each BLOCK_SIZE block; equal on both sides means equal content. */
  algorithm: string;
  startBlock: number;
  digests: string[];
}

export interface BlockRange {
  startBlock: number;
  count: number;
}

/** Which state of a replica to look at: a restore point, or its running state after failover. */
export type ReplicaView = { pointId: string } | { running: true };

export type RestorePointKind = 'regular' | 'planned-failover-helper' | 'failback-protective' | (string & {});

export interface RestorePointSpec {
  kind: RestorePointKind;
  crashConsistent: boolean;
  /** Caller's own facts about the point (job run, session, source checkpoint...). */
  metadata?: Record<string, string>;
}

export interface RestorePointInfo {
  id: string;
  createdAt: string;
  kind: RestorePointKind;
  crashConsistent: boolean;
  metadata: Record<string, string>;
  bytesWritten: number;
  sealed: boolean;
}

export interface ReplicaInfo {
  name: string;
  host: string;
  sourceVm: string;
  powerState: PowerState;
  disks: DiskInfo[];
  /** Oldest first. */
  points: RestorePointInfo[];
  /** The point the replica shows (and boots from); the newest sealed point unless reverted. */
  headPointId: string | null;
  hasRunningLayer: boolean;
  /**
   * Permanent failover done: every point merged, the replica is a production VM now. The host refuses to open
   * restore points on it, whatever the orchestrator believes.
   */
  consolidated: boolean;
  /**
   * A permanent failover begun and not finished (the host was cut off part-way): part of the layers may be in the
   * base already, so only finishing it is safe. Asking for the permanent failover again finishes it.
   */
  consolidating: boolean;
}

export interface WriteResult {
  bytesWritten: number;
  /** For a write sent with the source's digests: its blocks read back once stored, against those digests. */
  verification?: WriteVerification;
}

/** What a verified write proved: the blocks the source sent digests for, read back from where they were stored. */
export interface WriteVerification {
  blocksCompared: number;
  /** Blocks that read back otherwise than the source read them (none: the copy is proven). */
  mismatched: Extent[];
}

export interface CanaryReading {
  /** Last guest write sequence number persisted on the VM's disks (0: the guest never wrote). */
  sequence: number;
}

export interface BackupPointInfo {
  id: string;
  vm: string;
  createdAt: string;
  disks: DiskInfo[];
}

export interface BackupRef {
  backupId: string;
  disk: string;
}

export interface HypervisorPort {
  // Inventory
  listHosts(options?: CallOptions): Promise<HostInfo[]>;
  listVms(host: string, options?: CallOptions): Promise<VmInfo[]>;
  getVm(ref: VmRef, options?: CallOptions): Promise<VmInfo>;
  /** Creates an empty VM on a production host (failback to a new VM); idempotent for the same disks. */
  createVm(ref: VmRef, spec: VmSpec, options?: CallOptions): Promise<VmInfo>;
  /** The VM's definition to give its replica; null when its host keeps none the replica's host would need. */
  getVmDefinition(ref: VmRef, options?: CallOptions): Promise<VmDefinition | null>;

  // Power (source and replica VMs alike; every call is idempotent)
  shutdownGuest(ref: VmRef, timeoutMs: number, options?: CallOptions): Promise<ShutdownResult>;
  powerOff(ref: VmRef, options?: CallOptions): Promise<PowerResult>;
  /**
   * Starts the VM and waits for its boot, however long the boot takes (callers heartbeat meanwhile). A replica
   * with a restore point still open (begun, neither sealed nor discarded) is refused with a conflict: nothing
   * boots on top of a half-written point.
   */
  powerOn(ref: VmRef, options?: PowerOnOptions): Promise<PowerResult>;

  // Checkpoints and change tracking on a source VM
  /** Consistent point-in-time view of every disk while the guest keeps writing; idempotent by id. */
  createCheckpoint(ref: VmRef, checkpointId: string, options?: CallOptions): Promise<CheckpointInfo>;
  deleteCheckpoint(ref: VmRef, checkpointId: string, options?: CallOptions): Promise<void>;
  /** Marks the checkpoint's state as the base for later change queries (like an RCT reference point). */
  createReferencePoint(
    ref: VmRef,
    referencePointId: string,
    checkpointId: string,
    options?: CallOptions,
  ): Promise<ReferencePointInfo>;
  listReferencePoints(ref: VmRef, options?: CallOptions): Promise<ReferencePointInfo[]>;
  deleteReferencePoint(ref: VmRef, referencePointId: string, options?: CallOptions): Promise<void>;
  /** Blocks changed between a reference point and a later checkpoint; throws TrackingLostError. */
  listChangedExtents(
    ref: DiskRef,
    range: { referencePointId: string; checkpointId: string },
    page?: PageRequest,
    options?: CallOptions,
  ): Promise<ExtentPage>;
  /** Every block that may hold data at the checkpoint (for a first full copy of a sparse disk). */
  listAllocatedExtents(
    ref: DiskRef,
    checkpointId: string,
    page?: PageRequest,
    options?: CallOptions,
  ): Promise<ExtentPage>;
  blockDigests(ref: DiskRef, checkpointId: string, range: BlockRange, options?: CallOptions): Promise<BlockDigests>;
  readExtents(ref: DiskRef, checkpointId: string, extents: Extent[], options?: ReadOptions): AsyncIterable<ExtentData>;
  readCanary(ref: VmRef, checkpointId: string, options?: CallOptions): Promise<CanaryReading>;
  /** Writes blocks into a powered-off VM's disk (failback ships the replica's changes back). */
  writeExtents(ref: DiskRef, data: AsyncIterable<ExtentData>, options?: FencedTransferOptions): Promise<WriteResult>;
  /**
   * Sets the VM's write fence: from now on writeExtents is refused (ConflictError, checked for every piece) unless
   * it carries this token. A writer that was given up for dead (a partitioned proxy) can then no longer change a
   * disk that was verified after it left. Idempotent.
   */
  fenceWrites(ref: VmRef, token: string, options?: CallOptions): Promise<void>;

  // Replica side on a DR host
  createReplica(ref: ReplicaRef, spec: ReplicaSpec, options?: CallOptions): Promise<ReplicaInfo>;
  getReplica(ref: ReplicaRef, options?: CallOptions): Promise<ReplicaInfo>;
  /** Opens a restore point layer over the newest one; a retried begin returns the same open point. */
  beginRestorePoint(
    ref: ReplicaRef,
    pointId: string,
    spec: RestorePointSpec,
    options?: CallOptions,
  ): Promise<RestorePointInfo>;
  writeRestorePoint(
    ref: ReplicaDiskRef,
    pointId: string,
    data: AsyncIterable<ExtentData>,
    options?: TransferOptions,
  ): Promise<WriteResult>;
  /**
   * Host to host: the source host sends the checkpoint's extents straight into the open restore point on the DR
   * host, and the caller only orders and watches it (QEMU's push-mode backup to an NBD export on the DR side, or a
   * Hyper-V host acting as its own proxy). The same bytes as `writeRestorePoint(readExtents(...))`, without
   * passing through the caller.
   */
  sendToRestorePoint(
    source: DiskRef & { checkpointId: string },
    target: ReplicaDiskRef & { pointId: string },
    extents: Extent[],
    options?: SendOptions,
  ): Promise<WriteResult>;
  /**
   * Flushes the point to stable storage and makes it the head; idempotent. `metadata` is merged into the point's
   * own (what is only known once its data is in: the source instant, the reference point). Writes still in flight
   * into the point are refused from the seal on.
   */
  sealRestorePoint(
    ref: ReplicaRef,
    pointId: string,
    seal?: { metadata?: Record<string, string> },
    options?: CallOptions,
  ): Promise<RestorePointInfo>;
  /** Drops a point that was opened and never sealed (an abandoned copy); a sealed point is refused. Idempotent. */
  discardRestorePoint(ref: ReplicaRef, pointId: string, options?: CallOptions): Promise<void>;
  listRestorePoints(ref: ReplicaRef, options?: CallOptions): Promise<RestorePointInfo[]>;
  /** Makes the replica show (and boot from) that point; later points are kept. Replica must be off. */
  revertReplica(ref: ReplicaRef, pointId: string, options?: CallOptions): Promise<ReplicaInfo>;
  /** Retention: merges the oldest point (which must be `pointId`) into the base; done already is fine. */
  mergeOldestRestorePoint(ref: ReplicaRef, pointId: string, options?: CallOptions): Promise<ReplicaInfo>;
  /** Permanent failover: every point and the running layer merged into the base; no points remain. */
  consolidateReplica(ref: ReplicaRef, options?: CallOptions): Promise<ReplicaInfo>;
  /** Undo failover: drops what the replica wrote since power-on; head returns to the newest point. */
  discardRunningLayer(ref: ReplicaRef, options?: CallOptions): Promise<ReplicaInfo>;
  /** Turns the (stopped) running layer into a sealed restore point, e.g. failback-protective. */
  sealRunningLayer(
    ref: ReplicaRef,
    pointId: string,
    spec: RestorePointSpec,
    options?: CallOptions,
  ): Promise<RestorePointInfo>;
  /** Exactly the blocks the replica wrote since it was powered on (failback ships these). */
  listRunningLayerExtents(ref: ReplicaDiskRef, page?: PageRequest, options?: CallOptions): Promise<ExtentPage>;
  /** Every block that may hold data in a view of the replica (any layer of its chain, or the base, holds it). */
  listReplicaAllocatedExtents(
    ref: ReplicaDiskRef,
    view: ReplicaView,
    page?: PageRequest,
    options?: CallOptions,
  ): Promise<ExtentPage>;
  /** Blocks present in that point's own layer (what it changed over the previous point). */
  listRestorePointExtents(
    ref: ReplicaDiskRef,
    pointId: string,
    page?: PageRequest,
    options?: CallOptions,
  ): Promise<ExtentPage>;
  readReplicaExtents(
    ref: ReplicaDiskRef,
    view: ReplicaView,
    extents: Extent[],
    options?: CallOptions,
  ): AsyncIterable<ExtentData>;
  replicaBlockDigests(
    ref: ReplicaDiskRef,
    view: ReplicaView,
    range: BlockRange,
    options?: CallOptions,
  ): Promise<BlockDigests>;
  readReplicaCanary(ref: ReplicaRef, view: ReplicaView, options?: CallOptions): Promise<CanaryReading>;

  // Backup repository
  listBackups(vm: string, options?: CallOptions): Promise<BackupPointInfo[]>;
  listBackupExtents(ref: BackupRef, page?: PageRequest, options?: CallOptions): Promise<ExtentPage>;
  readBackupExtents(ref: BackupRef, extents: Extent[], options?: CallOptions): AsyncIterable<ExtentData>;
}
