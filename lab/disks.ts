// Source disks (base file, RCT-like change tracking, copy-on-write checkpoints) and replica disks
// (base plus a chain of restore-point layers and a running layer).

import { BLOCK_SIZE, type ExtentData } from '../src/hypervisor/port';
import { Mutex } from './lock';
import { Layer } from './storage/layer';
import type { View } from './storage/view';

/** Copy-on-write store of one checkpoint on one disk. */
export interface CheckpointStore {
  cow: Layer;
  /** Tracking epoch each saved block had when the checkpoint was taken. */
  cowEpoch: Map<number, number>;
}

function blocksOf(runs: ExtentData[]): number[] {
  const out: number[] = [];
  for (const r of runs)
    for (let b = r.offset / BLOCK_SIZE; b < (r.offset + r.data.length) / BLOCK_SIZE; b++) out.push(b);
  return out;
}

/** Groups sorted unique block numbers into contiguous runs [start, count]. */
function runsOf(sorted: number[]): [number, number][] {
  const out: [number, number][] = [];
  for (const b of sorted) {
    const last = out[out.length - 1];
    if (last && last[0] + last[1] === b && last[1] < 256) last[1]++;
    else out.push([b, 1]);
  }
  return out;
}

export class SourceDisk {
  readonly lock = new Mutex();
  /** Increases with every write batch; a block's epoch says when it last changed. */
  epoch = 0;
  readonly blockEpoch = new Map<number, number>();
  readonly checkpoints = new Map<string, CheckpointStore>();

  constructor(
    readonly id: string,
    readonly base: Layer,
  ) {}

  get sizeBytes(): number {
    return this.base.sizeBytes;
  }

  write(runs: ExtentData[]): Promise<void> {
    return this.lock.run(() => this.writeLocked(runs));
  }

  /** Saves what live checkpoints still need, then writes; the caller holds the lock. */
  async writeLocked(runs: ExtentData[]): Promise<void> {
    this.epoch++;
    const written = [...new Set(blocksOf(runs))].sort((a, b) => a - b);
    for (const store of this.checkpoints.values()) {
      const needed = written.filter((b) => !store.cow.has(b));
      for (const [start, count] of runsOf(needed)) {
        const old = await this.base.read(start * BLOCK_SIZE, count * BLOCK_SIZE);
        await store.cow.write(start * BLOCK_SIZE, old);
        for (let b = start; b < start + count; b++) store.cowEpoch.set(b, this.blockEpoch.get(b) ?? 0);
      }
    }
    for (const r of runs) await this.base.write(r.offset, r.data);
    for (const b of written) this.blockEpoch.set(b, this.epoch);
  }

  view(checkpointId: string | null): View {
    if (checkpointId === null) return { layers: [], base: this.base };
    const store = this.checkpoints.get(checkpointId)!;
    return { layers: [store.cow], base: this.base };
  }

  /** Blocks whose content at the checkpoint differs from their content at `sinceEpoch`. */
  changedBlocks(sinceEpoch: number, checkpointId: string): number[] {
    const store = this.checkpoints.get(checkpointId)!;
    const out: number[] = [];
    for (const [b, e] of this.blockEpoch) {
      const asOfCheckpoint = store.cowEpoch.get(b) ?? e;
      if (asOfCheckpoint > sinceEpoch) out.push(b);
    }
    for (const [b, e] of store.cowEpoch) if (!this.blockEpoch.has(b) && e > sinceEpoch) out.push(b);
    return out.sort((a, b) => a - b);
  }

  async close(): Promise<void> {
    await this.base.close();
    for (const s of this.checkpoints.values()) await s.cow.close();
  }
}

export class ReplicaDisk {
  readonly lock = new Mutex();
  /** Restore point layers by point id; their order lives in the replica's metadata. */
  readonly points = new Map<string, Layer>();
  running: Layer | null = null;

  constructor(
    readonly id: string,
    readonly base: Layer,
  ) {}

  get sizeBytes(): number {
    return this.base.sizeBytes;
  }

  /** View at a point given the chain order (oldest first) up to and including that point. */
  pointView(chainUpTo: string[]): View {
    return { layers: chainUpTo.map((id) => this.points.get(id)!).reverse(), base: this.base };
  }

  runningView(chainToHead: string[]): View {
    const v = this.pointView(chainToHead);
    if (this.running) v.layers.unshift(this.running);
    return v;
  }

  /** Guest writes land in the running layer, or in the base once the replica is consolidated. */
  guestWrite(runs: ExtentData[]): Promise<void> {
    return this.lock.run(async () => {
      const target = this.running ?? this.base;
      for (const r of runs) await target.write(r.offset, r.data);
    });
  }

  /** Copies every block of `layer` into the base in ≥1 MiB runs; safe to repeat after a crash. */
  async mergeIntoBase(layer: Layer): Promise<void> {
    const sorted = [...layer.present].sort((a, b) => a - b);
    for (const [start, count] of runsOf(sorted)) {
      const data = await layer.read(start * BLOCK_SIZE, count * BLOCK_SIZE);
      await this.base.write(start * BLOCK_SIZE, data);
    }
    await this.base.sync();
  }

  async close(): Promise<void> {
    await this.base.close();
    for (const l of this.points.values()) await l.close();
    await this.running?.close();
  }
}
