// A pipelined NBD client for QEMU's NBD server: fixed newstyle handshake with structured replies and meta contexts,
// then READ / WRITE / WRITE_ZEROES / TRIM / FLUSH / BLOCK_STATUS with many requests in flight, matched by cookie.
import { createConnection, type Socket } from 'node:net';
import {
  CMD_BLOCK_STATUS,
  CMD_DISC,
  CMD_FLAG_FAST_ZERO,
  CMD_FLAG_FUA,
  CMD_FLAG_NO_HOLE,
  CMD_FLUSH,
  CMD_READ,
  CMD_TRIM,
  CMD_WRITE,
  CMD_WRITE_ZEROES,
  DEFAULT_MAX_PAYLOAD,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  INFO_BLOCK_SIZE,
  INFO_DESCRIPTION,
  INFO_EXPORT,
  INIT_MAGIC,
  OLDSTYLE_MAGIC,
  OPT_ABORT,
  OPT_GO,
  OPT_SET_META_CONTEXT,
  OPT_STRUCTURED_REPLY,
  OPTION_REPLY_MAGIC,
  OPTS_MAGIC,
  REP_ACK,
  REP_ERR_BLOCK_SIZE_REQD,
  REP_ERR_INVALID,
  REP_ERR_PLATFORM,
  REP_ERR_POLICY,
  REP_ERR_SHUTDOWN,
  REP_ERR_TLS_REQD,
  REP_ERR_TOO_BIG,
  REP_ERR_UNKNOWN,
  REP_ERR_UNSUP,
  REP_FLAG_ERROR,
  REP_INFO,
  REP_META_CONTEXT,
  REPLY_FLAG_DONE,
  REPLY_TYPE_BLOCK_STATUS,
  REPLY_TYPE_ERROR_OFFSET,
  REPLY_TYPE_FLAG_ERROR,
  REPLY_TYPE_NONE,
  REPLY_TYPE_OFFSET_DATA,
  REPLY_TYPE_OFFSET_HOLE,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
  TFLAG_CAN_MULTI_CONN,
  TFLAG_READ_ONLY,
  TFLAG_ROTATIONAL,
  TFLAG_SEND_FAST_ZERO,
  TFLAG_SEND_FLUSH,
  TFLAG_SEND_FUA,
  TFLAG_SEND_TRIM,
  TFLAG_SEND_WRITE_ZEROES,
  commandName,
  encodeGoData,
  encodeMetaContextData,
  encodeOption,
  encodeRequest,
  errnoName,
  optionName,
  optionReplyName,
  type NbdCommandName,
} from './protocol';

export type { NbdCommandName } from './protocol';

export type NbdAddress = { path: string } | { host: string; port: number };

export type NbdConnectOptions = NbdAddress & {
  /** Export to attach to; '' is the server's default export. */
  exportName?: string;
  /** Meta contexts to negotiate, e.g. 'base:allocation', 'qemu:dirty-bitmap:b0'; see `metaContexts` for the granted. */
  metaContexts?: readonly string[];
  /** Requests on the wire at once (default 8); further requests wait for a free slot. */
  maxInFlight?: number;
  /** Aborts connecting and the handshake (use AbortSignal.timeout() for a deadline); no effect once connected. */
  signal?: AbortSignal;
  /**
   * A request with no reply for this long drops the connection (every request in flight rejects): a server that
   * hangs must not hold its callers forever. Default: none.
   */
  replyTimeoutMs?: number;
};

export interface NbdExportInfo {
  name: string;
  size: number;
  readOnly: boolean;
  /** Raw transmission flags (NBD_FLAG_*) the server sent for the export. */
  transmissionFlags: number;
  canFlush: boolean;
  canFua: boolean;
  canTrim: boolean;
  canWriteZeroes: boolean;
  canFastZero: boolean;
  canMultiConn: boolean;
  rotational: boolean;
  /** Requests must be aligned to this (1 unless the server asks for more). */
  minBlockSize: number;
  preferredBlockSize: number;
  /** Largest READ/WRITE payload the server accepts. */
  maxBlockSize: number;
  description: string | undefined;
  /** Without structured replies there are no meta contexts and no BLOCK_STATUS. */
  structuredReplies: boolean;
}

export interface NbdRange {
  offset: number;
  length: number;
}

export interface NbdExtent extends NbdRange {
  /** Context-specific state: STATE_HOLE / STATE_ZERO for base:allocation, STATE_DIRTY for a dirty bitmap. */
  flags: number;
}

export interface NbdDataPiece {
  offset: number;
  data: Buffer;
}

export interface NbdWriteOptions {
  /** Force unit access: the reply comes only once the data is on stable storage. */
  fua?: boolean;
}

export interface NbdWriteZeroesOptions extends NbdWriteOptions {
  /** Allocate the zeroes rather than punching a hole. */
  noHole?: boolean;
  /** Fail with ENOTSUP rather than fall back to a slow zeroing write. */
  fastZero?: boolean;
}

export interface NbdReadExtentsOptions {
  /** Extents are read in pieces of at most this size (default 4 MiB, capped at the server's max block size). */
  pieceSize?: number;
  /** Pieces read ahead of the consumer (default: the client's maxInFlight). */
  window?: number;
}

/**
 * The server answered a command with an error, or the client refused one without sending it (`local`): EPERM for a
 * write to a read-only export, ENOTSUP for a feature or meta context the server did not offer.
 */
export class NbdError extends Error {
  /** Errno name, e.g. 'EIO', 'EPERM', 'ENOSPC', 'EINVAL', 'ENOTSUP'. */
  readonly code: string;
  /** The protocol's errno value (protocol numbering, not necessarily the host's). */
  readonly errno: number;
  readonly command: NbdCommandName;
  readonly offset: number;
  readonly length: number;
  readonly exportName: string;
  readonly serverMessage: string | undefined;
  /** Where the error happened, when the server said (NBD_REPLY_TYPE_ERROR_OFFSET). */
  readonly errorOffset: number | undefined;
  /** True when the client refused the command itself without sending it. */
  readonly local: boolean;

  constructor(fields: {
    errno: number;
    command: NbdCommandName;
    offset: number;
    length: number;
    exportName: string;
    serverMessage?: string;
    errorOffset?: number;
    local?: boolean;
    detail?: string;
  }) {
    const code = errnoName(fields.errno);
    const why = fields.detail ?? (fields.serverMessage ? `${code} (${fields.serverMessage})` : code);
    const outcome = fields.local ? 'refused without sending' : 'failed';
    super(
      `${describeCommand(fields.command, fields.offset, fields.length)} on export '${fields.exportName}' ${outcome}: ${why}`,
    );
    this.name = 'NbdError';
    this.code = code;
    this.errno = fields.errno;
    this.command = fields.command;
    this.offset = fields.offset;
    this.length = fields.length;
    this.exportName = fields.exportName;
    this.serverMessage = fields.serverMessage;
    this.errorOffset = fields.errorOffset;
    this.local = fields.local ?? false;
  }
}

/** The connection could not be made, broke, was closed, or the server broke the protocol. */
export class NbdConnectionError extends Error {
  constructor(message: string, options: { cause?: unknown } = {}) {
    super(message, { cause: options.cause });
    this.name = 'NbdConnectionError';
  }
}

/** The server refused an option during the handshake, e.g. an unknown export name (reply NBD_REP_ERR_UNKNOWN). */
export class NbdNegotiationError extends Error {
  readonly exportName: string;
  /** The option refused, e.g. 'NBD_OPT_GO'. */
  readonly option: string;
  /** The error reply, e.g. 'NBD_REP_ERR_UNKNOWN'. */
  readonly reply: string;
  readonly serverMessage: string | undefined;

  constructor(fields: { exportName: string; option: number; reply: number; serverMessage: string; address: string }) {
    const reason = REFUSAL_REASONS.get(fields.reply) ?? 'refused';
    const said = fields.serverMessage ? `: "${fields.serverMessage}"` : '';
    super(
      `NBD server at ${fields.address} refused export '${fields.exportName}': ${reason} ` +
        `(${optionReplyName(fields.reply)} to ${optionName(fields.option)}${said})`,
    );
    this.name = 'NbdNegotiationError';
    this.exportName = fields.exportName;
    this.option = optionName(fields.option);
    this.reply = optionReplyName(fields.reply);
    this.serverMessage = fields.serverMessage || undefined;
  }
}

const REFUSAL_REASONS: ReadonlyMap<number, string> = new Map([
  [REP_ERR_UNKNOWN, 'no such export'],
  [REP_ERR_POLICY, 'forbidden by server policy'],
  [REP_ERR_TLS_REQD, 'the server requires TLS'],
  [REP_ERR_UNSUP, 'option not supported by the server'],
  [REP_ERR_INVALID, 'invalid request'],
  [REP_ERR_PLATFORM, 'not supported on the server platform'],
  [REP_ERR_SHUTDOWN, 'the server is shutting down'],
  [REP_ERR_BLOCK_SIZE_REQD, 'the server requires block size negotiation'],
  [REP_ERR_TOO_BIG, 'request too big'],
]);

function describeCommand(command: NbdCommandName, offset: number, length: number): string {
  return command === 'FLUSH' || command === 'DISC'
    ? `NBD ${command}`
    : `NBD ${command} of ${length} bytes at offset ${offset}`;
}

function describeAddress(address: NbdAddress): string {
  return 'path' in address ? `unix:${address.path}` : `${address.host}:${address.port}`;
}

/** A broken protocol invariant; the stream can no longer be trusted, so the connection is torn down. */
class ProtocolViolation extends Error {}

const MAX_OPTION_REPLY = 1 << 20;
const MAX_STATUS_PAYLOAD = 64 << 20;
const DEFAULT_PIECE = 4 << 20;
/** Commands without payload (WRITE_ZEROES, TRIM) are still bounded by the 32-bit length; 1 GiB keeps pieces aligned. */
const MAX_NO_PAYLOAD_PIECE = 1 << 30;
/** Largest BLOCK_STATUS length the 32-bit field holds that stays aligned to any minimum block size we accept. */
const MAX_STATUS_REQUEST = 2 ** 32 - 2 ** 16;

/**
 * Buffers socket data for one sequential consumer (the handshake, then the reply loop). Reads wait for data and
 * reject once the connection fails and the buffered bytes run out.
 */
class Reader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private wake: (() => void) | undefined;
  private failure: Error | undefined;

  push(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    this.notify();
  }

  fail(error: Error): void {
    this.failure ??= error;
    this.notify();
  }

  async read(n: number): Promise<Buffer> {
    await this.waitFor(n);
    const first = this.chunks[0];
    if (first !== undefined && first.length >= n) {
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      this.buffered -= n;
      return first.subarray(0, n);
    }
    const out = Buffer.allocUnsafe(n);
    this.copyOut(out, 0, n);
    return out;
  }

  /** Fills `target` as data arrives, so a 32 MiB payload is never buffered twice. */
  async readInto(target: Buffer): Promise<void> {
    let at = 0;
    while (at < target.length) {
      await this.waitFor(1);
      const n = Math.min(this.buffered, target.length - at);
      this.copyOut(target, at, n);
      at += n;
    }
  }

  private copyOut(target: Buffer, at: number, n: number): void {
    while (n > 0) {
      const chunk = this.chunks[0];
      if (chunk === undefined) throw new Error('reader underrun');
      const k = Math.min(chunk.length, n);
      chunk.copy(target, at, 0, k);
      if (k === chunk.length) this.chunks.shift();
      else this.chunks[0] = chunk.subarray(k);
      this.buffered -= k;
      at += k;
      n -= k;
    }
  }

  private async waitFor(n: number): Promise<void> {
    while (this.buffered < n) {
      if (this.failure) throw this.failure;
      await new Promise<void>((resolve) => (this.wake = resolve));
    }
  }

  private notify(): void {
    const wake = this.wake;
    this.wake = undefined;
    wake?.();
  }
}

/** Counting semaphore for the in-flight limit; waiters are rejected when the connection dies. */
class Slots {
  private readonly waiters: { resolve: () => void; reject: (error: Error) => void }[] = [];
  private failure: Error | undefined;

  constructor(private free: number) {}

  acquire(): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.free > 0) {
      this.free--;
      return Promise.resolve();
    }
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  release(): void {
    const next = this.waiters.shift();
    if (next) next.resolve();
    else this.free++;
  }

  failAll(error: Error): void {
    this.failure = error;
    for (const waiter of this.waiters.splice(0)) waiter.reject(error);
  }
}

interface Pending {
  type: number;
  offset: number;
  length: number;
  /** READ: where the data goes. */
  target: Buffer | undefined;
  /** READ: bytes covered by data and hole chunks, to catch a server that leaves a gap. */
  covered: number;
  /** BLOCK_STATUS: descriptors per context id. */
  status: Map<number, { length: number; flags: number }[]>;
  error: NbdError | undefined;
  resolve: () => void;
  reject: (error: Error) => void;
}

interface Negotiated {
  info: NbdExportInfo;
  contexts: Map<string, number>;
}

export class NbdClient {
  readonly info: NbdExportInfo;
  /** Granted meta contexts by name, with the id the server assigned. Requested ones the server lacks are absent. */
  readonly metaContexts: ReadonlyMap<string, number>;
  readonly address: string;
  readonly maxInFlight: number;

  private readonly slots: Slots;
  private readonly pending = new Map<number, Pending>();
  private readonly maxPiece: number;
  private readonly socketClosed: Promise<void>;
  private nextCookie = 1;
  private failure: NbdConnectionError | undefined;
  private closeRequested = false;
  private closing: Promise<void> | undefined;
  private active = 0;
  private whenIdle: (() => void) | undefined;

  private constructor(
    private readonly socket: Socket,
    private readonly reader: Reader,
    negotiated: Negotiated,
    address: string,
    maxInFlight: number,
    private readonly replyTimeoutMs: number | undefined,
  ) {
    this.info = negotiated.info;
    this.metaContexts = negotiated.contexts;
    this.address = address;
    this.maxInFlight = maxInFlight;
    this.slots = new Slots(maxInFlight);
    const min = this.info.minBlockSize;
    this.maxPiece = Math.max(min, Math.floor(Math.min(DEFAULT_MAX_PAYLOAD, this.info.maxBlockSize) / min) * min);
    this.socketClosed = new Promise((resolve) => {
      if (socket.destroyed) resolve();
      else socket.once('close', () => resolve());
    });
    void this.receiveLoop();
  }

  /** Connects, negotiates and attaches to the export. Rejects with NbdNegotiationError or NbdConnectionError. */
  static async connect(options: NbdConnectOptions): Promise<NbdClient> {
    const exportName = options.exportName ?? '';
    const queries = options.metaContexts ?? [];
    const maxInFlight = options.maxInFlight ?? 8;
    if (!Number.isInteger(maxInFlight) || maxInFlight < 1) {
      throw new RangeError(`maxInFlight must be a positive integer (got ${maxInFlight})`);
    }
    const address = 'path' in options ? { path: options.path } : { host: options.host, port: options.port };
    const where = describeAddress(address);
    const signal = options.signal;
    if (signal?.aborted) {
      throw new NbdConnectionError(`connecting to NBD server at ${where} aborted`, { cause: signal.reason });
    }

    const socket = createConnection(address);
    const reader = new Reader();
    let phase: 'connecting' | 'handshake' | 'transmission' = 'connecting';
    socket.on('connect', () => {
      phase = 'handshake';
      if (!('path' in address)) socket.setNoDelay(true);
    });
    socket.on('data', (chunk: Buffer) => reader.push(chunk));
    socket.on('error', (error) => {
      const message =
        phase === 'connecting'
          ? `cannot connect to NBD server at ${where}: ${error.message}`
          : `NBD connection to ${where} (export '${exportName}') failed: ${error.message}`;
      reader.fail(new NbdConnectionError(message, { cause: error }));
    });
    const onEnd = (): void => {
      const during = phase === 'transmission' ? '' : ' during the handshake';
      reader.fail(new NbdConnectionError(`NBD server at ${where} closed the connection${during}`));
    };
    socket.on('end', onEnd);
    socket.on('close', onEnd);

    const onAbort = (): void => {
      reader.fail(new NbdConnectionError(`connecting to NBD server at ${where} aborted`, { cause: signal?.reason }));
      socket.destroy();
    };
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      const negotiated = await negotiate(socket, reader, exportName, queries, where);
      phase = 'transmission';
      return new NbdClient(socket, reader, negotiated, where, maxInFlight, options.replyTimeoutMs);
    } catch (error) {
      if (error instanceof NbdNegotiationError && !socket.destroyed) {
        // Still in the option phase: say goodbye properly, but do not wait for the server's ACK.
        socket.end(encodeOption(OPT_ABORT));
        setTimeout(() => socket.destroy(), 1000).unref();
      } else {
        socket.destroy();
      }
      if (error instanceof ProtocolViolation) {
        throw new NbdConnectionError(
          `NBD server at ${where} broke the protocol during the handshake: ${error.message}`,
        );
      }
      throw error;
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
  }

  get exportName(): string {
    return this.info.name;
  }

  get size(): number {
    return this.info.size;
  }

  get readOnly(): boolean {
    return this.info.readOnly;
  }

  /** Requests sent and not yet answered (at most maxInFlight). */
  get inFlight(): number {
    return this.pending.size;
  }

  /** True once the connection is closed, destroyed or broken; every request then rejects at once. */
  get closed(): boolean {
    return this.closeRequested || this.failure !== undefined;
  }

  /** Reads `length` bytes at `offset`; holes come back as zeroes. Split into pieces the server accepts. */
  async read(offset: number, length: number): Promise<Buffer> {
    this.checkRange('READ', offset, length);
    const out = Buffer.allocUnsafe(length);
    if (length === 0) return out;
    const min = this.info.minBlockSize;
    const start = Math.floor(offset / min) * min;
    const end = Math.min(this.info.size, Math.ceil((offset + length) / min) * min);
    if (start === offset && end === offset + length) {
      await this.readPieces(offset, out);
      return out;
    }
    // The server demands aligned requests: read the covering blocks and cut out the part asked for.
    const covering = Buffer.allocUnsafe(end - start);
    await this.readPieces(start, covering);
    covering.copy(out, 0, offset - start, offset - start + length);
    return out;
  }

  /**
   * Reads many ranges with up to `window` pieces in flight, yielding pieces in order (a long range comes as several
   * consecutive pieces). Memory stays bounded by window × pieceSize. Breaking out waits for the reads in flight.
   */
  async *readExtents(
    ranges: Iterable<NbdRange> | AsyncIterable<NbdRange>,
    options: NbdReadExtentsOptions = {},
  ): AsyncGenerator<NbdDataPiece, void, undefined> {
    const pieceSize = Math.min(options.pieceSize ?? DEFAULT_PIECE, this.maxPiece);
    const window = options.window ?? this.maxInFlight;
    if (!Number.isInteger(pieceSize) || pieceSize < 1) throw new RangeError(`pieceSize must be a positive integer`);
    if (!Number.isInteger(window) || window < 1) throw new RangeError(`window must be a positive integer`);

    type Settled = { piece: NbdDataPiece } | { error: unknown };
    const queue: Promise<Settled>[] = [];
    const pieces = this.splitRanges(ranges, pieceSize)[Symbol.asyncIterator]();
    let exhausted = false;
    try {
      for (;;) {
        while (!exhausted && queue.length < window) {
          const next = await pieces.next();
          if (next.done) {
            exhausted = true;
            break;
          }
          const { offset, length } = next.value;
          // Settle into a value at once: a failure while the consumer holds a piece must not be an unhandled rejection.
          queue.push(
            this.read(offset, length).then(
              (data) => ({ piece: { offset, data } }),
              (error: unknown) => ({ error }),
            ),
          );
        }
        const head = queue.shift();
        if (head === undefined) return;
        const settled = await head;
        if ('error' in settled) throw settled.error;
        yield settled.piece;
      }
    } finally {
      await Promise.all(queue);
      await pieces.return?.();
    }
  }

  /** Writes `data` at `offset`. Do not modify `data` until the promise settles: it is sent without copying. */
  async write(offset: number, data: Uint8Array, options: NbdWriteOptions = {}): Promise<void> {
    this.checkRange('WRITE', offset, data.length);
    this.checkWritable('WRITE', offset, data.length);
    this.checkAligned('WRITE', offset, data.length);
    const flags = this.fuaFlag('WRITE', offset, data.length, options.fua);
    if (data.length === 0) return;
    const jobs: Promise<Pending>[] = [];
    for (let at = 0; at < data.length; at += this.maxPiece) {
      const n = Math.min(this.maxPiece, data.length - at);
      jobs.push(this.submit(CMD_WRITE, flags, offset + at, n, data.subarray(at, at + n), undefined));
    }
    await Promise.all(jobs);
  }

  /** Makes the range read as zeroes without sending the zeroes. */
  async writeZeroes(offset: number, length: number, options: NbdWriteZeroesOptions = {}): Promise<void> {
    this.checkRange('WRITE_ZEROES', offset, length);
    this.checkWritable('WRITE_ZEROES', offset, length);
    this.checkAligned('WRITE_ZEROES', offset, length);
    this.requireFlag('WRITE_ZEROES', offset, length, this.info.canWriteZeroes, 'NBD_FLAG_SEND_WRITE_ZEROES');
    let flags = this.fuaFlag('WRITE_ZEROES', offset, length, options.fua);
    if (options.noHole) flags |= CMD_FLAG_NO_HOLE;
    if (options.fastZero) {
      this.requireFlag('WRITE_ZEROES', offset, length, this.info.canFastZero, 'NBD_FLAG_SEND_FAST_ZERO');
      flags |= CMD_FLAG_FAST_ZERO;
    }
    await this.submitSplit(CMD_WRITE_ZEROES, flags, offset, length);
  }

  /** Discards the range (its content becomes unspecified). */
  async trim(offset: number, length: number, options: NbdWriteOptions = {}): Promise<void> {
    this.checkRange('TRIM', offset, length);
    this.checkWritable('TRIM', offset, length);
    this.checkAligned('TRIM', offset, length);
    this.requireFlag('TRIM', offset, length, this.info.canTrim, 'NBD_FLAG_SEND_TRIM');
    await this.submitSplit(CMD_TRIM, this.fuaFlag('TRIM', offset, length, options.fua), offset, length);
  }

  /** Commits every write the server has replied to so far to stable storage. */
  async flush(): Promise<void> {
    this.requireFlag('FLUSH', 0, 0, this.info.canFlush, 'NBD_FLAG_SEND_FLUSH');
    await this.submit(CMD_FLUSH, 0, 0, 0, undefined, undefined);
  }

  /**
   * Extents of `context` over the whole range, contiguous from `offset`, adjacent extents with equal flags merged,
   * clipped to the range. Servers may describe less than asked per request, so this asks again from where the
   * previous answer ended.
   */
  async blockStatus(context: string, offset: number, length: number): Promise<NbdExtent[]> {
    this.checkRange('BLOCK_STATUS', offset, length);
    const id = this.metaContexts.get(context);
    if (id === undefined) {
      const granted = [...this.metaContexts.keys()].join(', ') || 'none';
      const detail = `ENOTSUP (meta context '${context}' was not negotiated; granted: ${granted})`;
      throw this.localError('BLOCK_STATUS', offset, length, 95, detail);
    }
    const extents: NbdExtent[] = [];
    const end = offset + length;
    let at = offset;
    while (at < end) {
      const ask = Math.min(end - at, MAX_STATUS_REQUEST);
      const reply = await this.submit(CMD_BLOCK_STATUS, 0, at, ask, undefined, undefined);
      const descriptors = reply.status.get(id);
      if (descriptors === undefined) {
        throw this.localError('BLOCK_STATUS', at, ask, 5, `EIO (the server's reply had no extents for '${context}')`);
      }
      let pos = at;
      for (const d of descriptors) {
        if (pos >= end) break;
        const n = Math.min(d.length, end - pos);
        const last = extents[extents.length - 1];
        if (last !== undefined && last.flags === d.flags && last.offset + last.length === pos) last.length += n;
        else extents.push({ offset: pos, length: n, flags: d.flags });
        pos += n;
      }
      at = pos;
    }
    return extents;
  }

  /**
   * Waits for the requests in flight, sends NBD_CMD_DISC and closes the socket. Requests made after close() reject.
   */
  close(): Promise<void> {
    this.closing ??= this.shutdown();
    return this.closing;
  }

  /** Drops the connection at once; requests in flight reject. */
  destroy(): void {
    this.closeRequested = true;
    this.teardown(new NbdConnectionError(`NBD connection to ${this.address} (export '${this.exportName}') destroyed`));
  }

  private async shutdown(): Promise<void> {
    this.closeRequested = true;
    if (this.active > 0) await new Promise<void>((resolve) => (this.whenIdle = resolve));
    if (this.failure) return;
    this.socket.end(encodeRequest(0, CMD_DISC, this.nextCookie++, 0, 0));
    // The server closes its end after DISC; do not wait forever for one that does not.
    const timer = setTimeout(() => this.socket.destroy(), 5000);
    await this.socketClosed;
    clearTimeout(timer);
    this.teardown(new NbdConnectionError(`NBD connection to ${this.address} (export '${this.exportName}') closed`));
  }

  private async *splitRanges(
    ranges: Iterable<NbdRange> | AsyncIterable<NbdRange>,
    pieceSize: number,
  ): AsyncGenerator<NbdRange, void, undefined> {
    for await (const range of ranges) {
      this.checkRange('READ', range.offset, range.length);
      for (let at = 0; at < range.length; at += pieceSize) {
        yield { offset: range.offset + at, length: Math.min(pieceSize, range.length - at) };
      }
    }
  }

  private async readPieces(offset: number, target: Buffer): Promise<void> {
    const jobs: Promise<Pending>[] = [];
    for (let at = 0; at < target.length; at += this.maxPiece) {
      const n = Math.min(this.maxPiece, target.length - at);
      jobs.push(this.submit(CMD_READ, 0, offset + at, n, undefined, target.subarray(at, at + n)));
    }
    await Promise.all(jobs);
  }

  private async submitSplit(type: number, flags: number, offset: number, length: number): Promise<void> {
    const piece = Math.max(this.info.minBlockSize, MAX_NO_PAYLOAD_PIECE);
    const jobs: Promise<Pending>[] = [];
    for (let at = 0; at < length; at += piece) {
      jobs.push(this.submit(type, flags, offset + at, Math.min(piece, length - at), undefined, undefined));
    }
    await Promise.all(jobs);
  }

  /** Sends one request once a slot is free and resolves with its completed reply state. */
  private async submit(
    type: number,
    flags: number,
    offset: number,
    length: number,
    payload: Uint8Array | undefined,
    target: Buffer | undefined,
  ): Promise<Pending> {
    this.ensureOpen(type, offset, length);
    this.active++;
    try {
      try {
        await this.slots.acquire();
      } catch {
        throw this.lostError(type, offset, length);
      }
      try {
        // A request queued before close() still goes out: close() waits for it.
        if (this.failure) throw this.lostError(type, offset, length);
        const cookie = this.nextCookie++;
        const entry: Pending = {
          type,
          offset,
          length,
          target,
          covered: 0,
          status: new Map(),
          error: undefined,
          resolve: () => {},
          reject: () => {},
        };
        const done = new Promise<void>((resolve, reject) => {
          entry.resolve = resolve;
          entry.reject = reject;
        });
        this.pending.set(cookie, entry);
        this.socket.write(encodeRequest(flags, type, cookie, offset, length));
        if (payload !== undefined) this.socket.write(payload);
        const hung =
          this.replyTimeoutMs === undefined
            ? undefined
            : setTimeout(() => {
                const what = `${commandName(type)} at ${offset} (${length} bytes)`;
                this.teardown(
                  new NbdConnectionError(
                    `NBD server at ${this.address} gave no reply to ${what} within ${this.replyTimeoutMs} ms`,
                  ),
                );
              }, this.replyTimeoutMs);
        try {
          await done;
        } finally {
          clearTimeout(hung);
        }
        return entry;
      } finally {
        this.slots.release();
      }
    } finally {
      this.active--;
      if (this.active === 0) this.whenIdle?.();
    }
  }

  private async receiveLoop(): Promise<void> {
    try {
      for (;;) {
        const magic = (await this.reader.read(4)).readUInt32BE(0);
        if (magic === SIMPLE_REPLY_MAGIC) await this.receiveSimple();
        else if (magic === STRUCTURED_REPLY_MAGIC) await this.receiveChunk();
        else throw new ProtocolViolation(`bad reply magic 0x${magic.toString(16)}`);
      }
    } catch (error) {
      if (error instanceof NbdConnectionError) this.teardown(error);
      else {
        const why = error instanceof Error ? error.message : String(error);
        this.teardown(
          new NbdConnectionError(`NBD server at ${this.address} broke the protocol: ${why}`, { cause: error }),
        );
      }
    }
  }

  private async receiveSimple(): Promise<void> {
    const header = await this.reader.read(12);
    const errno = header.readUInt32BE(0);
    const cookie = Number(header.readBigUInt64BE(4));
    const entry = this.pending.get(cookie);
    if (entry === undefined) throw new ProtocolViolation(`reply for unknown cookie ${cookie}`);
    if (errno !== 0) {
      entry.error = this.serverError(entry, errno, undefined, undefined);
    } else if (entry.type === CMD_READ && entry.target !== undefined) {
      // Stays in `pending` while its payload arrives, so a connection dying now still rejects it.
      await this.reader.readInto(entry.target);
      entry.covered = entry.length;
    }
    this.pending.delete(cookie);
    this.settle(entry);
  }

  private async receiveChunk(): Promise<void> {
    const header = await this.reader.read(16);
    const flags = header.readUInt16BE(0);
    const type = header.readUInt16BE(2);
    const cookie = Number(header.readBigUInt64BE(4));
    const length = header.readUInt32BE(12);
    const entry = this.pending.get(cookie);
    if (entry === undefined) throw new ProtocolViolation(`reply chunk for unknown cookie ${cookie}`);

    if (type === REPLY_TYPE_OFFSET_DATA) {
      if (entry.target === undefined || length < 8) throw new ProtocolViolation(`unexpected data chunk`);
      const at = Number((await this.reader.read(8)).readBigUInt64BE(0)) - entry.offset;
      const n = length - 8;
      if (at < 0 || at + n > entry.length) throw new ProtocolViolation(`data chunk outside the requested range`);
      await this.reader.readInto(entry.target.subarray(at, at + n));
      entry.covered += n;
    } else if (type === REPLY_TYPE_OFFSET_HOLE) {
      if (entry.target === undefined || length !== 12) throw new ProtocolViolation(`unexpected hole chunk`);
      const body = await this.reader.read(12);
      const at = Number(body.readBigUInt64BE(0)) - entry.offset;
      const n = body.readUInt32BE(8);
      if (at < 0 || n === 0 || at + n > entry.length) throw new ProtocolViolation(`hole chunk outside the request`);
      entry.target.fill(0, at, at + n);
      entry.covered += n;
    } else if (type === REPLY_TYPE_BLOCK_STATUS) {
      if (entry.type !== CMD_BLOCK_STATUS || length < 12 || (length - 4) % 8 !== 0 || length > MAX_STATUS_PAYLOAD) {
        throw new ProtocolViolation(`unexpected block status chunk of ${length} bytes`);
      }
      const body = await this.reader.read(length);
      const descriptors: { length: number; flags: number }[] = [];
      for (let at = 4; at < length; at += 8) {
        const n = body.readUInt32BE(at);
        if (n === 0) throw new ProtocolViolation('block status extent of length 0');
        descriptors.push({ length: n, flags: body.readUInt32BE(at + 4) });
      }
      entry.status.set(body.readUInt32BE(0), descriptors);
    } else if (type & REPLY_TYPE_FLAG_ERROR) {
      if (length < 6) throw new ProtocolViolation(`error chunk of ${length} bytes`);
      const body = await this.reader.read(length);
      const errno = body.readUInt32BE(0);
      const messageLength = body.readUInt16BE(4);
      if (6 + messageLength > length) throw new ProtocolViolation('error chunk message overruns the chunk');
      const message = body.toString('utf8', 6, 6 + messageLength);
      const errorOffset =
        type === REPLY_TYPE_ERROR_OFFSET && length >= 6 + messageLength + 8
          ? Number(body.readBigUInt64BE(6 + messageLength))
          : undefined;
      // Several chunks may fail; the first one tells the story.
      entry.error ??= this.serverError(entry, errno === 0 ? 22 : errno, message, errorOffset);
    } else if (type === REPLY_TYPE_NONE) {
      if (length !== 0) throw new ProtocolViolation('NONE chunk with a payload');
    } else {
      throw new ProtocolViolation(`unknown reply chunk type ${type}`);
    }

    if (flags & REPLY_FLAG_DONE) {
      this.pending.delete(cookie);
      this.settle(entry);
    }
  }

  private settle(entry: Pending): void {
    if (entry.error) {
      entry.reject(entry.error);
      return;
    }
    if (entry.type === CMD_READ && entry.covered !== entry.length) {
      // The entry has left `pending`, so teardown will not reject it: do it here.
      const violation = new ProtocolViolation(`READ reply covered ${entry.covered} of ${entry.length} bytes`);
      entry.reject(new NbdConnectionError(`NBD server at ${this.address} broke the protocol: ${violation.message}`));
      throw violation;
    }
    entry.resolve();
  }

  private teardown(reason: NbdConnectionError): void {
    if (this.failure) return;
    this.failure = reason;
    this.reader.fail(reason);
    const entries = [...this.pending.values()];
    this.pending.clear();
    for (const entry of entries) entry.reject(this.lostError(entry.type, entry.offset, entry.length));
    this.slots.failAll(reason);
    this.socket.destroy();
  }

  private ensureOpen(type: number, offset: number, length: number): void {
    if (this.closeRequested) {
      throw new NbdConnectionError(
        `${describeCommand(asCommand(type), offset, length)} on export '${this.exportName}' refused: the client is closed`,
      );
    }
    if (this.failure) throw this.lostError(type, offset, length);
  }

  private lostError(type: number, offset: number, length: number): NbdConnectionError {
    const reason = this.failure?.message ?? 'connection lost';
    return new NbdConnectionError(
      `${describeCommand(asCommand(type), offset, length)} on export '${this.exportName}' did not complete: ${reason}`,
      { cause: this.failure },
    );
  }

  private serverError(
    entry: Pending,
    errno: number,
    serverMessage: string | undefined,
    errorOffset: number | undefined,
  ): NbdError {
    return new NbdError({
      errno,
      command: asCommand(entry.type),
      offset: entry.offset,
      length: entry.length,
      exportName: this.exportName,
      ...(serverMessage ? { serverMessage } : {}),
      ...(errorOffset !== undefined ? { errorOffset } : {}),
    });
  }

  private localError(command: NbdCommandName, offset: number, length: number, errno: number, detail: string): NbdError {
    return new NbdError({ errno, command, offset, length, exportName: this.exportName, local: true, detail });
  }

  private checkRange(command: NbdCommandName, offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
      throw new RangeError(
        `NBD ${command}: offset and length must be non-negative integers (got offset ${offset}, length ${length})`,
      );
    }
    if (offset + length > this.info.size) {
      throw new RangeError(
        `${describeCommand(command, offset, length)} reaches past the end of export '${this.exportName}' ` +
          `(size ${this.info.size}); refused without sending`,
      );
    }
  }

  /**
   * Writes to a read-only export are refused here with EPERM, the errno the spec asks for: sending them is pointless,
   * and QEMU 7.2 itself answers EINVAL ("Export is read-only").
   */
  private checkWritable(command: NbdCommandName, offset: number, length: number): void {
    if (this.info.readOnly) throw this.localError(command, offset, length, 1, 'EPERM (the export is read-only)');
  }

  private checkAligned(command: NbdCommandName, offset: number, length: number): void {
    const min = this.info.minBlockSize;
    if (offset % min !== 0 || length % min !== 0) {
      throw new RangeError(
        `${describeCommand(command, offset, length)} is not aligned to the ${min}-byte minimum block size ` +
          `of export '${this.exportName}'; refused without sending`,
      );
    }
  }

  private requireFlag(command: NbdCommandName, offset: number, length: number, has: boolean, flag: string): void {
    if (has) return;
    throw this.localError(command, offset, length, 95, `ENOTSUP (the server does not offer it: no ${flag})`);
  }

  private fuaFlag(command: NbdCommandName, offset: number, length: number, fua: boolean | undefined): number {
    if (!fua) return 0;
    this.requireFlag(command, offset, length, this.info.canFua, 'NBD_FLAG_SEND_FUA');
    return CMD_FLAG_FUA;
  }
}

function asCommand(type: number): NbdCommandName {
  const name = commandName(type);
  if (name.startsWith('CMD_')) throw new Error(`unknown NBD command ${type}`);
  return name as NbdCommandName;
}

async function negotiate(
  socket: Socket,
  reader: Reader,
  exportName: string,
  queries: readonly string[],
  address: string,
): Promise<Negotiated> {
  const hello = await reader.read(18);
  if (hello.readBigUInt64BE(0) !== INIT_MAGIC) throw new ProtocolViolation('not an NBD server (bad magic)');
  const style = hello.readBigUInt64BE(8);
  if (style === OLDSTYLE_MAGIC) throw new ProtocolViolation('oldstyle NBD servers are not supported');
  if (style !== OPTS_MAGIC) throw new ProtocolViolation('bad newstyle magic');
  const handshakeFlags = hello.readUInt16BE(16);
  if (!(handshakeFlags & FLAG_FIXED_NEWSTYLE)) throw new ProtocolViolation('the server does not offer fixed newstyle');
  const clientFlags = Buffer.allocUnsafe(4);
  clientFlags.writeUInt32BE(FLAG_C_FIXED_NEWSTYLE | (handshakeFlags & FLAG_NO_ZEROES ? FLAG_C_NO_ZEROES : 0), 0);
  socket.write(clientFlags);

  const refuse = (option: number, reply: OptionReply): NbdNegotiationError =>
    new NbdNegotiationError({
      exportName,
      option,
      reply: reply.type,
      serverMessage: reply.data.toString('utf8'),
      address,
    });

  socket.write(encodeOption(OPT_STRUCTURED_REPLY));
  const structuredReply = await readOptionReply(reader, OPT_STRUCTURED_REPLY);
  if (structuredReply.type !== REP_ACK && !(structuredReply.type & REP_FLAG_ERROR)) {
    throw new ProtocolViolation(`unexpected ${optionReplyName(structuredReply.type)} to NBD_OPT_STRUCTURED_REPLY`);
  }
  // Any refusal just means simple replies: reads still work, BLOCK_STATUS does not.
  const structured = structuredReply.type === REP_ACK;

  const contexts = new Map<string, number>();
  if (structured && queries.length > 0) {
    socket.write(encodeOption(OPT_SET_META_CONTEXT, encodeMetaContextData(exportName, queries)));
    for (;;) {
      const reply = await readOptionReply(reader, OPT_SET_META_CONTEXT);
      if (reply.type === REP_ACK) break;
      if (reply.type === REP_META_CONTEXT && reply.data.length >= 4) {
        contexts.set(reply.data.toString('utf8', 4), reply.data.readUInt32BE(0));
      } else if (reply.type === REP_ERR_UNSUP) {
        break;
      } else if (reply.type & REP_FLAG_ERROR) {
        throw refuse(OPT_SET_META_CONTEXT, reply);
      } else {
        throw new ProtocolViolation(`unexpected ${optionReplyName(reply.type)} to NBD_OPT_SET_META_CONTEXT`);
      }
    }
  }

  // Asking for NBD_INFO_BLOCK_SIZE promises to honour the minimum, which lets the server state its real limits.
  socket.write(encodeOption(OPT_GO, encodeGoData(exportName, [INFO_BLOCK_SIZE, INFO_DESCRIPTION])));
  let size: number | undefined;
  let tflags = 0;
  let minBlockSize = 1;
  let preferredBlockSize = 4096;
  let maxBlockSize = DEFAULT_MAX_PAYLOAD;
  let description: string | undefined;
  for (;;) {
    const reply = await readOptionReply(reader, OPT_GO);
    if (reply.type === REP_ACK) break;
    if (reply.type & REP_FLAG_ERROR) throw refuse(OPT_GO, reply);
    if (reply.type !== REP_INFO) continue; // Unknown non-error replies may be ignored.
    if (reply.data.length < 2) throw new ProtocolViolation('NBD_REP_INFO without a type');
    const info = reply.data.readUInt16BE(0);
    if (info === INFO_EXPORT && reply.data.length >= 12) {
      const raw = reply.data.readBigUInt64BE(2);
      if (raw > BigInt(Number.MAX_SAFE_INTEGER)) throw new ProtocolViolation(`export size ${raw} is too large`);
      size = Number(raw);
      tflags = reply.data.readUInt16BE(10);
    } else if (info === INFO_BLOCK_SIZE && reply.data.length >= 14) {
      const min = reply.data.readUInt32BE(2);
      const preferred = reply.data.readUInt32BE(6);
      const max = reply.data.readUInt32BE(10);
      // The spec requires powers of two; anything else is ignored rather than trusted.
      if (min >= 1 && (min & (min - 1)) === 0 && min <= 65536) minBlockSize = min;
      if (preferred >= minBlockSize) preferredBlockSize = preferred;
      if (max >= minBlockSize) maxBlockSize = max;
    } else if (info === INFO_DESCRIPTION) {
      description = reply.data.toString('utf8', 2);
    }
  }
  if (size === undefined) throw new ProtocolViolation('NBD_OPT_GO succeeded without NBD_INFO_EXPORT');
  return {
    info: {
      name: exportName,
      size,
      readOnly: (tflags & TFLAG_READ_ONLY) !== 0,
      transmissionFlags: tflags,
      canFlush: (tflags & TFLAG_SEND_FLUSH) !== 0,
      canFua: (tflags & TFLAG_SEND_FUA) !== 0,
      canTrim: (tflags & TFLAG_SEND_TRIM) !== 0,
      canWriteZeroes: (tflags & TFLAG_SEND_WRITE_ZEROES) !== 0,
      canFastZero: (tflags & TFLAG_SEND_FAST_ZERO) !== 0,
      canMultiConn: (tflags & TFLAG_CAN_MULTI_CONN) !== 0,
      rotational: (tflags & TFLAG_ROTATIONAL) !== 0,
      minBlockSize,
      preferredBlockSize,
      maxBlockSize,
      description,
      structuredReplies: structured,
    },
    contexts,
  };
}

interface OptionReply {
  type: number;
  data: Buffer;
}

async function readOptionReply(reader: Reader, option: number): Promise<OptionReply> {
  const header = await reader.read(20);
  if (header.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw new ProtocolViolation('bad option reply magic');
  const replyOption = header.readUInt32BE(8);
  if (replyOption !== option) {
    throw new ProtocolViolation(`reply to ${optionName(replyOption)} while waiting for ${optionName(option)}`);
  }
  const type = header.readUInt32BE(12);
  const length = header.readUInt32BE(16);
  if (length > MAX_OPTION_REPLY) throw new ProtocolViolation(`option reply of ${length} bytes`);
  return { type, data: length > 0 ? await reader.read(length) : Buffer.alloc(0) };
}
