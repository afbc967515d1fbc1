// The server half of the host API that the lab and the KVM host process share: one Fastify set-up (mutual TLS,
// limits, error bodies, unknown routes) and the framed block streams in both directions.

import { readFileSync } from 'node:fs';
import type { ServerResponse } from 'node:http';
import type { ServerOptions as HttpsServerOptions } from 'node:https';
import type { AddressInfo } from 'node:net';
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import { BLOCK_SIZE, type Extent, type ExtentData } from '../hypervisor/port';
import { readPrivateKeyFile, type ServerTlsFiles } from './certificates';
import { badRequest, HostApiError } from './errors';
import { DIGEST_BYTES } from './digests';
import { encodeFrames, FrameError, FrameReader, framedLength, type DigestsFrame, type FramePiece } from './frames';
import { isLoopback } from './loopback';

/**
 * How a host API server is reached: mutual TLS (its certificate and key, and the CA whose client certificates it
 * accepts), or plain HTTP for development, on a loopback address only.
 */
export interface HostApiTransportSecurity {
  tls?: ServerTlsFiles;
  /** Plain HTTP instead, for development: refused unless the server listens on a loopback address. */
  insecureHttp?: boolean;
}

/**
 * Checks how a host API server is to be reached, before it starts anything: the TLS files read (its key refused if
 * group or others may read it), or plain HTTP refused on any address but loopback. Returns the HTTPS options, or
 * null for plain HTTP.
 */
export function hostApiHttps(security: HostApiTransportSecurity, listen: string): HttpsServerOptions | null {
  if (security.tls && security.insecureHttp) throw new Error('the host API takes TLS files or plain HTTP, not both');
  if (!security.tls && !security.insecureHttp)
    throw new Error('the host API needs its TLS certificate, key and client CA (or plain HTTP for development)');
  if (!security.tls) {
    if (!isLoopback(listen))
      throw new Error(
        `plain HTTP is for development on a loopback address only, not on ${listen}: ` +
          'give the host API its certificate, key and client CA (mutual TLS)',
      );
    return null;
  }
  const { tls } = security;
  const read = (what: string, path: string): Buffer => {
    try {
      return what === 'key' ? readPrivateKeyFile(path) : readFileSync(path);
    } catch (e) {
      throw new Error(`host API TLS ${what} ${path}: ${(e as Error).message}`, { cause: e });
    }
  };
  return {
    key: read('key', tls.key),
    cert: read('certificate', tls.cert),
    ca: read('client CA', tls.clientCa),
    // Every caller presents a certificate of the site's CA made for clients; anyone else gets a failed handshake,
    // before a byte of HTTP is read.
    requestCert: true,
    rejectUnauthorized: true,
    minVersion: 'TLSv1.2',
    // Block data crosses these connections: AES-128-GCM first (the cheapest of the strong suites where the CPU has
    // AES instructions), then the others; TLS 1.2 only with ECDHE and the site's ECDSA keys.
    ciphers: [
      'TLS_AES_128_GCM_SHA256',
      'TLS_AES_256_GCM_SHA384',
      'TLS_CHACHA20_POLY1305_SHA256',
      'ECDHE-ECDSA-AES128-GCM-SHA256',
      'ECDHE-ECDSA-AES256-GCM-SHA384',
      'ECDHE-ECDSA-CHACHA20-POLY1305',
    ].join(':'),
    honorCipherOrder: true,
  };
}

/**
 * A Fastify instance that answers the host API's way: JSON error bodies with a code and, for 400, the field; over
 * mutual TLS with `https` (from hostApiHttps), else plain HTTP.
 */
export function hostApiServer(options: {
  log: (message: string) => void;
  https: HttpsServerOptions | null;
}): FastifyInstance {
  // JSON control bodies are small (the longest, a batch's extent list, a few hundred KiB); block data comes as
  // streams, which this limit does not apply to.
  // A path parameter may be a whole identifier (128 characters, schemas.ts), and a replica's name is longer than its
  // VM's: Fastify's default of 100 would refuse it before our schemas could name the field.
  const app = Fastify({
    bodyLimit: 4 * 1024 * 1024,
    keepAliveTimeout: 30_000,
    routerOptions: { maxParamLength: 256 },
    ...(options.https ? { https: options.https } : {}),
    // Typed as the plain HTTP instance its callers know: the routes and the server's common surface are the same.
  }) as unknown as FastifyInstance;
  app.addContentTypeParser('application/octet-stream', (_req, _payload, done) => done(null, undefined));
  app.setNotFoundHandler((request, reply) =>
    reply.code(404).send({
      error: { code: 'not_found', message: `no such endpoint: ${request.method} ${request.url.split('?')[0]}` },
    }),
  );
  app.setErrorHandler(async (error, request, reply) => {
    // An upload refused part-way has a body still arriving: it is read to its end (for a while) so that the client
    // gets this answer rather than a broken pipe, and the connection is not kept half-read.
    if (!request.raw.complete) {
      await drain(request.raw, DRAIN_MS);
      void reply.header('connection', 'close');
    }
    if (error instanceof HostApiError) {
      return reply.code(error.status).send({ error: { code: error.code, message: error.message, field: error.field } });
    }
    const e = error as { statusCode?: number; message?: string };
    if (e.statusCode && e.statusCode < 500)
      return reply
        .code(e.statusCode)
        .send({ error: { code: 'bad_request', message: e.message ?? 'bad request', field: 'body' } });
    options.log(`internal error: ${String(error)}`);
    return reply.code(500).send({ error: { code: 'internal', message: String(e.message ?? error) } });
  });
  return app;
}

/** Listens and returns the server's URL; plain HTTP says so in one line, as it is for development only. */
export async function listenHostApi(
  app: FastifyInstance,
  at: { host: string; port: number },
  log: (message: string) => void,
): Promise<string> {
  await app.listen({ port: at.port, host: at.host });
  const { port } = app.server.address() as AddressInfo;
  const host = at.host.includes(':') ? `[${at.host}]` : at.host;
  if (app.initialConfig.https) return `https://${host}:${port}`;
  log(`INSECURE: plain HTTP on ${host}:${port}, for development only`);
  return `http://${host}:${port}`;
}

/** How long a refused upload's remaining body is read and dropped before the connection closes anyway. */
const DRAIN_MS = 2_000;

/** Reads and drops what is left of a request body; resolves at its end, when it breaks, or after `ms`. */
function drain(body: FastifyRequest['raw'], ms: number): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      body.off('end', done).off('close', done).off('error', done);
      resolve();
    }
    body.on('end', done).on('close', done).on('error', done);
    body.resume();
  });
}

/** Resolves once everything written so far left for the socket; rejects if the connection closed. */
function drained(res: ServerResponse): Promise<void> {
  return new Promise((resolve, reject) => {
    const done = (error?: Error) => {
      res.off('drain', onDrain);
      res.off('close', onClose);
      if (error) reject(error);
      else resolve();
    };
    const onDrain = () => done();
    const onClose = () => done(new Error('connection closed'));
    res.on('drain', onDrain);
    res.on('close', onClose);
  });
}

/**
 * Streams the frames of `pieces` with an exact content-length (`length`, from framedLength of the same pieces).
 * Each piece is flushed before the next is taken, which lets a reader reuse its buffers. `cutAfter` (the lab's
 * fault injection) breaks the connection after that many bytes. A failed read ends the stream short, which the
 * client's decoder reports as an interrupted transfer.
 */
export async function streamFrames(
  request: FastifyRequest,
  reply: FastifyReply,
  layout: { pieces: Iterable<Extent>; digests?: boolean },
  pieces: () => AsyncIterable<ExtentData>,
  cutAfter?: number,
): Promise<void> {
  reply.hijack();
  const res = reply.raw;
  const framing = { digests: layout.digests ?? false };
  res.writeHead(200, {
    'content-type': 'application/octet-stream',
    'content-length': framedLength(layout.pieces, framing),
  });
  let sent = 0;
  try {
    for await (const chunk of encodeFrames(pieces(), framing)) {
      const cut = cutAfter !== undefined && sent + chunk.length > cutAfter;
      const piece = cut ? chunk.subarray(0, cutAfter - sent) : chunk;
      if (!res.write(piece)) await drained(res);
      sent += piece.length;
      if (cut) {
        // Give the partial bytes a moment to leave before the connection drops.
        await new Promise((r) => setTimeout(r, 20));
        request.raw.socket.destroy();
        return;
      }
    }
    res.end();
  } catch {
    res.destroy();
  }
}

/** Bytes gathered into one write: slices of the received chunks, written with one writev. */
const WRITE_PIECE_BYTES = 4 * 1024 * 1024;
/** Writes queued while the next piece arrives; beyond this the upload waits (backpressure). */
const WRITES_IN_FLIGHT = 3;

export interface ReceiveOptions {
  /** The lab's fault injection: the connection breaks after that many bytes. */
  cutAfter?: number | undefined;
  /**
   * An upload that sends nothing for this long is cut off (its writes stop, and whatever it holds is let go): a
   * sender behind a network partition would otherwise hold it for as long as TCP keeps the connection.
   */
  stallMs?: number | undefined;
  /** Takes the DIGESTS frames the upload carries (checked to lie within the disk); without it they are refused. */
  onDigests?: ((frame: DigestsFrame) => void) | undefined;
}

/**
 * Writes the frames of an upload as they arrive, straight from the received chunks (no copy), and returns the
 * bytes written.
 */
export async function receiveFrames(
  request: FastifyRequest,
  sizeBytes: number,
  write: (piece: FramePiece) => Promise<void>,
  { cutAfter, stallMs, onDigests }: ReceiveOptions = {},
): Promise<number> {
  // A malformed frame is answered once the body has arrived: leaving the loop early would destroy the request,
  // and its sender would get a broken pipe (retried as an interrupted transfer) instead of the 400.
  let malformed: HostApiError | undefined;
  const reader = new FrameReader(
    WRITE_PIECE_BYTES,
    onDigests &&
      ((d) => {
        const end = d.offset + (d.digests.length / DIGEST_BYTES) * BLOCK_SIZE;
        if (d.offset % BLOCK_SIZE !== 0 || end > sizeBytes)
          malformed ??= badRequest(`frames.${d.frame}.digests`, `the digests' blocks must lie within the disk`);
        else onDigests(d);
      }),
  );
  const inFlight: { piece: FramePiece; done: Promise<void> }[] = [];
  let received = 0;
  let bytes = 0;
  let stall: NodeJS.Timeout | undefined;
  const watch = () => {
    if (stallMs === undefined) return;
    clearTimeout(stall);
    stall = setTimeout(
      () => request.raw.destroy(new FrameError(`the upload sent nothing for ${stallMs} ms: cut off`)),
      stallMs,
    );
  };
  watch();
  try {
    for await (const chunk of request.raw as AsyncIterable<Buffer>) {
      watch();
      if (malformed) continue;
      received += chunk.length;
      if (cutAfter !== undefined && received > cutAfter) {
        request.raw.socket.destroy();
        throw new FrameError('transfer cut by fault injection');
      }
      for (const piece of reader.push(chunk)) {
        const field = `frames.${piece.frame}.offset`;
        if (piece.offset % BLOCK_SIZE !== 0 || piece.length % BLOCK_SIZE !== 0)
          malformed = badRequest(field, `offset and length must be multiples of ${BLOCK_SIZE}`);
        else if (piece.offset + piece.length > sizeBytes)
          malformed = badRequest(field, `extent ends past the disk size ${sizeBytes}`);
        if (malformed) break;
        // Writes in flight may land in any order: one that overlaps them waits, so the last one wins.
        const overlaps = inFlight.some(
          (w) => piece.offset < w.piece.offset + w.piece.length && w.piece.offset < piece.offset + piece.length,
        );
        while (inFlight.length > 0 && (overlaps || inFlight.length >= WRITES_IN_FLIGHT)) await inFlight.shift()!.done;
        const done = write(piece);
        done.catch(() => undefined); // awaited in turn; this only keeps it from counting as unhandled
        inFlight.push({ piece, done });
        bytes += piece.length;
      }
    }
    if (malformed) throw malformed;
    reader.end();
    while (inFlight.length > 0) await inFlight.shift()!.done;
  } catch (e) {
    await Promise.allSettled(inFlight.map((w) => w.done));
    if (e instanceof FrameError) throw badRequest('body', e.message);
    throw e;
  } finally {
    clearTimeout(stall);
  }
  return bytes;
}
