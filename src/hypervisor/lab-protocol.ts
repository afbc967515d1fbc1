// Wire format of block data between the lab and its adapter (both directions): a sequence of
// frames, each a 24-byte header [magic u32 | kind u32 | offset u64 | length u32 | reserved u32]
// followed by `length` bytes of data, closed by an END frame. The END frame lets a receiver tell a
// complete stream from one cut short, even when the connection closes cleanly.

import type { ExtentData } from './port';

export const FRAME_MAGIC = 0x4c424b31; // "LBK1"
export const FRAME_HEADER_BYTES = 24;
const KIND_DATA = 1;
const KIND_END = 2;
/** Upper bound of one frame's payload; senders batch contiguous blocks up to this. */
export const MAX_FRAME_BYTES = 16 * 1024 * 1024;

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

export async function* encodeFrames(source: AsyncIterable<ExtentData>): AsyncGenerator<Buffer> {
  for await (const { offset, data } of source) {
    if (data.length === 0) continue;
    yield header(KIND_DATA, offset, data.length);
    yield data;
  }
  yield header(KIND_END, 0, 0);
}

export interface DecodeOptions {
  /**
   * Yield each frame in pieces of at most this many bytes, from `pieceBuffers` reused buffers (no
   * allocation per frame): a piece stays valid until `pieceBuffers` more pieces have been taken.
   */
  pieceBytes?: number;
  pieceBuffers?: number;
}

/** Parses frames from a byte stream; throws FrameError if the stream ends before the END frame. */
export async function* decodeFrames(
  source: AsyncIterable<Buffer>,
  options: DecodeOptions = {},
): AsyncGenerator<ExtentData & { frame: number }> {
  const pieceBytes = options.pieceBytes;
  const pool = pieceBytes
    ? Array.from({ length: options.pieceBuffers ?? 1 }, () => Buffer.allocUnsafe(pieceBytes))
    : [];
  let turn = 0;
  let pending: Buffer[] = [];
  let pendingBytes = 0;
  let frame = -1;
  // The frame being received: where its next piece starts, bytes left, the piece being filled.
  let current: { offset: number; remaining: number; piece: Buffer; filled: number } | null = null;
  let ended = false;

  const takeHeader = (): Buffer => {
    const all = pending.length === 1 ? pending[0]! : Buffer.concat(pending, pendingBytes);
    const h = all.subarray(0, FRAME_HEADER_BYTES);
    const rest = all.subarray(FRAME_HEADER_BYTES);
    pending = rest.length > 0 ? [rest] : [];
    pendingBytes = rest.length;
    return h;
  };

  for await (const chunk of source) {
    if (ended) {
      if (chunk.length > 0) throw new FrameError('data after the END frame');
      continue;
    }
    let buf: Buffer = chunk;
    while (buf.length > 0 || (current === null && pendingBytes >= FRAME_HEADER_BYTES)) {
      if (current !== null) {
        const want = Math.min(current.piece.length, current.remaining) - current.filled;
        const n = Math.min(buf.length, want);
        buf.copy(current.piece, current.filled, 0, n);
        current.filled += n;
        buf = buf.subarray(n);
        if (n === want) {
          const piece = current.piece.subarray(0, current.filled);
          const offset = current.offset;
          current.offset += current.filled;
          current.remaining -= current.filled;
          current.filled = 0;
          if (pool.length > 0) current.piece = pool[++turn % pool.length]!;
          if (current.remaining === 0) current = null;
          yield { offset, data: piece, frame };
        }
        continue;
      }
      if (buf.length > 0) pending.push(buf);
      pendingBytes += buf.length;
      if (pendingBytes < FRAME_HEADER_BYTES) break;
      const h = takeHeader();
      if (h.readUInt32BE(0) !== FRAME_MAGIC) throw new FrameError('bad frame magic');
      const kind = h.readUInt32BE(4);
      const offset = Number(h.readBigUInt64BE(8));
      const length = h.readUInt32BE(16);
      if (kind === KIND_END) {
        ended = true;
        if (pendingBytes > 0) throw new FrameError('data after the END frame');
        break;
      }
      if (kind !== KIND_DATA) throw new FrameError(`unknown frame kind ${kind}`);
      if (length === 0 || length > MAX_FRAME_BYTES) throw new FrameError(`frame length ${length} out of range`);
      frame++;
      current = { offset, remaining: length, piece: pool[turn % pool.length] ?? Buffer.allocUnsafe(length), filled: 0 };
      // Bytes that arrived with the header belong to this frame's data.
      buf = pending.length > 0 ? Buffer.concat(pending, pendingBytes) : Buffer.alloc(0);
      pending = [];
      pendingBytes = 0;
    }
  }
  if (!ended) throw new FrameError('stream ended before the END frame');
}

/** Error body of every non-2xx lab answer. */
export interface LabErrorBody {
  error: { code: string; message: string; field?: string };
}
