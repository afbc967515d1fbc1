// The suite's site, every part a process of its own that a fault can kill for real: the Temporal dev server on a
// persistent SQLite file, the orchestration worker and one worker per proxy (the hosts are the ChaosHosts' own). The
// workers reach the hosts through the recorder (recorder.ts), which lives in the suite's process and so survives
// every fault.
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { startDevServer, type DevServer } from '../../scripts/lib/dev-server';
import type { WorkerRoles } from '../../src/worker';

const READY_MS = 90_000;

/** A child process that prints a line matching `ready` once it serves; its output's tail is kept for reports. */
export class ManagedProcess {
  private child: ChildProcessWithoutNullStreams | undefined;
  private tail = '';
  /** Kills and starts one after the other: two faults on one process must not interleave. */
  private turn: Promise<unknown> = Promise.resolve();

  constructor(
    readonly name: string,
    private readonly args: string[],
    private readonly env: Record<string, string>,
    private readonly ready: RegExp,
  ) {}

  /** The running process's pid. */
  get pid(): number | undefined {
    return this.alive ? this.child?.pid : undefined;
  }

  /** The last of what it printed (stdout and stderr, across its restarts): evidence for a failing round. */
  get output(): string {
    return this.tail;
  }

  get alive(): boolean {
    return this.child !== undefined && this.child.exitCode === null && this.child.signalCode === null;
  }

  async start(): Promise<void> {
    if (this.alive || this.closed) return;
    const child = spawn(process.execPath, this.args, { env: { ...process.env, ...this.env } });
    this.child = child;
    const keep = (d: Buffer): void => {
      this.tail = (this.tail + d.toString()).slice(-20_000);
    };
    child.stdout.on('data', keep);
    child.stderr.on('data', keep);
    await new Promise<void>((resolve, reject) => {
      let seen = '';
      const timer = setTimeout(() => reject(new Error(`${this.name} not ready after ${READY_MS / 1000} s`)), READY_MS);
      const onData = (d: Buffer): void => {
        seen += d.toString();
        if (this.ready.test(seen)) {
          clearTimeout(timer);
          child.stdout.off('data', onData);
          resolve();
        }
      };
      child.stdout.on('data', onData);
      child.once('exit', (code, signal) => {
        clearTimeout(timer);
        reject(new Error(`${this.name} exited (${code ?? signal}) before it was ready:\n${this.tail.slice(-4000)}`));
      });
    });
  }

  /** SIGKILL, down for `downMs`, started again; after any kill or start already under way. */
  bounce(downMs: number): Promise<void> {
    return this.restart({ whileDown: () => delay(downMs) });
  }

  /**
   * SIGKILL and started again, in turn with other kills and starts: `beforeKill` runs just before the kill,
   * `whileDown` between the kill and the start.
   */
  restart(steps: { beforeKill?: () => Promise<void>; whileDown?: () => Promise<void> }): Promise<void> {
    return this.inTurn(async () => {
      await steps.beforeKill?.();
      await this.kill();
      await steps.whileDown?.();
      await this.start();
    });
  }

  /** Set by close(): never started again. */
  private closed = false;

  /** Started if it is not running (after any bounce under way). */
  ensureRunning(): Promise<boolean> {
    return this.inTurn(async () => {
      if (this.alive || this.closed) return false;
      await this.start();
      return true;
    });
  }

  /**
   * Never started again (the suite stops): SIGKILL, or with `graceMs` SIGTERM first (a clean stop lets it stop what
   * it started), and SIGKILL if it is still there after that long.
   */
  async close(graceMs = 0): Promise<void> {
    this.closed = true;
    await this.inTurn(async () => {
      const child = this.child;
      if (graceMs > 0 && child && this.alive) {
        const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
        child.kill('SIGTERM');
        await Promise.race([exited, delay(graceMs)]);
      }
      await this.kill();
    });
  }

  private inTurn<T>(step: () => Promise<T>): Promise<T> {
    const next = this.turn.then(step, step);
    this.turn = next.catch(() => undefined);
    return next;
  }

  /** SIGKILL: no clean stop, no flush; resolves once the process is gone. */
  async kill(): Promise<void> {
    const child = this.child;
    if (!child || !this.alive) return;
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    child.kill('SIGKILL');
    await exited;
  }
}

export interface SiteOptions {
  workDir: string;
  cli: string;
  serverPort: number;
  /** The orchestrator's configuration, as JSON: its hosts' URLs are where the workers reach them. */
  configuration: object;
  proxies: string[];
  bundlePath: string;
  suggestContinueAsNew: number;
}

export class ChaosSite {
  server: DevServer | undefined;
  readonly workflowWorker: ManagedProcess;
  readonly proxyWorkers: Map<string, ManagedProcess>;

  constructor(private readonly o: SiteOptions) {
    const worker = (roles: WorkerRoles): Record<string, string> => ({
      PF_WORKER_ADDRESS: this.address,
      PF_WORKER_NAMESPACE: 'default',
      PF_WORKER_CONFIG: JSON.stringify(o.configuration),
      PF_WORKER_BUNDLE: o.bundlePath,
      PF_WORKER_ROLES: JSON.stringify(roles),
    });
    const args = ['--import', 'tsx', 'test/worker-process.ts'];
    this.workflowWorker = new ManagedProcess(
      'workflow worker',
      args,
      worker({ orchestration: true, proxies: [] }),
      /^ready$/m,
    );
    this.proxyWorkers = new Map(
      o.proxies.map((p) => [
        p,
        new ManagedProcess(`proxy worker ${p}`, args, worker({ orchestration: false, proxies: [p] }), /^ready$/m),
      ]),
    );
  }

  get address(): string {
    return `127.0.0.1:${this.o.serverPort}`;
  }

  async startServer(): Promise<void> {
    if (this.server) return;
    this.server = await startDevServer({
      cli: this.o.cli,
      port: this.o.serverPort,
      dbFile: join(this.o.workDir, 'temporal.db'),
      logFile: join(this.o.workDir, 'temporal.log'),
      readyTimeoutMs: 120_000,
      dynamicConfig: { 'limit.historyCount.suggestContinueAsNew': this.o.suggestContinueAsNew },
    });
  }

  /** SIGTERM with a grace (a clean stop), or SIGKILL of its process group (hard). */
  async stopServer(hard = false): Promise<void> {
    const server = this.server;
    this.server = undefined;
    if (!server) return;
    if (hard && server.process.pid !== undefined) {
      try {
        process.kill(-server.process.pid, 'SIGKILL');
      } catch {
        // Gone already.
      }
      await server.exited;
    } else await server.stop();
  }

  private serverTurn: Promise<unknown> = Promise.resolve();

  /** Stops the server and starts it again on its database, after any restart already under way. */
  bounceServer(hard: boolean, downMs: number): Promise<void> {
    const next = this.serverTurn.then(async () => {
      await this.stopServer(hard);
      await delay(downMs);
      await this.startServer();
    });
    this.serverTurn = next.catch(() => undefined);
    return next;
  }

  private closed = false;

  /** Every process that should run and does not is started again: the server first, the hosts, the workers last. */
  async heal(hosts: () => Promise<string[]>): Promise<string[]> {
    const started: string[] = [];
    if (this.closed) return started;
    await this.serverTurn;
    if (!this.server) {
      await this.startServer();
      started.push('temporal server');
    }
    started.push(...(await hosts()));
    for (const p of [this.workflowWorker, ...this.proxyWorkers.values()])
      if (await p.ensureRunning()) started.push(p.name);
    return started;
  }

  async close(): Promise<void> {
    this.closed = true;
    for (const p of [this.workflowWorker, ...this.proxyWorkers.values()]) await p.close();
    await this.stopServer();
  }
}
