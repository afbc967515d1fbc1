// Wire constants and encoders of the NBD protocol (fixed newstyle handshake, simple and structured replies), as
// spoken by QEMU's NBD server (qemu-storage-daemon, qemu-nbd, the built-in server). All integers are big-endian.

/** 'NBDMAGIC': first eight bytes of every handshake. */
export const INIT_MAGIC = 0x4e42444d41474943n;
/** 'IHAVEOPT': newstyle servers send it after INIT_MAGIC; clients prefix every option with it. */
export const OPTS_MAGIC = 0x49484156454f5054n;
/** What an oldstyle server sends instead of OPTS_MAGIC; we do not speak oldstyle. */
export const OLDSTYLE_MAGIC = 0x00420281861253n;
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// Handshake flags (server) and client flags.
export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;
export const FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_C_NO_ZEROES = 1 << 1;

export const OPT_EXPORT_NAME = 1;
export const OPT_ABORT = 2;
export const OPT_LIST = 3;
export const OPT_STARTTLS = 5;
export const OPT_INFO = 6;
export const OPT_GO = 7;
export const OPT_STRUCTURED_REPLY = 8;
export const OPT_LIST_META_CONTEXT = 9;
export const OPT_SET_META_CONTEXT = 10;

export const REP_ACK = 1;
export const REP_SERVER = 2;
export const REP_INFO = 3;
export const REP_META_CONTEXT = 4;
/** Option replies with this bit set are errors. */
export const REP_FLAG_ERROR = 0x80000000;
export const REP_ERR_UNSUP = REP_FLAG_ERROR + 1;
export const REP_ERR_POLICY = REP_FLAG_ERROR + 2;
export const REP_ERR_INVALID = REP_FLAG_ERROR + 3;
export const REP_ERR_PLATFORM = REP_FLAG_ERROR + 4;
export const REP_ERR_TLS_REQD = REP_FLAG_ERROR + 5;
export const REP_ERR_UNKNOWN = REP_FLAG_ERROR + 6;
export const REP_ERR_SHUTDOWN = REP_FLAG_ERROR + 7;
export const REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR + 8;
export const REP_ERR_TOO_BIG = REP_FLAG_ERROR + 9;
export const REP_ERR_EXT_HEADER_REQD = REP_FLAG_ERROR + 10;

export const INFO_EXPORT = 0;
export const INFO_NAME = 1;
export const INFO_DESCRIPTION = 2;
export const INFO_BLOCK_SIZE = 3;

// Transmission flags of an export (NBD_INFO_EXPORT).
export const TFLAG_HAS_FLAGS = 1 << 0;
export const TFLAG_READ_ONLY = 1 << 1;
export const TFLAG_SEND_FLUSH = 1 << 2;
export const TFLAG_SEND_FUA = 1 << 3;
export const TFLAG_ROTATIONAL = 1 << 4;
export const TFLAG_SEND_TRIM = 1 << 5;
export const TFLAG_SEND_WRITE_ZEROES = 1 << 6;
export const TFLAG_SEND_DF = 1 << 7;
export const TFLAG_CAN_MULTI_CONN = 1 << 8;
export const TFLAG_SEND_RESIZE = 1 << 9;
export const TFLAG_SEND_CACHE = 1 << 10;
export const TFLAG_SEND_FAST_ZERO = 1 << 11;

export const CMD_READ = 0;
export const CMD_WRITE = 1;
export const CMD_DISC = 2;
export const CMD_FLUSH = 3;
export const CMD_TRIM = 4;
export const CMD_CACHE = 5;
export const CMD_WRITE_ZEROES = 6;
export const CMD_BLOCK_STATUS = 7;

export const CMD_FLAG_FUA = 1 << 0;
export const CMD_FLAG_NO_HOLE = 1 << 1;
export const CMD_FLAG_DF = 1 << 2;
export const CMD_FLAG_REQ_ONE = 1 << 3;
export const CMD_FLAG_FAST_ZERO = 1 << 4;

export const REPLY_FLAG_DONE = 1 << 0;
export const REPLY_TYPE_NONE = 0;
export const REPLY_TYPE_OFFSET_DATA = 1;
export const REPLY_TYPE_OFFSET_HOLE = 2;
export const REPLY_TYPE_BLOCK_STATUS = 5;
/** Structured reply chunk types with this bit set are errors; all start with errno + message. */
export const REPLY_TYPE_FLAG_ERROR = 1 << 15;
export const REPLY_TYPE_ERROR = REPLY_TYPE_FLAG_ERROR + 1;
export const REPLY_TYPE_ERROR_OFFSET = REPLY_TYPE_FLAG_ERROR + 2;

/** Meta context answering "is this range allocated / does it read as zeroes". */
export const BASE_ALLOCATION = 'base:allocation';
/** base:allocation flag: the range is not allocated (a hole). */
export const STATE_HOLE = 1 << 0;
/** base:allocation flag: the range reads as zeroes. */
export const STATE_ZERO = 1 << 1;
/** qemu:dirty-bitmap:<name> flag: the range changed while the bitmap was enabled. */
export const STATE_DIRTY = 1 << 0;

/** The meta context QEMU exports for a dirty bitmap named in the export's `bitmaps` list. */
export function dirtyBitmapContext(bitmap: string): string {
  return `qemu:dirty-bitmap:${bitmap}`;
}

/** The protocol's default and QEMU's hard limit (NBD_MAX_BUFFER_SIZE) for one READ or WRITE payload. */
export const DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024;

export type NbdCommandName = 'READ' | 'WRITE' | 'DISC' | 'FLUSH' | 'TRIM' | 'CACHE' | 'WRITE_ZEROES' | 'BLOCK_STATUS';

const COMMAND_NAMES: readonly NbdCommandName[] = [
  'READ',
  'WRITE',
  'DISC',
  'FLUSH',
  'TRIM',
  'CACHE',
  'WRITE_ZEROES',
  'BLOCK_STATUS',
];

export function commandName(type: number): NbdCommandName | `CMD_${number}` {
  return COMMAND_NAMES[type] ?? `CMD_${type}`;
}

/** Errno values the protocol defines (they are fixed on the wire, independent of the host's errno numbering). */
const ERRNO_NAMES: ReadonlyMap<number, string> = new Map([
  [1, 'EPERM'],
  [5, 'EIO'],
  [12, 'ENOMEM'],
  [22, 'EINVAL'],
  [28, 'ENOSPC'],
  [75, 'EOVERFLOW'],
  [95, 'ENOTSUP'],
  [108, 'ESHUTDOWN'],
]);

/** The spec tells clients to treat an errno it does not define as EINVAL. */
export function errnoName(errno: number): string {
  return ERRNO_NAMES.get(errno) ?? 'EINVAL';
}

const OPTION_REPLY_NAMES: ReadonlyMap<number, string> = new Map([
  [REP_ACK, 'NBD_REP_ACK'],
  [REP_SERVER, 'NBD_REP_SERVER'],
  [REP_INFO, 'NBD_REP_INFO'],
  [REP_META_CONTEXT, 'NBD_REP_META_CONTEXT'],
  [REP_ERR_UNSUP, 'NBD_REP_ERR_UNSUP'],
  [REP_ERR_POLICY, 'NBD_REP_ERR_POLICY'],
  [REP_ERR_INVALID, 'NBD_REP_ERR_INVALID'],
  [REP_ERR_PLATFORM, 'NBD_REP_ERR_PLATFORM'],
  [REP_ERR_TLS_REQD, 'NBD_REP_ERR_TLS_REQD'],
  [REP_ERR_UNKNOWN, 'NBD_REP_ERR_UNKNOWN'],
  [REP_ERR_SHUTDOWN, 'NBD_REP_ERR_SHUTDOWN'],
  [REP_ERR_BLOCK_SIZE_REQD, 'NBD_REP_ERR_BLOCK_SIZE_REQD'],
  [REP_ERR_TOO_BIG, 'NBD_REP_ERR_TOO_BIG'],
  [REP_ERR_EXT_HEADER_REQD, 'NBD_REP_ERR_EXT_HEADER_REQD'],
]);

export function optionReplyName(type: number): string {
  return OPTION_REPLY_NAMES.get(type) ?? `NBD_REP_${type >>> 0}`;
}

const OPTION_NAMES: ReadonlyMap<number, string> = new Map([
  [OPT_EXPORT_NAME, 'NBD_OPT_EXPORT_NAME'],
  [OPT_ABORT, 'NBD_OPT_ABORT'],
  [OPT_LIST, 'NBD_OPT_LIST'],
  [OPT_STARTTLS, 'NBD_OPT_STARTTLS'],
  [OPT_INFO, 'NBD_OPT_INFO'],
  [OPT_GO, 'NBD_OPT_GO'],
  [OPT_STRUCTURED_REPLY, 'NBD_OPT_STRUCTURED_REPLY'],
  [OPT_LIST_META_CONTEXT, 'NBD_OPT_LIST_META_CONTEXT'],
  [OPT_SET_META_CONTEXT, 'NBD_OPT_SET_META_CONTEXT'],
]);

export function optionName(option: number): string {
  return OPTION_NAMES.get(option) ?? `NBD_OPT_${option}`;
}

/** Option header (magic, option, length) followed by its data. */
export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.allocUnsafe(16);
  header.writeBigUInt64BE(OPTS_MAGIC, 0);
  header.writeUInt32BE(option, 8);
  header.writeUInt32BE(data.length, 12);
  return Buffer.concat([header, data]);
}

/** Data of NBD_OPT_GO / NBD_OPT_INFO: export name and the NBD_INFO_* items we ask for. */
export function encodeGoData(exportName: string, infos: readonly number[]): Buffer {
  const name = Buffer.from(exportName, 'utf8');
  const data = Buffer.allocUnsafe(4 + name.length + 2 + 2 * infos.length);
  data.writeUInt32BE(name.length, 0);
  name.copy(data, 4);
  let at = 4 + name.length;
  data.writeUInt16BE(infos.length, at);
  at += 2;
  for (const info of infos) {
    data.writeUInt16BE(info, at);
    at += 2;
  }
  return data;
}

/** Data of NBD_OPT_SET_META_CONTEXT / NBD_OPT_LIST_META_CONTEXT: export name and the context queries. */
export function encodeMetaContextData(exportName: string, queries: readonly string[]): Buffer {
  const name = Buffer.from(exportName, 'utf8');
  const parts: Buffer[] = [];
  const head = Buffer.allocUnsafe(4 + name.length + 4);
  head.writeUInt32BE(name.length, 0);
  name.copy(head, 4);
  head.writeUInt32BE(queries.length, 4 + name.length);
  parts.push(head);
  for (const query of queries) {
    const q = Buffer.from(query, 'utf8');
    const len = Buffer.allocUnsafe(4);
    len.writeUInt32BE(q.length, 0);
    parts.push(len, q);
  }
  return Buffer.concat(parts);
}

export const REQUEST_HEADER_SIZE = 28;

export function encodeRequest(flags: number, type: number, cookie: number, offset: number, length: number): Buffer {
  const buf = Buffer.allocUnsafe(REQUEST_HEADER_SIZE);
  buf.writeUInt32BE(REQUEST_MAGIC, 0);
  buf.writeUInt16BE(flags, 4);
  buf.writeUInt16BE(type, 6);
  buf.writeBigUInt64BE(BigInt(cookie), 8);
  buf.writeBigUInt64BE(BigInt(offset), 16);
  buf.writeUInt32BE(length, 24);
  return buf;
}
