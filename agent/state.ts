// What a KVM host process keeps beside libvirt: which libvirt checkpoint each reference point stands for (the last
// one whose copy really completed), the checkpoint views it has open, how each domain last stopped when libvirt
// cannot say, and each domain's write fence. One JSON file, rewritten atomically after every change, so a restart
// of the process finds it whole.
import { join } from 'node:path';
import { z } from 'zod';
import { JsonStateFile } from '../src/host-api/persist';

const checkpointRecord = z.strictObject({
  id: z.string(),
  createdAt: z.string(),
  /** The libvirt checkpoint the view's changes are counted from (a reference point's); null: no changes known. */
  incrementalFrom: z.string().nullable(),
  /**
   * The domain was off and an older agent started it paused for the backup, to destroy it again when the view closes
   * (views of a domain that is off are `offline` now).
   */
  pausedStart: z.boolean(),
  /**
   * The domain was off: the view reads its disk images directly, through read-only exports of ours that keep the
   * domain from starting; the checkpoint's bitmaps were added to the images and the checkpoint redefined to libvirt.
   */
  offline: z.boolean().default(false),
  /** The disks the view exports, as they were at its start: reads need nothing from libvirtd (it may restart). */
  disks: z.array(z.strictObject({ id: z.string(), sizeBytes: z.number() })),
  /**
   * `beginning` is written before the backup job starts, so a crash between the two is found and cleaned up.
   * `interrupted`: a write into the powered-off disk ended the view's exports; its next read takes it again.
   */
  status: z.enum(['beginning', 'open', 'interrupted']),
});
const referenceRecord = z.strictObject({
  id: z.string(),
  checkpointId: z.string(),
  createdAt: z.string(),
  /** False once change tracking since it was lost (QEMU killed, its bitmaps inconsistent). */
  trackingValid: z.boolean(),
});
const domainRecord = z.strictObject({
  checkpoints: z.array(checkpointRecord),
  referencePoints: z.array(referenceRecord),
  /** How the domain last stopped by this host's hand; null: ask libvirt (it stopped by itself or an operator). */
  lastStop: z.enum(['guest-shutdown', 'forced-off']).nullable(),
  /** Writes into the domain's disks (failback) must carry this token once it is set; null: none set. */
  writeFence: z.string().nullable().default(null),
  /** The agent defined this domain (failback to a new VM): it is under the agent's care without being listed. */
  created: z.boolean().default(false),
  /**
   * The libvirt checkpoints the agent made (recorded before each is made): the only ones it ever deletes. Other
   * tools' checkpoints of the domain are theirs.
   */
  ownCheckpoints: z.array(z.string()).default([]),
});
const pointRecord = z.strictObject({
  id: z.string(),
  createdAt: z.string(),
  kind: z.string(),
  crashConsistent: z.boolean(),
  metadata: z.record(z.string(), z.string()),
  bytesWritten: z.number(),
  sealed: z.boolean(),
});
const replicaRecord = z.strictObject({
  sourceVm: z.string(),
  disks: z.array(z.strictObject({ id: z.string(), sizeBytes: z.number() })),
  /** Oldest first; each point's file of a disk is an overlay on the previous point's (the first on the base). */
  points: z.array(pointRecord),
  headPointId: z.string().nullable(),
  /** The oldest point being merged into the base (recorded before the first file changes); null: none. */
  merging: z.string().nullable().default(null),
  /** The source domain's XML as last replicated; the replica's domain is made from it at each power-on. */
  definition: z.string().nullable().default(null),
  /** The UUID libvirt gave the replica's domain when the agent first defined it: a domain of that name is ours. */
  domainUuid: z.string().nullable().default(null),
  /** The replica has a running layer: one overlay per disk on the head, what the replica wrote since power-on. */
  running: z.boolean().default(false),
  /** The point the running layer is becoming (recorded before its files are renamed); null: none. */
  sealingRunning: pointRecord.nullable().default(null),
  /** Every layer is being (or was) merged into the base: a permanent failover; recorded before the merge starts. */
  consolidating: z.boolean().default(false),
  consolidated: z.boolean().default(false),
});
const stateFile = z.strictObject({
  version: z.literal(1),
  domains: z.record(z.string(), domainRecord),
  replicas: z.record(z.string(), replicaRecord).default({}),
});

export type CheckpointRecord = z.infer<typeof checkpointRecord>;
export type ReferenceRecord = z.infer<typeof referenceRecord>;
export type DomainRecord = z.infer<typeof domainRecord>;
export type PointRecord = z.infer<typeof pointRecord>;
export type ReplicaRecord = z.infer<typeof replicaRecord>;

const emptyDomain = (): DomainRecord => ({
  checkpoints: [],
  referencePoints: [],
  lastStop: null,
  writeFence: null,
  created: false,
  ownCheckpoints: [],
});

type StateFile = z.infer<typeof stateFile>;

/**
 * The agent's own records, in one JSON file with one writer (JsonStateFile): changes of different domains and
 * replicas, made at the same time, are queued and saved in order, never over each other.
 */
export class HostState {
  private constructor(private readonly file: JsonStateFile<StateFile>) {}

  static async load(stateDir: string): Promise<HostState> {
    const path = join(stateDir, 'host-state.json');
    const parse = (raw: unknown): StateFile => {
      const parsed = stateFile.safeParse(raw);
      if (!parsed.success) throw new Error(`${path}: not a host state file: ${parsed.error.issues[0]?.message ?? ''}`);
      // A file of an earlier release names the agent's checkpoints only in its views and reference points.
      for (const d of Object.values(parsed.data.domains))
        for (const name of [...d.checkpoints.map((c) => c.id), ...d.referencePoints.map((r) => r.checkpointId)])
          if (!d.ownCheckpoints.includes(name)) d.ownCheckpoints.push(name);
      return parsed.data;
    };
    return new HostState(await JsonStateFile.load(path, parse, () => ({ version: 1, domains: {}, replicas: {} })));
  }

  /** A copy: change it through update(). */
  domain(name: string): DomainRecord {
    return structuredClone(this.file.saved.domains[name] ?? emptyDomain());
  }

  /** Applies the change to the domain's saved record and resolves once it is on disk; a failed save changes nothing. */
  update(name: string, change: (d: DomainRecord) => void): Promise<DomainRecord> {
    return this.file.change((state) => {
      const next = state.domains[name] ?? emptyDomain();
      change(next);
      state.domains[name] = next;
      return structuredClone(next);
    });
  }

  replicaNames(): string[] {
    return Object.keys(this.file.saved.replicas).sort();
  }

  /** A copy, or null for a replica this host does not hold. */
  replica(name: string): ReplicaRecord | null {
    const r = this.file.saved.replicas[name];
    return r ? structuredClone(r) : null;
  }

  /** Applies the change to the replica's saved record (which must exist) and resolves once it is on disk. */
  updateReplica(name: string, change: (r: ReplicaRecord) => void): Promise<void> {
    return this.file.change((state) => {
      const r = state.replicas[name];
      if (!r) throw new Error(`no replica ${name} in the host state`);
      change(r);
    });
  }

  /** Writes the replica's record (null: removes it), as update() does. */
  setReplica(name: string, record: ReplicaRecord | null): Promise<void> {
    const copy = record && structuredClone(record);
    return this.file.change((state) => {
      if (copy) state.replicas[name] = copy;
      else delete state.replicas[name];
    });
  }
}
