import { execFile, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdirSync, openSync } from 'node:fs';
import { createConnection, createServer } from 'node:net';
import { dirname, join, resolve } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { SearchAttributes } from '../../src/contract';
import { spawnProcessGroup } from './process-group';

export const projectRoot = resolve(__dirname, '..', '..');

/** Installs the Temporal CLI into the project's cache when it is missing, and returns its path. */
export function ensureTemporalCli(): string {
  const script = join(projectRoot, 'scripts', 'install-temporal.sh');
  const result = spawnSync('bash', [script], { stdio: ['ignore', 'pipe', 'inherit'], encoding: 'utf8' });
  if (result.status !== 0) throw new Error(`Installing the Temporal CLI failed (exit ${result.status}); see above.`);
  const path = result.stdout.trim().split('\n').pop();
  if (!path) throw new Error('The Temporal CLI installer printed no path.');
  return path;
}

/** Every custom search attribute of the contract, as `temporal server start-dev` registers them. */
export function searchAttributeArgs(): string[] {
  return Object.values(SearchAttributes).flatMap((key) => ['--search-attribute', `${key.name}=Keyword`]);
}

export async function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() =>
        typeof address === 'object' && address ? resolvePort(address.port) : reject(new Error('no port')),
      );
    });
  });
}

/** True when something accepts TCP connections on the port. */
export async function portInUse(port: number, host = '127.0.0.1'): Promise<boolean> {
  return new Promise((resolveUse) => {
    const socket = createConnection({ port, host });
    socket.once('connect', () => {
      socket.destroy();
      resolveUse(true);
    });
    socket.once('error', () => resolveUse(false));
  });
}

/** Asynchronous, so that a signal is handled while a caller waits for the server. */
/** `env`: the CLI's environment, e.g. the TLS variables of a secured cluster (the health check needs no token). */
export async function serverHealthy(cli: string, address: string, env?: NodeJS.ProcessEnv): Promise<boolean> {
  return new Promise((resolveHealth) =>
    execFile(cli, ['operator', 'cluster', 'health', '--address', address], { timeout: 5_000, env }, (err, stdout) =>
      resolveHealth(!err && stdout.includes('SERVING')),
    ),
  );
}

export interface DevServerOptions {
  cli: string;
  port: number;
  /** The Web UI's port; omitted means headless. */
  uiPort?: number;
  /** Where the server serves its Prometheus metrics (/metrics); omitted means nowhere. */
  metricsPort?: number;
  /** SQLite file that keeps the server's state across restarts. */
  dbFile: string;
  /** Where the server's own log goes. */
  logFile: string;
  readyTimeoutMs?: number;
  /** Dynamic configuration of the server, e.g. { 'limit.historyCount.suggestContinueAsNew': 40 }. */
  dynamicConfig?: Record<string, string | number | boolean>;
  /** Stops the server and rejects while it is still starting. */
  signal?: AbortSignal;
}

export interface DevServer {
  address: string;
  uiUrl?: string;
  process: ChildProcess;
  /** Resolves when the server process has exited. */
  exited: Promise<number | null>;
  /** SIGTERM, and SIGKILL if the server is still there after a short grace. */
  stop(): Promise<void>;
}

/** How long a stopping server may take to shut down before it is killed. */
const STOP_GRACE_MS = 3_000;

export async function startDevServer(options: DevServerOptions): Promise<DevServer> {
  const address = `127.0.0.1:${options.port}`;
  mkdirSync(dirname(options.dbFile), { recursive: true });
  mkdirSync(dirname(options.logFile), { recursive: true });
  const log = openSync(options.logFile, 'a');
  const args = [
    'server',
    'start-dev',
    '--db-filename',
    options.dbFile,
    '--ip',
    '127.0.0.1',
    '--port',
    String(options.port),
    ...(options.uiPort === undefined ? ['--headless'] : ['--ui-port', String(options.uiPort)]),
    ...(options.metricsPort === undefined ? [] : ['--metrics-port', String(options.metricsPort)]),
    '--log-level',
    'warn',
    ...searchAttributeArgs(),
    ...Object.entries(options.dynamicConfig ?? {}).flatMap(([key, value]) => [
      '--dynamic-config-value',
      `${key}=${JSON.stringify(value)}`,
    ]),
  ];
  const server = spawnProcessGroup(options.cli, args, { stdio: ['ignore', log, log] });
  const stop = (): Promise<void> => server.stop(STOP_GRACE_MS);

  const deadline = Date.now() + (options.readyTimeoutMs ?? 60_000);
  while (!(await serverHealthy(options.cli, address))) {
    if (server.done) {
      const exitCode = await server.exited;
      throw new Error(`The Temporal server exited with code ${exitCode} before it was ready; see ${options.logFile}`);
    }
    if (options.signal?.aborted) {
      await stop();
      throw new Error('Stopped while the Temporal server was starting.');
    }
    if (Date.now() > deadline) {
      await stop();
      throw new Error(`The Temporal server at ${address} was not ready in time; see ${options.logFile}`);
    }
    await delay(200);
  }
  return {
    address,
    uiUrl: options.uiPort === undefined ? undefined : `http://127.0.0.1:${options.uiPort}`,
    process: server.process,
    exited: server.exited,
    stop,
  };
}
