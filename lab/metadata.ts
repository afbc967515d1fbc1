// The lab's durable metadata (state.json) and the names of the layer files it refers to. Every layer file in the
// data directory is named from this metadata; a file it does not name is garbage (left by a crash).

import type { DiskInfo, PowerState, VmInfo } from '../src/hypervisor/port';
import type { GuestProfile } from './guest';

export interface CheckpointMeta {
  id: string;
  createdAt: string;
  generation: number;
  epochs: Record<string, number>;
}

export interface ReferencePointMeta extends CheckpointMeta {
  checkpointId: string;
}

export interface PointMeta {
  id: string;
  createdAt: string;
  kind: string;
  crashConsistent: boolean;
  metadata: Record<string, string>;
  sealed: boolean;
}

export interface ReplicaMeta {
  sourceVm: string;
  /** Oldest first. */
  points: PointMeta[];
  headPointId: string | null;
  running: boolean;
  /** Permanent failover done: the guest writes straight into the base. */
  consolidated: boolean;
  /** A merge or consolidation in progress, redone after a crash. */
  merging: string | null;
  /** The running layer being turned into this point (its files renamed), finished after a crash. */
  sealing?: PointMeta | null;
}

export interface VmMeta {
  name: string;
  host: string;
  kind: 'source' | 'replica';
  powerState: PowerState;
  disks: DiskInfo[];
  profile: GuestProfile;
  shutdownMs: number;
  bootMs: number;
  /** How it last went Off; absent in state files written before it was recorded. */
  lastStop?: VmInfo['lastStop'];
  /** Source-disk writes must carry this token once it is set (see fenceWrites). */
  writeFence?: string;
  checkpoints: CheckpointMeta[];
  referencePoints: ReferencePointMeta[];
  replica?: ReplicaMeta;
}

export interface BackupMeta {
  id: string;
  vm: string;
  createdAt: string;
  disks: DiskInfo[];
}

/** Version 1 named layers `cp-<id>-<disk>` and `pt-<id>-<disk>`, which two layers could share (m8). */
export const STATE_VERSION = 2;

export interface StateFile {
  version: 1 | typeof STATE_VERSION;
  /** Bumped by every unclean restart: tracking from older generations is gone. */
  generation: number;
  vms: VmMeta[];
  backups: BackupMeta[];
}

export interface TrackingFile {
  generation: number;
  disks: Record<string, { epoch: number; blocks: number[]; checkpoints: Record<string, number[]> }>;
}

/**
 * Stems of a VM's layer files (`<stem>.img`, `<stem>.map`) in its directory. '+' is outside the id alphabet, so
 * one stem names one layer only, whatever '-' the ids hold.
 */
export const stem = {
  base: (disk: string): string => `base-${disk}`,
  running: (disk: string): string => `running-${disk}`,
  checkpoint: (checkpointId: string, disk: string): string => `cp+${checkpointId}+${disk}`,
  point: (pointId: string, disk: string): string => `pt+${pointId}+${disk}`,
};

/** Every layer the metadata of a VM refers to. */
export function layerStems(meta: VmMeta): string[] {
  const out: string[] = [];
  for (const { id: disk } of meta.disks) {
    out.push(stem.base(disk));
    for (const cp of meta.checkpoints) out.push(stem.checkpoint(cp.id, disk));
    for (const p of meta.replica?.points ?? []) out.push(stem.point(p.id, disk));
    if (meta.replica?.running) out.push(stem.running(disk));
  }
  return out;
}

/** The metadata side of sealing the running layer: the point becomes the head, the running layer is gone. */
export function finishSealing(r: ReplicaMeta): PointMeta {
  const point = r.sealing!;
  r.points.push(point);
  r.running = false;
  r.headPointId = point.id;
  r.sealing = null;
  return point;
}
