// Wire format of block data between a host (the lab, or our process on a KVM host) and the adapter, both
// directions: a sequence of
// frames, each a 24-byte header [magic u32 | kind u32 | offset u64 | length u32 | reserved u32]
// followed by `length` bytes of data, closed by an END frame. The END frame lets a receiver tell a
// complete stream from one cut short, even when the connection closes cleanly.
// A read asked with digests carries, after each data frame, a DIGESTS frame at the same offset: the digest of each
// of its blocks as the source read them. Forwarded as they are into a restore point, they let the DR host prove what
// it stored against what the source read, without a second pass over either side.

import { BLOCK_SIZE, type Extent, type ExtentData } from '../hypervisor/port';
import { DIGEST_BYTES, digestsOfBlocks } from './digests';

export const FRAME_MAGIC = 0x4c424b31; // "LBK1"
export const FRAME_HEADER_BYTES = 24;
const KIND_DATA = 1;
const KIND_END = 2;
const KIND_DIGESTS = 3;
/** Upper bound of one frame's payload; senders batch contiguous blocks up to this. */
export const MAX_FRAME_BYTES = 16 * 1024 * 1024;
const MAX_DIGESTS_BYTES = (MAX_FRAME_BYTES / BLOCK_SIZE) * DIGEST_BYTES;

export interface FrameOptions {
  /** A DIGESTS frame after each data frame (whose data must be whole blocks). */
  digests?: boolean;
}

export class FrameError extends Error {}

function header(kind: number, offset: number, length: number): Buffer {
  const h = Buffer.allocUnsafe(FRAME_HEADER_BYTES);
  h.writeUInt32BE(FRAME_MAGIC, 0);
  h.writeUInt32BE(kind, 4);
  h.writeBigUInt64BE(BigInt(offset), 8);
  h.writeUInt32BE(length, 16);
  h.writeUInt32BE(0, 20);
  return h;
}

export async function* encodeFrames(
  source: AsyncIterable<ExtentData>,
  options: FrameOptions = {},
): AsyncGenerator<Buffer> {
  for await (const { offset, data } of source) {
    if (data.length === 0) continue;
    // Taken before the data leaves: a reader may reuse its buffer for the next piece once it is sent.
    const digests = options.digests ? digestsOfBlocks(data) : undefined;
    yield header(KIND_DATA, offset, data.length);
    yield data;
    if (digests) {
      yield header(KIND_DIGESTS, offset, digests.length);
      yield digests;
    }
  }
  yield header(KIND_END, 0, 0);
}

/** A run of one frame's data as slices of the received chunks, in order (nothing is copied). */
export interface FramePiece {
  /** Index of the frame in the stream, for error messages. */
  frame: number;
  offset: number;
  length: number;
  parts: Buffer[];
}

/** The digests a source sent for the blocks of a data frame, from `offset` on (DIGEST_BYTES each). */
export interface DigestsFrame {
  /** Index of the data frame they follow, for error messages. */
  frame: number;
  offset: number;
  digests: Buffer;
}

/**
 * Incremental frame parser: push() the bytes as they arrive and get back the frame data they
 * complete. The data are slices of the pushed chunks, so a chunk must not be reused while its
 * slices are in use; a frame comes out in pieces of at most `pieceBytes`. DIGESTS frames go to
 * `onDigests`, whole; without it they are refused.
 */
export class FrameReader {
  private readonly header = Buffer.allocUnsafe(FRAME_HEADER_BYTES);
  private headerFilled = 0;
  private frame = -1;
  /** The frame being received: where its next byte goes and how many are left. */
  private current: { offset: number; remaining: number } | null = null;
  /** The DIGESTS frame being received, and how much of it has arrived. */
  private digests: { offset: number; bytes: Buffer; filled: number } | null = null;
  private piece: FramePiece | null = null;
  private ended = false;

  constructor(
    private readonly pieceBytes = MAX_FRAME_BYTES,
    private readonly onDigests?: (frame: DigestsFrame) => void,
  ) {}

  push(chunk: Buffer): FramePiece[] {
    const out: FramePiece[] = [];
    let at = 0;
    while (at < chunk.length) {
      if (this.ended) throw new FrameError('data after the END frame');
      const digests = this.digests;
      if (digests !== null) {
        const n = Math.min(digests.bytes.length - digests.filled, chunk.length - at);
        chunk.copy(digests.bytes, digests.filled, at, at + n);
        digests.filled += n;
        at += n;
        if (digests.filled === digests.bytes.length) {
          this.digests = null;
          this.onDigests!({ frame: this.frame, offset: digests.offset, digests: digests.bytes });
        }
        continue;
      }
      const current = this.current;
      if (current === null) {
        const n = Math.min(FRAME_HEADER_BYTES - this.headerFilled, chunk.length - at);
        chunk.copy(this.header, this.headerFilled, at, at + n);
        this.headerFilled += n;
        at += n;
        if (this.headerFilled === FRAME_HEADER_BYTES) this.startFrame();
        continue;
      }
      const piece = (this.piece ??= { frame: this.frame, offset: current.offset, length: 0, parts: [] });
      const n = Math.min(current.remaining, this.pieceBytes - piece.length, chunk.length - at);
      piece.parts.push(chunk.subarray(at, at + n));
      piece.length += n;
      at += n;
      current.offset += n;
      current.remaining -= n;
      if (current.remaining === 0 || piece.length === this.pieceBytes) {
        out.push(piece);
        this.piece = null;
        if (current.remaining === 0) this.current = null;
      }
    }
    return out;
  }

  /** Call when the byte stream ends: throws FrameError if it ended before the END frame. */
  end(): void {
    if (!this.ended) throw new FrameError('stream ended before the END frame');
  }

  private startFrame(): void {
    this.headerFilled = 0;
    const h = this.header;
    if (h.readUInt32BE(0) !== FRAME_MAGIC) throw new FrameError('bad frame magic');
    const kind = h.readUInt32BE(4);
    if (kind === KIND_END) {
      this.ended = true;
      return;
    }
    const length = h.readUInt32BE(16);
    if (kind === KIND_DIGESTS && this.onDigests) {
      if (length === 0 || length > MAX_DIGESTS_BYTES || length % DIGEST_BYTES !== 0)
        throw new FrameError(`digests frame length ${length} out of range`);
      this.digests = { offset: Number(h.readBigUInt64BE(8)), bytes: Buffer.allocUnsafe(length), filled: 0 };
      return;
    }
    if (kind !== KIND_DATA) throw new FrameError(`unknown frame kind ${kind}`);
    if (length === 0 || length > MAX_FRAME_BYTES) throw new FrameError(`frame length ${length} out of range`);
    this.frame++;
    this.current = { offset: Number(h.readBigUInt64BE(8)), remaining: length };
  }
}

/**
 * Parses whole frames from a byte stream, each in a buffer of its own (digests, if any, are passed over); throws
 * FrameError if the stream ends before the END frame.
 */
export async function* decodeFrames(source: AsyncIterable<Buffer>): AsyncGenerator<ExtentData> {
  const reader = new FrameReader(MAX_FRAME_BYTES, () => undefined);
  for await (const chunk of source)
    for (const piece of reader.push(chunk))
      yield { offset: piece.offset, data: Buffer.concat(piece.parts, piece.length) };
  reader.end();
}

/** Bytes on the wire of a stream whose frames carry exactly these pieces (each at most MAX_FRAME_BYTES). */
export function framedLength(pieces: Iterable<Extent>, options: FrameOptions = {}): number {
  let length = FRAME_HEADER_BYTES;
  for (const p of pieces) {
    length += FRAME_HEADER_BYTES + p.length;
    if (options.digests) length += FRAME_HEADER_BYTES + (p.length / BLOCK_SIZE) * DIGEST_BYTES;
  }
  return length;
}
