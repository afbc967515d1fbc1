// The guest inside a lab VM: deterministic block content and a write workload with a hot set.
// Every written block carries (vm, disk, block, sequence) in its header and a body derived from
// them, so any block read anywhere can be checked; the canary block holds the last sequence.

import { BLOCK_SIZE } from '../src/hypervisor/port';

const CONTENT_MAGIC = 0x47535431; // "GST1"
const CANARY_MAGIC = 0x434e5259; // "CNRY"

export interface GuestProfile {
  blocksPerSecond: number;
  /** Share of the disk's blocks that receive most writes. */
  hotSetFraction: number;
  /** Share of writes that go to the hot set. */
  hotWriteShare: number;
}

function fnv1a(text: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h >>> 0;
}

export function guestBlockContent(vm: string, disk: string, block: number, sequence: number): Buffer {
  const buf = Buffer.allocUnsafe(BLOCK_SIZE);
  const words = new Uint32Array(buf.buffer, buf.byteOffset, BLOCK_SIZE / 4);
  let x = (fnv1a(`${vm}/${disk}`) ^ Math.imul(block + 1, 0x9e3779b1) ^ Math.imul(sequence + 1, 0x85ebca6b)) >>> 0;
  if (x === 0) x = 1;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x >>> 0;
  }
  buf.writeUInt32BE(CONTENT_MAGIC, 0);
  buf.writeUInt32BE(fnv1a(vm), 4);
  buf.writeUInt32BE(fnv1a(disk), 8);
  buf.writeUInt32BE(block, 12);
  buf.writeDoubleBE(sequence, 16);
  return buf;
}

/** Checks a block against its own header; returns its sequence, or null if it is not guest content. */
export function verifyGuestBlock(buf: Buffer, vm: string, disk: string, block: number): number | null {
  if (buf.length !== BLOCK_SIZE || buf.readUInt32BE(0) !== CONTENT_MAGIC) return null;
  const sequence = buf.readDoubleBE(16);
  return guestBlockContent(vm, disk, block, sequence).equals(buf) ? sequence : null;
}

const CORRUPT_MAGIC = 0x42414421; // "BAD!"

/** What LabControl.corruptBlock writes: no guest writes it (not GST1), and it names where it was put. */
export function corruptBlockContent(vm: string, disk: string, block: number): Buffer {
  const buf = Buffer.alloc(BLOCK_SIZE, 0xde);
  buf.writeUInt32BE(CORRUPT_MAGIC, 0);
  buf.writeUInt32BE(fnv1a(vm), 4);
  buf.writeUInt32BE(fnv1a(disk), 8);
  buf.writeUInt32BE(block, 12);
  return buf;
}

export function canaryContent(vm: string, sequence: number): Buffer {
  const buf = Buffer.alloc(BLOCK_SIZE);
  buf.writeUInt32BE(CANARY_MAGIC, 0);
  buf.writeUInt32BE(fnv1a(vm), 4);
  buf.writeDoubleBE(sequence, 8);
  return buf;
}

export function readCanarySequence(buf: Buffer): number {
  return buf.readUInt32BE(0) === CANARY_MAGIC ? buf.readDoubleBE(8) : 0;
}

/** The canary is the last block of the VM's first disk; the workload never writes it otherwise. */
export function canaryBlock(firstDiskBytes: number): number {
  return firstDiskBytes / BLOCK_SIZE - 1;
}

export interface GuestDiskTarget {
  id: string;
  blocks: number;
  write(runs: { offset: number; data: Buffer }[]): Promise<void>;
}

const TICK_MS = 50;

/** Runs while the VM is Running; `stop()` resolves once the last write batch is on disk. */
export class GuestWorkload {
  private timer: NodeJS.Timeout | null = null;
  private inFlight: Promise<void> = Promise.resolve();
  private budget = 0;
  private lastTick = 0;
  private stopped = false;

  constructor(
    private readonly vm: string,
    private readonly disks: GuestDiskTarget[],
    private readonly profile: GuestProfile,
    private sequence: number,
    private readonly onError: (error: unknown) => void,
  ) {}

  get lastSequence(): number {
    return this.sequence;
  }

  start(): void {
    this.lastTick = Date.now();
    this.timer = setInterval(() => this.tick(), TICK_MS);
    this.timer.unref();
  }

  /** Stops writing at once; `flush` writes the canary (guest shutdown), hard power-off does not. */
  async stop(flush: boolean): Promise<void> {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    await this.inFlight;
    if (flush) await this.writeCanary();
  }

  /** Writes guest content to the given blocks now, as the guest would (lab control and tests). */
  async writeBlocks(disk: string, blocks: number[]): Promise<number> {
    const run = this.inFlight.then(() => this.writeSelected(blocks.map((b) => ({ disk, block: b }))));
    this.inFlight = run.catch(() => undefined);
    await run;
    return this.sequence;
  }

  private tick(): void {
    if (this.stopped) return;
    const now = Date.now();
    this.budget += ((now - this.lastTick) / 1000) * this.profile.blocksPerSecond;
    this.lastTick = now;
    const n = Math.floor(this.budget);
    if (n === 0) return;
    this.budget -= n;
    const picks = Array.from({ length: n }, () => this.pick());
    this.inFlight = this.inFlight
      .then(() => (this.stopped ? undefined : this.writeSelected(picks)))
      .catch(this.onError);
  }

  private pick(): { disk: string; block: number } {
    const disk = this.disks[Math.floor(Math.random() * this.disks.length)]!;
    // Block 0.. of each disk; the canary (last block of the first disk) is excluded.
    const usable = disk === this.disks[0] ? disk.blocks - 1 : disk.blocks;
    const hot = Math.max(1, Math.floor(usable * this.profile.hotSetFraction));
    const block =
      Math.random() < this.profile.hotWriteShare ? Math.floor(Math.random() * hot) : Math.floor(Math.random() * usable);
    return { disk: disk.id, block };
  }

  private async writeSelected(picks: { disk: string; block: number }[]): Promise<void> {
    for (const target of this.disks) {
      const runs = picks
        .filter((p) => p.disk === target.id)
        .map((p) => ({
          offset: p.block * BLOCK_SIZE,
          data: guestBlockContent(this.vm, target.id, p.block, ++this.sequence),
        }));
      if (runs.length > 0) await target.write(runs);
    }
    await this.writeCanary();
  }

  private async writeCanary(): Promise<void> {
    const first = this.disks[0];
    if (!first) return;
    await first.write([
      { offset: canaryBlock(first.blocks * BLOCK_SIZE) * BLOCK_SIZE, data: canaryContent(this.vm, this.sequence) },
    ]);
  }
}
