// A layer is one sparse file the size of the virtual disk plus a journal of the 64 KiB blocks it
// holds. Source disks, checkpoint copy-on-write stores, restore points, running layers and backups
// are all layers; a view of a disk is a stack of them over a base.

import { open, type FileHandle } from 'node:fs/promises';
import { BLOCK_SIZE } from '../../src/hypervisor/port';
import { fsyncPath, removeFile } from '../../src/host-api/persist';

export class Layer {
  /** Blocks this layer holds data for. */
  readonly present = new Set<number>();
  private journalBytes = 0;
  private unflushed = 0;
  /** The background flush of written data while it runs (it never rejects: see writebackError). */
  private writeback: Promise<void> | null = null;
  private writebackError: Error | null = null;

  private constructor(
    readonly path: string,
    readonly sizeBytes: number,
    private readonly data: FileHandle,
    private readonly journal: FileHandle,
  ) {}

  get blocks(): number {
    return this.sizeBytes / BLOCK_SIZE;
  }

  /**
   * Creates an empty sparse layer. Files left at that path (by a step a crash interrupted) are removed first and
   * never taken for the layer: their blocks would show through. The caller makes the names durable (fsyncPath).
   */
  static async create(path: string, sizeBytes: number): Promise<Layer> {
    await removeFile(`${path}.map`);
    await removeFile(`${path}.img`);
    const data = await open(`${path}.img`, 'wx+');
    await data.truncate(sizeBytes);
    return new Layer(path, sizeBytes, data, await open(`${path}.map`, 'wx+'));
  }

  /** Opens an existing layer (the metadata says it exists: missing files are an error, never a new empty layer). */
  static async open(path: string, sizeBytes: number): Promise<Layer> {
    const data = await open(`${path}.img`, 'r+');
    const st = await data.stat();
    if (st.size !== sizeBytes) await data.truncate(sizeBytes);
    const journal = await open(`${path}.map`, 'r+');
    const layer = new Layer(path, sizeBytes, data, journal);
    const raw = await journal.readFile();
    // A record torn by a crash is ignored: its data write may not have completed either.
    const whole = raw.length - (raw.length % 8);
    for (let i = 0; i < whole; i += 8) {
      const start = raw.readUInt32LE(i);
      const count = raw.readUInt32LE(i + 4);
      for (let b = start; b < start + count; b++) layer.present.add(b);
    }
    layer.journalBytes = whole;
    return layer;
  }

  has(block: number): boolean {
    return this.present.has(block);
  }

  /**
   * Writes block-aligned data (one buffer, or several written back to back in one call); journals
   * blocks that are new to this layer after the data is written.
   */
  async write(offset: number, data: Buffer | readonly Buffer[]): Promise<void> {
    const length = Buffer.isBuffer(data) ? data.length : byteLength(data);
    await this.writeAll(Buffer.isBuffer(data) ? [data] : data, offset);
    this.startWriteback(length);
    const first = offset / BLOCK_SIZE;
    const count = length / BLOCK_SIZE;
    const runs: number[] = [];
    let runStart = -1;
    for (let b = first; b < first + count; b++) {
      const fresh = !this.present.has(b);
      if (fresh) {
        this.present.add(b);
        if (runStart < 0) runStart = b;
      }
      if (runStart >= 0 && (!fresh || b === first + count - 1)) {
        runs.push(runStart, (fresh ? b + 1 : b) - runStart);
        runStart = -1;
      }
    }
    if (runs.length === 0) return;
    const rec = Buffer.allocUnsafe(runs.length * 4);
    runs.forEach((v, i) => rec.writeUInt32LE(v, i * 4));
    const at = this.journalBytes;
    this.journalBytes += rec.length;
    await this.journal.write(rec, 0, rec.length, at);
  }

  /** Reads raw bytes of this layer's file (zeros where it holds nothing). */
  async read(offset: number, length: number, into?: Buffer, intoOffset = 0): Promise<Buffer> {
    const buf = into ?? Buffer.allocUnsafe(length);
    let done = 0;
    while (done < length) {
      const { bytesRead } = await this.data.read(buf, intoOffset + done, length - done, offset + done);
      if (bytesRead === 0) {
        buf.fill(0, intoOffset + done, intoOffset + length);
        break;
      }
      done += bytesRead;
    }
    return buf;
  }

  async sync(): Promise<void> {
    await this.writeback;
    if (this.writebackError !== null) throw this.writebackError;
    this.unflushed = 0;
    await Promise.all([this.data.datasync(), this.journal.datasync()]);
  }

  async close(): Promise<void> {
    await this.data.close().catch(() => undefined);
    await this.journal.close().catch(() => undefined);
  }

  /** The journal goes first: a journal marking blocks present over a missing or new data file must never be. */
  async destroy(): Promise<void> {
    await this.close();
    await removeFile(`${this.path}.map`);
    await removeFile(`${this.path}.img`);
  }

  private async writeAll(buffers: readonly Buffer[], offset: number): Promise<void> {
    let pending = buffers;
    let at = offset;
    while (pending.length > 0) {
      const { bytesWritten } = await this.data.writev(pending, at);
      at += bytesWritten;
      pending = skipBytes(pending, bytesWritten);
    }
  }

  /**
   * Once enough data is dirty, flushes it in the background while the writes go on, so that sync()
   * only waits for the tail. A failure sticks to the layer for sync() to report: Linux reports a
   * writeback error once, so a later datasync could pass although the data never reached the disk.
   */
  private startWriteback(bytes: number): void {
    this.unflushed += bytes;
    if (this.unflushed < WRITEBACK_BYTES || this.writeback) return;
    this.unflushed = 0;
    this.writeback = this.data.datasync().then(
      () => {
        this.writeback = null;
      },
      (e: unknown) => {
        this.writeback = null;
        this.writebackError ??= e instanceof Error ? e : new Error(String(e));
      },
    );
  }
}

/** Creates layers in one directory (see Layer.create), then makes their names durable with one directory sync. */
export async function createLayers(dir: string, layers: { path: string; sizeBytes: number }[]): Promise<Layer[]> {
  const out: Layer[] = [];
  for (const l of layers) out.push(await Layer.create(l.path, l.sizeBytes));
  await fsyncPath(dir);
  return out;
}

/** Destroys layers of one directory, then syncs it once. */
export async function destroyLayers(dir: string, layers: Layer[]): Promise<void> {
  for (const l of layers) await l.destroy();
  await fsyncPath(dir);
}

/** Dirty bytes after which a layer starts flushing them in the background. */
const WRITEBACK_BYTES = 32 * 1024 * 1024;

function byteLength(buffers: readonly Buffer[]): number {
  let n = 0;
  for (const b of buffers) n += b.length;
  return n;
}

/** The buffers left once the first `bytes` of them are written. */
function skipBytes(buffers: readonly Buffer[], bytes: number): readonly Buffer[] {
  let i = 0;
  let left = bytes;
  while (i < buffers.length && left >= buffers[i]!.length) left -= buffers[i++]!.length;
  if (i === buffers.length) return [];
  return [buffers[i]!.subarray(left), ...buffers.slice(i + 1)];
}

/** Sorted ascending block numbers coalesced into byte extents, from `fromBlock`, at most `limit` extents. */
export function blocksToExtents(
  sortedBlocks: number[],
  fromBlock: number,
  limit: number,
): { extents: { offset: number; length: number }[]; nextBlock: number | null } {
  const extents: { offset: number; length: number }[] = [];
  let i = lowerBound(sortedBlocks, fromBlock);
  while (i < sortedBlocks.length) {
    if (extents.length === limit) return { extents, nextBlock: sortedBlocks[i]! };
    const start = sortedBlocks[i]!;
    let end = start + 1;
    i++;
    while (i < sortedBlocks.length && sortedBlocks[i] === end) {
      end++;
      i++;
    }
    extents.push({ offset: start * BLOCK_SIZE, length: (end - start) * BLOCK_SIZE });
  }
  return { extents, nextBlock: null };
}

function lowerBound(a: number[], v: number): number {
  let lo = 0;
  let hi = a.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (a[mid]! < v) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}
