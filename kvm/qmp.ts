// A client for QMP, the QEMU Machine Protocol: newline-delimited JSON over a unix socket. QEMU sends a greeting,
// the client leaves capabilities negotiation with qmp_capabilities, then sends commands tagged with an id; replies
// carry the id back, and asynchronous events arrive in between. A QMP socket serves one client at a time, so keep
// one long-lived client per QEMU process and share it.
import net from 'node:net';

export interface QmpGreeting {
  QMP: {
    version: { qemu: { major: number; minor: number; micro: number }; package: string };
    capabilities: string[];
  };
}

export interface QmpEvent<D = Record<string, unknown>> {
  event: string;
  data: D;
  timestamp: { seconds: number; microseconds: number };
}

/** Events this project waits for; any other name is accepted as well. */
export type QmpEventName =
  | 'SHUTDOWN'
  | 'POWERDOWN'
  | 'STOP'
  | 'RESUME'
  | 'BLOCK_JOB_COMPLETED'
  | 'BLOCK_JOB_CANCELLED'
  | 'BLOCK_JOB_ERROR'
  | 'BLOCK_JOB_READY'
  | 'JOB_STATUS_CHANGE'
  | 'BLOCK_EXPORT_DELETED'
  | 'DEVICE_DELETED'
  | (string & Record<never, never>);

/** One action of a QMP `transaction`: a command name among those QEMU allows there, and its arguments. */
export interface QmpTransactionAction {
  type: string;
  data: Record<string, unknown>;
}

// Result shapes of the commands used here, with the fields this project reads (QEMU sends more).
export interface QmpStatusInfo {
  running: boolean;
  status: string;
}

export interface QmpBlockExportInfo {
  id: string;
  type: string;
  'node-name': string;
  'shutting-down': boolean;
}

export interface QmpDirtyBitmapInfo {
  name?: string;
  count: number;
  granularity: number;
  recording: boolean;
  busy: boolean;
  persistent: boolean;
  inconsistent?: boolean;
}

export interface QmpBlockDeviceInfo {
  'node-name': string;
  drv: string;
  file: string;
  ro: boolean;
  backing_file_depth: number;
  image: { filename: string; format: string; 'virtual-size': number; 'backing-filename'?: string };
  'dirty-bitmaps'?: QmpDirtyBitmapInfo[];
}

export interface QmpJobInfo {
  id: string;
  type: string;
  status: string;
  'current-progress': number;
  'total-progress': number;
  error?: string;
}

/** QEMU refused or failed a command. */
export class QmpError extends Error {
  override readonly name = 'QmpError';

  constructor(
    readonly command: string,
    /** The QMP error class, e.g. GenericError, CommandNotFound, DeviceNotFound. */
    readonly errorClass: string,
    readonly desc: string,
  ) {
    super(`QMP ${command} failed: ${errorClass}: ${desc}`);
  }
}

/** The connection could not be set up, or it ended before a command's reply (or an awaited event) arrived. */
export class QmpConnectionError extends Error {
  override readonly name = 'QmpConnectionError';

  constructor(
    message: string,
    readonly socketPath: string,
    readonly command?: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/** A command or an event wait passed its timeout; the connection itself is still usable. */
export class QmpTimeoutError extends Error {
  override readonly name = 'QmpTimeoutError';
}

export interface QmpConnectOptions {
  /**
   * Keep retrying while the socket is missing or refuses connections (QEMU is still starting), for up to this
   * long. Default 0: one attempt.
   */
  retryForMs?: number;
  /** Limit for the greeting and capabilities negotiation once connected. Default 10 s. */
  handshakeTimeoutMs?: number;
  signal?: AbortSignal;
}

export interface QmpWaitOptions {
  signal?: AbortSignal;
  timeoutMs?: number;
}

interface Pending {
  command: string;
  // Still in `pending` after a timeout or abort: QEMU answers in order, and replies without an id (to requests it
  // could not parse) are matched to the oldest entry, so every request keeps its place until QEMU answers it.
  settled: boolean;
  resolve(value: unknown): void;
  reject(error: Error): void;
}

interface EventWaiter {
  reject(error: Error): void;
}

type Listener = (event: QmpEvent) => void;

const retryableConnectErrors = new Set(['ENOENT', 'ECONNREFUSED', 'EAGAIN']);

export class QmpClient {
  private readonly pending = new Map<string, Pending>();
  private readonly listeners = new Map<string, Set<Listener>>();
  private readonly waiters = new Set<EventWaiter>();
  private nextId = 1;
  private buffer = '';
  private socketError: Error | undefined;
  private protocolFailure: string | undefined;
  private closing = false;
  private endedWith: QmpConnectionError | undefined;
  private greetingResult: QmpGreeting | undefined;
  private onGreeting: ((greeting: QmpGreeting) => void) | undefined;
  private resolveClosed!: (reason: QmpConnectionError) => void;

  /** Resolves (never rejects) once the connection has ended, with the reason. */
  readonly closed: Promise<QmpConnectionError>;

  private constructor(
    private readonly socket: net.Socket,
    readonly socketPath: string,
  ) {
    this.closed = new Promise((resolve) => (this.resolveClosed = resolve));
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.receive(chunk));
    socket.on('error', (err) => (this.socketError ??= err));
    socket.on('close', () => this.ended());
  }

  /** Connects, reads the greeting and negotiates capabilities. */
  static async connect(socketPath: string, options: QmpConnectOptions = {}): Promise<QmpClient> {
    const socket = await connectSocket(socketPath, options.retryForMs ?? 0, options.signal);
    const client = new QmpClient(socket, socketPath);
    const timeoutMs = options.handshakeTimeoutMs ?? 10_000;
    try {
      await client.handshake(timeoutMs, options.signal);
      return client;
    } catch (err) {
      client.socket.destroy();
      throw err;
    }
  }

  /** The greeting QEMU sent: its version and the capabilities it offers. */
  get greeting(): QmpGreeting {
    if (!this.greetingResult) throw new Error('QMP greeting not received yet');
    return this.greetingResult;
  }

  get isClosed(): boolean {
    return this.endedWith !== undefined;
  }

  /**
   * Runs a command and resolves with its `return` value (typed by the caller: QEMU's result shapes are not checked).
   * Rejects with QmpError when QEMU reports an error, QmpConnectionError when the connection ends first, and
   * QmpTimeoutError or the signal's reason on a timeout or abort.
   */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, options: QmpWaitOptions = {}): Promise<T> {
    if (this.endedWith) {
      return Promise.reject(
        new QmpConnectionError(`QMP ${command} not sent: ${this.endedWith.message}`, this.socketPath, command, {
          cause: this.endedWith,
        }),
      );
    }
    const { signal, timeoutMs } = options;
    if (signal?.aborted) return Promise.reject(abortReason(signal));
    const id = `pf-${this.nextId++}`;
    return new Promise<T>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const onAbort = () => settle(() => reject(abortReason(signal)));
      const settle = (finish: () => void) => {
        if (entry.settled) return;
        entry.settled = true;
        clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
        finish();
      };
      const entry: Pending = {
        command,
        settled: false,
        resolve: (value) => settle(() => resolve(value as T)),
        reject: (error) => settle(() => reject(error)),
      };
      if (timeoutMs !== undefined) {
        timer = setTimeout(
          () => settle(() => reject(new QmpTimeoutError(`QMP ${command} got no reply within ${timeoutMs} ms`))),
          timeoutMs,
        );
      }
      signal?.addEventListener('abort', onAbort, { once: true });
      this.pending.set(id, entry);
      const request = args === undefined ? { execute: command, id } : { execute: command, arguments: args, id };
      this.socket.write(`${JSON.stringify(request)}\n`);
    });
  }

  /**
   * Runs actions atomically: all take effect or none (with the default completion mode). An action's failure
   * rejects with a QmpError for `transaction` whose desc says which one failed.
   */
  async transaction(
    actions: QmpTransactionAction[],
    properties: { 'completion-mode'?: 'individual' | 'grouped' } = {},
    options: QmpWaitOptions = {},
  ): Promise<void> {
    const args: Record<string, unknown> = { actions };
    if (Object.keys(properties).length > 0) args.properties = properties;
    await this.execute('transaction', args, options);
  }

  /** Calls the handler for every event of that name ('*': every event). Returns a function that unsubscribes. */
  on(event: QmpEventName | '*', handler: Listener): () => void {
    let set = this.listeners.get(event);
    if (!set) this.listeners.set(event, (set = new Set()));
    set.add(handler);
    return () => {
      set.delete(handler);
    };
  }

  /**
   * Resolves with the next event of that name that satisfies the predicate. Call it before the command that
   * causes the event, or a quick event can be missed. Rejects when the connection ends first.
   */
  waitForEvent<D = Record<string, unknown>>(
    event: QmpEventName,
    predicate: (event: QmpEvent<D>) => boolean = () => true,
    options: QmpWaitOptions = {},
  ): Promise<QmpEvent<D>> {
    const { signal, timeoutMs } = options;
    if (this.endedWith) return Promise.reject(this.endedWith);
    if (signal?.aborted) return Promise.reject(abortReason(signal));
    return new Promise((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const finish = (outcome: () => void) => {
        unsubscribe();
        this.waiters.delete(waiter);
        clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
        outcome();
      };
      const waiter: EventWaiter = { reject: (error) => finish(() => reject(error)) };
      const onAbort = () => finish(() => reject(abortReason(signal)));
      const unsubscribe = this.on(event, (received) => {
        // The event's data has the shape QEMU documents for that event; D is the caller's statement of it.
        const typed = received as QmpEvent<D>;
        let matches: boolean;
        try {
          matches = predicate(typed);
        } catch (err) {
          finish(() => reject(err instanceof Error ? err : new Error(String(err))));
          return;
        }
        if (matches) finish(() => resolve(typed));
      });
      this.waiters.add(waiter);
      signal?.addEventListener('abort', onAbort, { once: true });
      if (timeoutMs !== undefined) {
        timer = setTimeout(
          () => finish(() => reject(new QmpTimeoutError(`no QMP ${event} event within ${timeoutMs} ms`))),
          timeoutMs,
        );
      }
    });
  }

  /** Closes the connection; pending commands reject with QmpConnectionError. QEMU keeps running. */
  async close(): Promise<void> {
    if (this.endedWith) return;
    this.closing = true;
    this.socket.end();
    // QEMU closes its side at once; destroy if it does not, so close() cannot hang.
    const timer = setTimeout(() => this.socket.destroy(), 1000);
    await this.closed;
    clearTimeout(timer);
  }

  private async handshake(timeoutMs: number, signal: AbortSignal | undefined): Promise<void> {
    let fail: (error: Error) => void = () => {};
    const greeting = new Promise<QmpGreeting>((resolve, reject) => {
      this.onGreeting = resolve;
      fail = reject;
    });
    void this.closed.then(fail);
    const onAbort = () => fail(abortReason(signal));
    signal?.addEventListener('abort', onAbort, { once: true });
    const timer = setTimeout(
      () =>
        fail(
          new QmpConnectionError(
            `no QMP greeting on ${this.socketPath} within ${timeoutMs} ms ` +
              '(a QMP socket serves one client at a time: is another one connected?)',
            this.socketPath,
          ),
        ),
      timeoutMs,
    );
    try {
      this.greetingResult = await greeting;
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
    }
    await this.execute('qmp_capabilities', undefined, { timeoutMs, signal });
  }

  private receive(chunk: string): void {
    this.buffer += chunk;
    let newline: number;
    while ((newline = this.buffer.indexOf('\n')) >= 0) {
      const line = this.buffer.slice(0, newline).trim();
      this.buffer = this.buffer.slice(newline + 1);
      if (line) this.handleMessage(line);
    }
  }

  private handleMessage(line: string): void {
    let message: unknown;
    try {
      message = JSON.parse(line);
    } catch {
      this.protocolError(`QEMU sent a line that is not JSON: ${line.slice(0, 200)}`);
      return;
    }
    if (!isRecord(message)) {
      this.protocolError(`QEMU sent a message that is not an object: ${line.slice(0, 200)}`);
      return;
    }
    if ('QMP' in message) {
      const greeting = message as unknown as QmpGreeting;
      this.onGreeting?.(greeting);
      this.onGreeting = undefined;
    } else if (typeof message.event === 'string') {
      this.dispatch({
        event: message.event,
        data: isRecord(message.data) ? message.data : {},
        timestamp: isRecord(message.timestamp)
          ? { seconds: Number(message.timestamp.seconds), microseconds: Number(message.timestamp.microseconds) }
          : { seconds: 0, microseconds: 0 },
      });
    } else if ('return' in message || 'error' in message) {
      this.reply(message);
    }
    // Anything else is a message kind this client does not know: ignore it, as QMP asks of clients.
  }

  private reply(message: Record<string, unknown>): void {
    const id = typeof message.id === 'string' ? message.id : undefined;
    let key = id;
    if (key === undefined) key = this.pending.keys().next().value; // no id: QEMU could not read the oldest request
    if (key === undefined) return;
    const entry = this.pending.get(key);
    if (!entry) return; // not one of ours
    this.pending.delete(key);
    if ('error' in message) {
      const error = isRecord(message.error) ? message.error : {};
      const errorClass = typeof error.class === 'string' ? error.class : 'UnknownError';
      const desc = typeof error.desc === 'string' ? error.desc : JSON.stringify(message.error);
      entry.reject(new QmpError(entry.command, errorClass, desc));
    } else {
      entry.resolve(message.return);
    }
  }

  private dispatch(event: QmpEvent): void {
    for (const name of [event.event, '*']) {
      for (const handler of [...(this.listeners.get(name) ?? [])]) {
        try {
          handler(event);
        } catch (err) {
          // A failing handler must not break the reading of later messages; surface it like an emitter would.
          queueMicrotask(() => {
            throw err;
          });
        }
      }
    }
  }

  private protocolError(message: string): void {
    this.protocolFailure ??= message;
    this.socket.destroy();
  }

  private ended(): void {
    // A reset is how QEMU often ends the connection (after quit, or when it dies): no worse than an EOF.
    const detail = this.closing
      ? 'closed by this client'
      : this.protocolFailure
        ? `dropped: ${this.protocolFailure}`
        : `closed by QEMU${this.socketError ? ` (${this.socketError.message})` : ''}`;
    const reason = new QmpConnectionError(
      `QMP connection to ${this.socketPath} ${detail}`,
      this.socketPath,
      undefined,
      {
        cause: this.socketError,
      },
    );
    this.endedWith = reason;
    for (const [id, entry] of this.pending) {
      this.pending.delete(id);
      entry.reject(
        new QmpConnectionError(`QMP ${entry.command} got no reply: ${reason.message}`, this.socketPath, entry.command, {
          cause: reason,
        }),
      );
    }
    for (const waiter of [...this.waiters]) waiter.reject(reason);
    this.resolveClosed(reason);
  }
}

function connectSocket(socketPath: string, retryForMs: number, signal: AbortSignal | undefined): Promise<net.Socket> {
  const deadline = Date.now() + retryForMs;
  return new Promise((resolve, reject) => {
    const attempt = () => {
      if (signal?.aborted) {
        reject(abortReason(signal));
        return;
      }
      const socket = net.connect(socketPath);
      const onError = (err: NodeJS.ErrnoException) => {
        socket.destroy();
        if (err.code !== undefined && retryableConnectErrors.has(err.code) && Date.now() < deadline) {
          setTimeout(attempt, 50);
        } else {
          reject(
            new QmpConnectionError(
              `cannot connect to QMP socket ${socketPath}: ${err.message}`,
              socketPath,
              undefined,
              {
                cause: err,
              },
            ),
          );
        }
      };
      socket.once('error', onError);
      socket.once('connect', () => {
        socket.off('error', onError);
        resolve(socket);
      });
    };
    attempt();
  });
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function abortReason(signal: AbortSignal | undefined): Error {
  const reason: unknown = signal?.reason;
  return reason instanceof Error ? reason : new Error('aborted');
}
