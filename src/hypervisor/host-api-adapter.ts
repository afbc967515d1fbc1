// The hypervisor port over the host API (src/host-api/) that the lab site and our KVM host process both serve, over
// mutual TLS. Control calls are JSON; block data travels as frames (src/host-api/frames.ts) streamed in both directions.
// Network and HTTP failures become the port's error classes so activities can decide what to retry.

import http from 'node:http';
import https from 'node:https';
import { readFileSync } from 'node:fs';
import { createSecureContext, type PeerCertificate, type SecureContext } from 'node:tls';
import { Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  BadRequestError,
  ConflictError,
  HostFailureError,
  HostIdentityError,
  HostTimeoutError,
  HostUnreachableError,
  HypervisorError,
  NotFoundError,
  TrackingLostError,
  TransferInterruptedError,
} from './errors';
import { readPrivateKeyFile, sanEntries, type ClientTlsFiles } from '../host-api/certificates';
import type { HostApiErrorBody } from '../host-api/errors';
import type { HostJobRunning } from '../host-api/schemas';
import { isLoopback } from '../host-api/loopback';
import { decodeFrames, encodeFrames } from '../host-api/frames';
import type {
  BackupPointInfo,
  BackupRef,
  BlockDigests,
  BlockRange,
  CallOptions,
  CanaryReading,
  CheckpointInfo,
  DiskRef,
  Extent,
  ExtentData,
  ExtentPage,
  FencedTransferOptions,
  HostInfo,
  HypervisorPort,
  PageRequest,
  PowerOnOptions,
  PowerResult,
  ReferencePointInfo,
  ReplicaDiskRef,
  ReplicaInfo,
  ReplicaRef,
  ReplicaSpec,
  ReplicaView,
  RestorePointInfo,
  RestorePointSpec,
  ShutdownResult,
  ReadOptions,
  SendOptions,
  TransferOptions,
  VmDefinition,
  VmInfo,
  VmRef,
  VmSpec,
  WriteResult,
} from './port';

export interface HostApiClientOptions {
  /** Base URL of the host API server, e.g. https://kvm01:7400 (http:// only on a loopback address). */
  url: string;
  /** For an https:// URL: the site's CA, and the client certificate and key this client presents. */
  tls?: ClientTlsFiles;
  /**
   * For an https:// URL: the name the server's certificate must carry for calls about no one host (the hosts list,
   * backups, the lab's controls): `lab` for the lab, a KVM host's own name for its host process. A call about a host
   * needs that host's name there.
   */
  serverName?: string;
  /** Deadline of a control call (power calls add the guest's own timeout). Default 30 s. */
  timeoutMs?: number;
  /** A block stream that stays silent this long is treated as broken. Default 30 s. */
  idleTimeoutMs?: number;
}

interface RequestSpec {
  method: string;
  path: string;
  /** The host the call is about, for error messages. */
  host?: string;
  query?: Record<string, string | number | undefined>;
  json?: unknown;
  body?: FramedBody;
  onProgress?: (bytes: number) => void;
  timeoutMs?: number;
  signal?: AbortSignal;
}

/** Framed bytes to upload. */
interface FramedBody {
  stream: Readable;
  /** Sent as content-length when known, instead of chunked encoding. */
  length?: number;
  /** The port's error for a failure of `stream`. */
  failure: (e: unknown) => Error;
}

const seg = encodeURIComponent;
/** Deadline of one host-to-host send; callers send at most tens of MiB per call. */
const SEND_TIMEOUT_MS = 10 * 60_000;
/** How often a long host operation that answered 202 (still running) is asked for again. */
const FOLLOW_INTERVAL_MS = 1_000;
/** Added to the control deadline of a power-on, which answers once the guest booted (minutes for some). */
const BOOT_ALLOWANCE_MS = 15 * 60_000;

/**
 * A block stream read from the lab. Iterating it decodes extents; when it is handed straight to
 * one of the lab's write calls, its framed bytes are forwarded as they are (the proxy copies
 * without decoding and re-encoding, like splice).
 */
class HostBlockStream implements AsyncIterable<ExtentData> {
  private claimed = false;

  constructor(
    private readonly transport: HostApiTransport,
    private readonly spec: RequestSpec,
  ) {}

  [Symbol.asyncIterator](): AsyncIterator<ExtentData> {
    this.claim();
    return this.transport.frames(this.spec);
  }

  /** Starts the read; resolves once the lab answered, with the framed bytes as a stream. */
  async raw(): Promise<FramedBody> {
    this.claim();
    return this.transport.openFrames(this.spec);
  }

  private claim(): void {
    if (this.claimed) throw new Error('a lab block stream can be consumed once');
    this.claimed = true;
  }
}

/** Codes of a TLS handshake that failed over who is who (certificates), not over the network. */
const IDENTITY_FAILURES = new Set([
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'CERT_SIGNATURE_FAILURE',
  'CERT_NOT_YET_VALID',
  'CERT_HAS_EXPIRED',
  'CERT_UNTRUSTED',
  'CERT_REJECTED',
  'INVALID_PURPOSE',
  'INVALID_CA',
  'ERR_TLS_CERT_ALTNAME_INVALID',
  // the server refused our certificate, or is no TLS server at all
  'ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED',
  'ERR_SSL_SSLV3_ALERT_BAD_CERTIFICATE',
  'ERR_SSL_SSLV3_ALERT_CERTIFICATE_EXPIRED',
  'ERR_SSL_SSLV3_ALERT_UNSUPPORTED_CERTIFICATE',
  'ERR_SSL_TLSV1_ALERT_UNKNOWN_CA',
  'ERR_SSL_WRONG_VERSION_NUMBER',
]);

/**
 * The client half of mutual TLS: the site's CA, our certificate and key, loaded once into a secure context (the key
 * then lives in no JavaScript object that a log could print).
 */
function clientContext(files: ClientTlsFiles): SecureContext {
  const read = (field: keyof ClientTlsFiles): Buffer => {
    try {
      return field === 'key' ? readPrivateKeyFile(files.key) : readFileSync(files[field]);
    } catch (e) {
      throw new Error(`tls.${field}: ${(e as Error).message}`, { cause: e });
    }
  };
  const ca = read('ca');
  const cert = read('cert');
  const key = read('key');
  try {
    return createSecureContext({ ca, cert, key, minVersion: 'TLSv1.2' });
  } catch (e) {
    throw new Error(`tls: ${files.cert} and ${files.key} do not make a client identity: ${(e as Error).message}`, {
      cause: e,
    });
  } finally {
    key.fill(0);
  }
}

/** HTTP transport shared by the port adapter and the lab control client. */
class HostApiTransport {
  private readonly base: URL;
  private readonly agent: http.Agent;
  private readonly serverName: string | undefined;
  readonly timeoutMs: number;
  private readonly idleTimeoutMs: number;

  constructor(options: HostApiClientOptions) {
    this.base = new URL(options.url);
    this.timeoutMs = options.timeoutMs ?? 30_000;
    this.idleTimeoutMs = options.idleTimeoutMs ?? 30_000;
    this.serverName = options.serverName;
    // Connections are kept alive (block streams run over them one after another), so handshakes stay rare.
    if (this.base.protocol === 'https:') {
      if (!options.tls) throw new Error(`${options.url}: an https:// host API needs tls (CA, certificate and key)`);
      this.agent = new https.Agent({ keepAlive: true, maxSockets: 32, secureContext: clientContext(options.tls) });
    } else if (this.base.protocol === 'http:' && isLoopback(this.base.hostname)) {
      this.agent = new http.Agent({ keepAlive: true, maxSockets: 32 });
    } else throw new Error(`${options.url}: the host API is https://, or http:// on a loopback address only`);
  }

  /**
   * The TLS options of a call: the server must prove, by a subjectAltName of its certificate, that it is the host the
   * call is about (or, for a call about no host, the server this client was made for). Each name also gets its own
   * pooled connections, so a connection checked for one host never carries another host's calls.
   */
  private identity(spec: RequestSpec): https.RequestOptions {
    if (this.base.protocol !== 'https:') return {};
    const expected = spec.host ?? this.serverName;
    if (expected === undefined)
      throw new HostIdentityError(
        `${spec.method} ${spec.path}: no host name to check ${this.base.host}'s certificate against`,
      );
    return {
      servername: expected,
      checkServerIdentity: (_servername: string, cert: PeerCertificate) =>
        sanEntries(cert).some((n) => n.toLowerCase() === expected.toLowerCase())
          ? undefined
          : new HostIdentityError(
              `${this.base.host} is not host ${expected}: its certificate names ${sanEntries(cert).join(', ') || 'no host'}`,
              { host: spec.host },
            ),
    };
  }

  close(): void {
    this.agent.destroy();
  }

  /** Sends a request; resolves with a 2xx response, or throws the mapped HypervisorError. */
  async send(spec: RequestSpec, streaming = false): Promise<http.IncomingMessage> {
    const url = new URL(spec.path, this.base);
    for (const [k, v] of Object.entries(spec.query ?? {})) if (v !== undefined) url.searchParams.set(k, String(v));
    // Streams get an idle timeout only; control calls also get an overall deadline.
    const signals = [spec.signal, streaming ? undefined : AbortSignal.timeout(spec.timeoutMs ?? this.timeoutMs)].filter(
      (s): s is AbortSignal => s !== undefined,
    );
    const signal = signals.length > 0 ? AbortSignal.any(signals) : undefined;
    const what = `${spec.method} ${url.pathname}`;
    let bodyBytes = 0;
    const res = await new Promise<http.IncomingMessage>((resolve, reject) => {
      const headers: Record<string, string> = {};
      let payload: Buffer | undefined;
      if (spec.json !== undefined) {
        payload = Buffer.from(JSON.stringify(spec.json));
        headers['content-type'] = 'application/json';
        headers['content-length'] = String(payload.length);
      } else if (spec.body) {
        headers['content-type'] = 'application/octet-stream';
        if (spec.body.length !== undefined) headers['content-length'] = String(spec.body.length);
      }
      // A control call that legitimately waits (a guest shutdown) is silent until it answers: its own deadline
      // bounds it, not the idle timeout meant for streams.
      const idleMs = streaming ? this.idleTimeoutMs : Math.max(this.idleTimeoutMs, spec.timeoutMs ?? this.timeoutMs);
      const req = (url.protocol === 'https:' ? https : http).request(url, {
        method: spec.method,
        headers,
        agent: this.agent,
        signal,
        timeout: idleMs,
        ...this.identity(spec),
      });
      let settled = false;
      const fail = (err: unknown): void => {
        if (settled) return;
        settled = true;
        reject(this.networkError(err, spec, what, bodyBytes > 0, signal));
      };
      req.on('timeout', () =>
        req.destroy(new HostTimeoutError(`${what}: no answer for ${idleMs} ms`, { host: spec.host })),
      );
      req.on('error', fail);
      req.on('response', (r) => {
        settled = true;
        resolve(r);
      });
      if (spec.body) {
        const { stream, failure } = spec.body;
        // Native piping: no promise per chunk on this hot path (a forwarded block stream).
        stream.on('data', (chunk: Buffer) => {
          bodyBytes += chunk.length;
          spec.onProgress?.(bodyBytes);
        });
        // A failed upload surfaces through the request's 'error' event (or is moot once answered).
        stream.once('error', (e) => {
          if (settled) return;
          req.destroy();
          fail(failure(e));
        });
        stream.pipe(req);
      } else req.end(payload);
    });
    if (res.statusCode !== undefined && res.statusCode >= 400) throw await this.httpError(res, spec, what);
    return res;
  }

  async json<T>(spec: RequestSpec): Promise<T> {
    const res = await this.send(spec);
    const raw = await this.readAll(res, spec, `${spec.method} ${spec.path}`);
    return (raw.length === 0 ? undefined : JSON.parse(raw.toString('utf8'))) as T;
  }

  /**
   * A long host operation (merge, consolidation): the same request again every second while the host answers that
   * it still runs (202). Each request is a short control call; the operation is bounded by the caller (an activity
   * that heartbeats and may be cancelled), not by a deadline of its own.
   */
  async followed<T>(spec: RequestSpec): Promise<T> {
    for (;;) {
      const answer = await this.json<T | HostJobRunning>(spec);
      if (!(typeof answer === 'object' && answer !== null && 'job' in answer)) return answer;
      await sleep(FOLLOW_INTERVAL_MS, undefined, { signal: spec.signal });
    }
  }

  async readAll(res: http.IncomingMessage, spec: RequestSpec, what: string): Promise<Buffer> {
    try {
      const chunks: Buffer[] = [];
      for await (const c of res as AsyncIterable<Buffer>) chunks.push(c);
      return Buffer.concat(chunks);
    } catch (e) {
      throw new TransferInterruptedError(`${what}: answer cut short`, { host: spec.host, cause: e });
    }
  }

  /** Streams frames of an answer; a broken or truncated stream is a TransferInterruptedError. */
  async *frames(spec: RequestSpec): AsyncGenerator<ExtentData> {
    for await (const { offset, data } of decodeFrames(this.rawFrames(spec))) yield { offset, data };
  }

  /** The framed bytes of an answer as they arrive; they are checked by whoever decodes them. */
  async *rawFrames(spec: RequestSpec): AsyncGenerator<Buffer> {
    const body = await this.openFrames(spec);
    try {
      yield* body.stream as AsyncIterable<Buffer>;
    } catch (e) {
      throw body.failure(e);
    } finally {
      body.stream.destroy();
    }
  }

  /** Sends a block read; resolves once the lab answered. Whoever takes the stream destroys it when done. */
  async openFrames(spec: RequestSpec): Promise<FramedBody> {
    const res = await this.send(spec, true);
    const header = res.headers['content-length'];
    const what = `${spec.method} ${spec.path}`;
    return {
      stream: res,
      length: header === undefined ? undefined : Number(header),
      failure: (e) => {
        if (e instanceof HypervisorError) return e;
        if (spec.signal?.aborted) return asError(spec.signal.reason);
        return new TransferInterruptedError(`${what}: block stream broken (${(e as Error).message})`, {
          host: spec.host,
          cause: e,
        });
      },
    };
  }

  private networkError(err: unknown, spec: RequestSpec, what: string, sentBody: boolean, signal?: AbortSignal): Error {
    if (err instanceof HypervisorError) return err;
    if (spec.signal?.aborted) return asError(spec.signal.reason);
    if (signal?.aborted)
      return new HostTimeoutError(`${what}: no answer within ${spec.timeoutMs ?? this.timeoutMs} ms`, {
        host: spec.host,
        cause: err,
      });
    const code = (err as NodeJS.ErrnoException).code ?? '';
    const message = `${what}: ${(err as Error).message}${code ? ` (${code})` : ''}`;
    if (IDENTITY_FAILURES.has(code))
      return new HostIdentityError(`host ${spec.host ?? this.base.host}: TLS refused: ${message}`, {
        host: spec.host,
        cause: err,
      });
    if (sentBody)
      return new TransferInterruptedError(`${message} after part of the upload`, { host: spec.host, cause: err });
    return new HostUnreachableError(`host ${spec.host ?? this.base.host} unreachable: ${message}`, {
      host: spec.host,
      cause: err,
    });
  }

  private async httpError(res: http.IncomingMessage, spec: RequestSpec, what: string): Promise<HypervisorError> {
    const raw = await this.readAll(res, spec, what).catch(() => Buffer.alloc(0));
    const body = parseErrorBody(raw);
    const message = `${what}: ${body.message ?? `HTTP ${res.statusCode}`}`;
    const opts = { host: spec.host };
    const status = res.statusCode ?? 500;
    if (body.code === 'tracking_lost') return new TrackingLostError(message, opts);
    if (body.code === 'transfer_interrupted') return new TransferInterruptedError(message, opts);
    if (body.code === 'host_unreachable') return new HostUnreachableError(message, opts);
    if (status === 404) return new NotFoundError(message, opts);
    if (status === 409) return new ConflictError(message, opts);
    if (status >= 400 && status < 500) return new BadRequestError(message, { ...opts, field: body.field });
    return new HostFailureError(message, opts);
  }
}

/** The caller's abort reason, as an Error (AbortSignal reasons can be anything). */
function asError(reason: unknown): Error {
  return reason instanceof Error ? reason : new Error(String(reason));
}

function parseErrorBody(raw: Buffer): Partial<HostApiErrorBody['error']> {
  try {
    return (JSON.parse(raw.toString('utf8')) as HostApiErrorBody).error ?? {};
  } catch {
    return { message: raw.toString('utf8').slice(0, 200) };
  }
}

function pageQuery(page?: PageRequest): Record<string, string | number | undefined> {
  return { cursor: page?.cursor, limit: page?.limit };
}

function viewQuery(view: ReplicaView): Record<string, string> {
  return 'pointId' in view ? { pointId: view.pointId } : { running: 'true' };
}

export class HostApiHypervisor implements HypervisorPort {
  private readonly t: HostApiTransport;

  constructor(options: HostApiClientOptions) {
    this.t = new HostApiTransport(options);
  }

  /** Releases pooled connections. */
  close(): void {
    this.t.close();
  }

  private vmPath(ref: VmRef): string {
    return `/v1/hosts/${seg(ref.host)}/vms/${seg(ref.vm)}`;
  }

  private replicaPath(ref: ReplicaRef): string {
    return `/v1/hosts/${seg(ref.host)}/replicas/${seg(ref.replica)}`;
  }

  listHosts(o?: CallOptions): Promise<HostInfo[]> {
    return this.t.json({ method: 'GET', path: '/v1/hosts', signal: o?.signal });
  }

  listVms(host: string, o?: CallOptions): Promise<VmInfo[]> {
    return this.t.json({ method: 'GET', path: `/v1/hosts/${seg(host)}/vms`, host, signal: o?.signal });
  }

  getVm(ref: VmRef, o?: CallOptions): Promise<VmInfo> {
    return this.t.json({ method: 'GET', path: this.vmPath(ref), host: ref.host, signal: o?.signal });
  }

  createVm(ref: VmRef, spec: VmSpec, o?: CallOptions): Promise<VmInfo> {
    return this.t.json({ method: 'PUT', path: this.vmPath(ref), host: ref.host, json: spec, signal: o?.signal });
  }

  async getVmDefinition(ref: VmRef, o?: CallOptions): Promise<VmDefinition | null> {
    const answer = await this.t.json<{ definition: VmDefinition | null }>({
      method: 'GET',
      path: `${this.vmPath(ref)}/definition`,
      host: ref.host,
      signal: o?.signal,
    });
    return answer.definition;
  }

  shutdownGuest(ref: VmRef, timeoutMs: number, o?: CallOptions): Promise<ShutdownResult> {
    return this.t.json({
      method: 'POST',
      path: `${this.vmPath(ref)}/power`,
      host: ref.host,
      json: { action: 'shutdown', timeoutMs },
      timeoutMs: this.t.timeoutMs + timeoutMs,
      signal: o?.signal,
    });
  }

  powerOff(ref: VmRef, o?: CallOptions): Promise<PowerResult> {
    return this.power(ref, { action: 'off' }, this.t.timeoutMs, o);
  }

  powerOn(ref: VmRef, o?: PowerOnOptions): Promise<PowerResult> {
    const body = { action: 'on' as const, ...(o?.sourceOff ? { sourceOff: true as const } : {}) };
    return this.power(ref, body, this.t.timeoutMs + BOOT_ALLOWANCE_MS, o);
  }

  private power(
    ref: VmRef,
    body: { action: 'on' | 'off'; sourceOff?: true },
    timeoutMs: number,
    o?: CallOptions,
  ): Promise<PowerResult> {
    return this.t.json({
      method: 'POST',
      path: `${this.vmPath(ref)}/power`,
      host: ref.host,
      json: body,
      timeoutMs,
      signal: o?.signal,
    });
  }

  createCheckpoint(ref: VmRef, checkpointId: string, o?: CallOptions): Promise<CheckpointInfo> {
    return this.t.json({
      method: 'PUT',
      path: `${this.vmPath(ref)}/checkpoints/${seg(checkpointId)}`,
      host: ref.host,
      signal: o?.signal,
    });
  }

  async deleteCheckpoint(ref: VmRef, checkpointId: string, o?: CallOptions): Promise<void> {
    await this.t.json({
      method: 'DELETE',
      path: `${this.vmPath(ref)}/checkpoints/${seg(checkpointId)}`,
      host: ref.host,
      signal: o?.signal,
    });
  }

  createReferencePoint(
    ref: VmRef,
    referencePointId: string,
    checkpointId: string,
    o?: CallOptions,
  ): Promise<ReferencePointInfo> {
    return this.t.json({
      method: 'PUT',
      path: `${this.vmPath(ref)}/reference-points/${seg(referencePointId)}`,
      host: ref.host,
      json: { checkpointId },
      signal: o?.signal,
    });
  }

  listReferencePoints(ref: VmRef, o?: CallOptions): Promise<ReferencePointInfo[]> {
    return this.t.json({
      method: 'GET',
      path: `${this.vmPath(ref)}/reference-points`,
      host: ref.host,
      signal: o?.signal,
    });
  }

  async deleteReferencePoint(ref: VmRef, referencePointId: string, o?: CallOptions): Promise<void> {
    await this.t.json({
      method: 'DELETE',
      path: `${this.vmPath(ref)}/reference-points/${seg(referencePointId)}`,
      host: ref.host,
      signal: o?.signal,
    });
  }

  listChangedExtents(
    ref: DiskRef,
    range: { referencePointId: string; checkpointId: string },
    page?: PageRequest,
    o?: CallOptions,
  ): Promise<ExtentPage> {
    return this.t.json({
      method: 'GET',
      path: `${this.vmPath(ref)}/disks/${seg(ref.disk)}/changes`,
      host: ref.host,
      query: { ...range, ...pageQuery(page) },
      signal: o?.signal,
    });
  }

  listAllocatedExtents(ref: DiskRef, checkpointId: string, page?: PageRequest, o?: CallOptions): Promise<ExtentPage> {
    return this.t.json({
      method: 'GET',
      path: `${this.vmPath(ref)}/disks/${seg(ref.disk)}/allocated`,
      host: ref.host,
      query: { checkpointId, ...pageQuery(page) },
      signal: o?.signal,
    });
  }

  blockDigests(ref: DiskRef, checkpointId: string, range: BlockRange, o?: CallOptions): Promise<BlockDigests> {
    return this.t.json({
      method: 'GET',
      path: `${this.vmPath(ref)}/disks/${seg(ref.disk)}/digests`,
      host: ref.host,
      query: { checkpointId, ...range },
      signal: o?.signal,
    });
  }

  readExtents(ref: DiskRef, checkpointId: string, extents: Extent[], o?: ReadOptions): AsyncIterable<ExtentData> {
    return new HostBlockStream(this.t, {
      method: 'POST',
      path: `${this.vmPath(ref)}/disks/${seg(ref.disk)}/read`,
      host: ref.host,
      json: { checkpointId, extents, ...(o?.digests ? { digests: true } : {}) },
      signal: o?.signal,
    });
  }

  readCanary(ref: VmRef, checkpointId: string, o?: CallOptions): Promise<CanaryReading> {
    return this.t.json({
      method: 'GET',
      path: `${this.vmPath(ref)}/canary`,
      host: ref.host,
      query: { checkpointId },
      signal: o?.signal,
    });
  }

  async writeExtents(ref: DiskRef, data: AsyncIterable<ExtentData>, o?: FencedTransferOptions): Promise<WriteResult> {
    return this.uploadJson(`${this.vmPath(ref)}/disks/${seg(ref.disk)}/write`, ref.host, data, o, {
      fence: o?.fence,
    });
  }

  async fenceWrites(ref: VmRef, token: string, o?: CallOptions): Promise<void> {
    await this.t.json({
      method: 'PUT',
      path: `${this.vmPath(ref)}/write-fence`,
      host: ref.host,
      json: { token },
      signal: o?.signal,
    });
  }

  createReplica(ref: ReplicaRef, spec: ReplicaSpec, o?: CallOptions): Promise<ReplicaInfo> {
    return this.t.json({ method: 'PUT', path: this.replicaPath(ref), host: ref.host, json: spec, signal: o?.signal });
  }

  getReplica(ref: ReplicaRef, o?: CallOptions): Promise<ReplicaInfo> {
    return this.t.json({ method: 'GET', path: this.replicaPath(ref), host: ref.host, signal: o?.signal });
  }

  beginRestorePoint(
    ref: ReplicaRef,
    pointId: string,
    spec: RestorePointSpec,
    o?: CallOptions,
  ): Promise<RestorePointInfo> {
    return this.t.json({
      method: 'PUT',
      path: `${this.replicaPath(ref)}/points/${seg(pointId)}`,
      host: ref.host,
      json: spec,
      signal: o?.signal,
    });
  }

  writeRestorePoint(
    ref: ReplicaDiskRef,
    pointId: string,
    data: AsyncIterable<ExtentData>,
    o?: TransferOptions,
  ): Promise<WriteResult> {
    return this.uploadJson(
      `${this.replicaPath(ref)}/points/${seg(pointId)}/disks/${seg(ref.disk)}/write`,
      ref.host,
      data,
      o,
    );
  }

  async sendToRestorePoint(
    source: DiskRef & { checkpointId: string },
    target: ReplicaDiskRef & { pointId: string },
    extents: Extent[],
    o?: SendOptions,
  ): Promise<WriteResult> {
    const result = await this.t.json<WriteResult>({
      method: 'POST',
      path: `${this.vmPath(source)}/disks/${seg(source.disk)}/send`,
      host: source.host,
      json: {
        checkpointId: source.checkpointId,
        extents,
        target: { host: target.host, replica: target.replica, pointId: target.pointId, disk: target.disk },
        ...(o?.verify ? { verify: true } : {}),
      },
      // The answer comes when the blocks are on the DR host: allow for slow storage, not only a round trip.
      timeoutMs: SEND_TIMEOUT_MS,
      signal: o?.signal,
    });
    o?.onProgress?.(result.bytesWritten);
    return result;
  }

  sealRestorePoint(
    ref: ReplicaRef,
    pointId: string,
    seal?: { metadata?: Record<string, string> },
    o?: CallOptions,
  ): Promise<RestorePointInfo> {
    return this.t.json({
      method: 'POST',
      path: `${this.replicaPath(ref)}/points/${seg(pointId)}/seal`,
      host: ref.host,
      json: { metadata: seal?.metadata },
      signal: o?.signal,
    });
  }

  async discardRestorePoint(ref: ReplicaRef, pointId: string, o?: CallOptions): Promise<void> {
    await this.t.json({
      method: 'DELETE',
      path: `${this.replicaPath(ref)}/points/${seg(pointId)}`,
      host: ref.host,
      signal: o?.signal,
    });
  }

  listRestorePoints(ref: ReplicaRef, o?: CallOptions): Promise<RestorePointInfo[]> {
    return this.t.json({ method: 'GET', path: `${this.replicaPath(ref)}/points`, host: ref.host, signal: o?.signal });
  }

  revertReplica(ref: ReplicaRef, pointId: string, o?: CallOptions): Promise<ReplicaInfo> {
    return this.t.json({
      method: 'POST',
      path: `${this.replicaPath(ref)}/revert`,
      host: ref.host,
      json: { pointId },
      signal: o?.signal,
    });
  }

  mergeOldestRestorePoint(ref: ReplicaRef, pointId: string, o?: CallOptions): Promise<ReplicaInfo> {
    return this.t.followed({
      method: 'POST',
      path: `${this.replicaPath(ref)}/points/${seg(pointId)}/merge`,
      host: ref.host,
      signal: o?.signal,
    });
  }

  consolidateReplica(ref: ReplicaRef, o?: CallOptions): Promise<ReplicaInfo> {
    return this.t.followed({
      method: 'POST',
      path: `${this.replicaPath(ref)}/consolidate`,
      host: ref.host,
      signal: o?.signal,
    });
  }

  discardRunningLayer(ref: ReplicaRef, o?: CallOptions): Promise<ReplicaInfo> {
    return this.t.json({
      method: 'DELETE',
      path: `${this.replicaPath(ref)}/running-layer`,
      host: ref.host,
      signal: o?.signal,
    });
  }

  sealRunningLayer(
    ref: ReplicaRef,
    pointId: string,
    spec: RestorePointSpec,
    o?: CallOptions,
  ): Promise<RestorePointInfo> {
    return this.t.json({
      method: 'POST',
      path: `${this.replicaPath(ref)}/running-layer/seal`,
      host: ref.host,
      json: { pointId, ...spec },
      signal: o?.signal,
    });
  }

  listReplicaAllocatedExtents(
    ref: ReplicaDiskRef,
    view: ReplicaView,
    page?: PageRequest,
    o?: CallOptions,
  ): Promise<ExtentPage> {
    return this.t.json({
      method: 'GET',
      path: `${this.replicaPath(ref)}/disks/${seg(ref.disk)}/allocated`,
      host: ref.host,
      query: { ...viewQuery(view), ...pageQuery(page) },
      signal: o?.signal,
    });
  }

  listRunningLayerExtents(ref: ReplicaDiskRef, page?: PageRequest, o?: CallOptions): Promise<ExtentPage> {
    return this.t.json({
      method: 'GET',
      path: `${this.replicaPath(ref)}/disks/${seg(ref.disk)}/running-extents`,
      host: ref.host,
      query: pageQuery(page),
      signal: o?.signal,
    });
  }

  listRestorePointExtents(
    ref: ReplicaDiskRef,
    pointId: string,
    page?: PageRequest,
    o?: CallOptions,
  ): Promise<ExtentPage> {
    return this.t.json({
      method: 'GET',
      path: `${this.replicaPath(ref)}/points/${seg(pointId)}/disks/${seg(ref.disk)}/extents`,
      host: ref.host,
      query: pageQuery(page),
      signal: o?.signal,
    });
  }

  readReplicaExtents(
    ref: ReplicaDiskRef,
    view: ReplicaView,
    extents: Extent[],
    o?: CallOptions,
  ): AsyncIterable<ExtentData> {
    return new HostBlockStream(this.t, {
      method: 'POST',
      path: `${this.replicaPath(ref)}/disks/${seg(ref.disk)}/read`,
      host: ref.host,
      json: { view, extents },
      signal: o?.signal,
    });
  }

  replicaBlockDigests(
    ref: ReplicaDiskRef,
    view: ReplicaView,
    range: BlockRange,
    o?: CallOptions,
  ): Promise<BlockDigests> {
    return this.t.json({
      method: 'GET',
      path: `${this.replicaPath(ref)}/disks/${seg(ref.disk)}/digests`,
      host: ref.host,
      query: { ...viewQuery(view), ...range },
      signal: o?.signal,
    });
  }

  readReplicaCanary(ref: ReplicaRef, view: ReplicaView, o?: CallOptions): Promise<CanaryReading> {
    return this.t.json({
      method: 'GET',
      path: `${this.replicaPath(ref)}/canary`,
      host: ref.host,
      query: viewQuery(view),
      signal: o?.signal,
    });
  }

  listBackups(vm: string, o?: CallOptions): Promise<BackupPointInfo[]> {
    return this.t.json({ method: 'GET', path: '/v1/backups', query: { vm }, signal: o?.signal });
  }

  listBackupExtents(ref: BackupRef, page?: PageRequest, o?: CallOptions): Promise<ExtentPage> {
    return this.t.json({
      method: 'GET',
      path: `/v1/backups/${seg(ref.backupId)}/disks/${seg(ref.disk)}/extents`,
      query: pageQuery(page),
      signal: o?.signal,
    });
  }

  readBackupExtents(ref: BackupRef, extents: Extent[], o?: CallOptions): AsyncIterable<ExtentData> {
    return new HostBlockStream(this.t, {
      method: 'POST',
      path: `/v1/backups/${seg(ref.backupId)}/disks/${seg(ref.disk)}/read`,
      json: { extents },
      signal: o?.signal,
    });
  }

  private async uploadJson(
    path: string,
    host: string,
    data: AsyncIterable<ExtentData>,
    o?: TransferOptions,
    query?: RequestSpec['query'],
  ): Promise<WriteResult> {
    // A lab block stream is forwarded as framed bytes; anything else is framed here.
    const body: FramedBody =
      data instanceof HostBlockStream
        ? await data.raw()
        : { stream: Readable.from(encodeFrames(data)), failure: (e) => asError(e) };
    try {
      const res = await this.t.send(
        { method: 'POST', path, host, query, body, signal: o?.signal, onProgress: o?.onProgress },
        true,
      );
      const raw = await this.t.readAll(res, { method: 'POST', path, host }, `POST ${path}`);
      return JSON.parse(raw.toString('utf8')) as WriteResult;
    } finally {
      // Stops a source the upload no longer takes (the lab refused it, or the upload broke).
      body.stream.destroy();
    }
  }
}

/**
 * Which calls of its host a fault hits: all, or those of `method` and/or `path`, a regular expression tested
 * against the decoded URL path (e.g. `/vms/r1/power$`). Faults of one kind with different scopes add up.
 */
export interface LabFaultScope {
  method?: 'GET' | 'PUT' | 'POST' | 'DELETE';
  path?: string;
  durationMs?: number;
}

/** The lab's own controls for tests, the demo and benchmarks; deliberately not part of the port. */
export type LabFault = LabFaultScope &
  (
    | { kind: 'unreachable' }
    /** 5xx (default 503): retried by callers; 409: a final refusal. */
    | { kind: 'fail'; status?: number }
    | { kind: 'slow'; latencyMs: number }
    | { kind: 'cut'; afterBytes: number }
  );

export class LabControl {
  private readonly t: HostApiTransport;

  constructor(options: HostApiClientOptions) {
    this.t = new HostApiTransport(options);
  }

  close(): void {
    this.t.close();
  }

  /** Adds a fault to the host (replacing one of the same kind and scope). */
  async setFault(host: string, fault: LabFault): Promise<void> {
    await this.t.json({ method: 'PUT', path: `/v1/lab/faults/${seg(host)}`, json: fault });
  }

  async clearFaults(host: string, kind?: LabFault['kind']): Promise<void> {
    await this.t.json({ method: 'DELETE', path: `/v1/lab/faults/${seg(host)}`, query: { kind } });
  }

  /** Makes the VM's running guest write these blocks now; returns its last sequence number. */
  async guestWrite(vm: string, disk: string, blocks: number[]): Promise<number> {
    const r = await this.t.json<{ sequence: number }>({
      method: 'POST',
      path: `/v1/lab/vms/${seg(vm)}/guest-writes`,
      json: { disk, blocks },
    });
    return r.sequence;
  }

  /** The block as the VM sees it now (source disk, or a replica's running state). */
  async readBlock(vm: string, disk: string, block: number): Promise<Buffer> {
    const path = `/v1/lab/vms/${seg(vm)}/disks/${seg(disk)}/blocks/${block}`;
    const res = await this.t.send({ method: 'GET', path });
    return this.t.readAll(res, { method: 'GET', path }, `GET ${path}`);
  }

  /**
   * Overwrites one block of the base of a VM, or of one restore point of a replica, with a pattern no guest
   * writes (corruptBlockContent in lab/guest.ts), bypassing tracking, seals and fences: a storage fault for tests
   * of the verification.
   */
  async corruptBlock(vm: string, disk: string, block: number, layer: 'base' | { pointId: string }): Promise<void> {
    await this.t.json({
      method: 'POST',
      path: `/v1/lab/vms/${seg(vm)}/disks/${seg(disk)}/blocks/${block}/corrupt`,
      json: { layer },
    });
  }

  takeBackup(vm: string): Promise<BackupPointInfo> {
    return this.t.json({ method: 'POST', path: `/v1/lab/vms/${seg(vm)}/backups` });
  }

  /** `storeFailure`: why the lab refuses changes until it is restarted (its metadata could not be saved). */
  status(): Promise<{ generation: number; trackingLostAtStart: boolean; storeFailure: string | null }> {
    return this.t.json({ method: 'GET', path: '/v1/lab/status' });
  }
}
