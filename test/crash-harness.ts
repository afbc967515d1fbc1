// Crash-test machinery shared by the crash tests: the orchestrator's workers run in a child process
// (test/worker-process.ts) that a test kills with SIGKILL and starts again, and they reach the lab through a small
// HTTP proxy in the test's process. The proxy can slow restore-point writes, hold a call before it reaches the lab
// or hold its answer after the lab did the work (so that the call is in flight when the worker dies), and it
// records what the lab received: bytes per restore point and disk, every power call with the lab's answer, and
// every call's method and path.
import assert from 'node:assert/strict';
import type { ChildProcessWithoutNullStreams } from 'node:child_process';
import type http from 'node:http';
import type https from 'node:https';
import { type AddressInfo } from 'node:net';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { Client, Connection } from '@temporalio/client';
import type { EstateInput } from '../lab/estate';
import type { ServerTlsFiles } from '../src/host-api/certificates';
import { forwardTo, labAgent, standInForLab } from './forward';
import { createTestNamespace, temporalAddress, testUsers } from './harness';
import { testSigner } from './keys';
import { DR, PROD, startTestLab, type TestLab } from './lab/helpers';
import { kill, startWorkerProcess } from './processes';
import { labServerTls, testClientTls } from './tls';

export interface Call {
  method: string;
  path: string;
  body?: { action?: string };
}

export interface PowerCall {
  host: string;
  vm: string;
  action: string;
  status: number;
  answer: { outcome?: string; alreadyInState?: boolean; state?: string };
}

/** Holds the first call that matches, before it reaches the lab ('request') or before its answer goes back. */
export class Gate {
  hits = 0;
  readonly arrived: Promise<void>;
  private onArrival!: () => void;
  private released = false;
  private readonly waiting: (() => void)[] = [];

  constructor(
    readonly phase: 'request' | 'response',
    readonly matches: (call: Call) => boolean,
  ) {
    this.arrived = new Promise((resolve) => (this.onArrival = resolve));
  }

  /** Resolves when the call may go on; only the first matching call is held. */
  pass(): Promise<void> {
    this.hits++;
    if (this.hits > 1) return Promise.resolve();
    this.onArrival();
    if (this.released) return Promise.resolve();
    return new Promise((resolve) => this.waiting.push(resolve));
  }

  release(): void {
    this.released = true;
    for (const resolve of this.waiting.splice(0)) resolve();
  }
}

const WRITE_PATH = /^\/v1\/hosts\/([^/]+)\/replicas\/([^/]+)\/points\/([^/]+)\/disks\/([^/]+)\/write$/;
const POWER_PATH = /^\/v1\/hosts\/([^/]+)\/vms\/([^/]+)\/power$/;

async function readBody(stream: NodeJS.ReadableStream): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(Buffer.from(chunk as Buffer));
  return Buffer.concat(chunks);
}

export class LabProxy {
  /** Bytes of restore-point writes the lab received, per `replica/point/disk`, by the worker that sent them. */
  readonly written: Map<string, number>[] = [new Map<string, number>()];
  readonly powerCalls: PowerCall[] = [];
  readonly gates: Gate[] = [];
  /** Replicas whose restore-point writes are slowed to `slowBytesPerSecond`. */
  slowed = new Set<string>();
  slowBytesPerSecond = 2 * 1024 * 1024;
  /** Every call the lab received, in order. */
  readonly calls: Call[] = [];
  private readonly server: https.Server;
  private readonly agent = labAgent({ keepAlive: true, maxSockets: 64 });
  private readonly target: URL;

  /** `tls`: the lab's own TLS files, which the proxy serves the workers with. */
  constructor(labUrl: string, tls: ServerTlsFiles) {
    this.target = new URL(labUrl);
    this.server = standInForLab(tls, (req, res) => {
      this.forward(req, res).catch(() => {
        if (!res.headersSent && !res.destroyed) res.writeHead(502).end();
        else res.destroy();
      });
    });
  }

  async listen(): Promise<string> {
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    return `https://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  async close(): Promise<void> {
    for (const gate of this.gates) gate.release();
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    this.agent.destroy();
  }

  gate(phase: Gate['phase'], matches: (call: Call) => boolean): Gate {
    const gate = new Gate(phase, matches);
    this.gates.push(gate);
    return gate;
  }

  private async forward(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const path = new URL(req.url ?? '/', this.target).pathname;
    const power = req.method === 'POST' ? POWER_PATH.exec(path) : null;
    const write = req.method === 'POST' ? WRITE_PATH.exec(path) : null;
    const body = power ? await readBody(req) : undefined;
    const call: Call = {
      method: req.method ?? 'GET',
      path,
      body: body ? (JSON.parse(body.toString()) as Call['body']) : {},
    };
    this.calls.push(call);
    const gates = this.gates.filter((g) => g.matches(call));
    for (const gate of gates.filter((g) => g.phase === 'request')) await gate.pass();
    if (res.destroyed) return;

    const { upstream, answered } = forwardTo(this.target, this.agent, req, res);
    if (body) upstream.end(body);
    else if (write) {
      // Counted for the worker process that sent the request, even as its last bytes drain after a kill.
      const written = this.written.at(-1)!;
      const key = `${decodeURIComponent(write[2]!)}/${decodeURIComponent(write[3]!)}/${decodeURIComponent(write[4]!)}`;
      const replica = decodeURIComponent(write[2]!);
      const throttle = new Transform({
        transform: (chunk: Buffer, _encoding, done) => {
          written.set(key, (written.get(key) ?? 0) + chunk.length);
          if (!this.slowed.has(replica)) return done(null, chunk);
          setTimeout(() => done(null, chunk), (chunk.length / this.slowBytesPerSecond) * 1000);
        },
      });
      pipeline(req, throttle, upstream).catch(() => upstream.destroy());
    } else req.pipe(upstream);

    const answer = await answered;
    const held = gates.filter((g) => g.phase === 'response');
    if (!power && held.length === 0) {
      res.writeHead(answer.statusCode ?? 502, answer.headers);
      await pipeline(answer, res);
      return;
    }
    const data = await readBody(answer);
    if (power) {
      this.powerCalls.push({
        host: decodeURIComponent(power[1]!),
        vm: decodeURIComponent(power[2]!),
        action: call.body?.action ?? '?',
        status: answer.statusCode ?? 0,
        answer: JSON.parse(data.toString() || '{}') as PowerCall['answer'],
      });
    }
    for (const gate of held) await gate.pass();
    if (res.destroyed) return;
    res.writeHead(answer.statusCode ?? 502, answer.headers).end(data);
  }
}

// Helpers over the server ----------------------------------------------------------------------------------

/** Matches a power call to the VM (with this action, when given). */
export const isPower =
  (host: string, vm: string, action?: string) =>
  (call: Call): boolean =>
    call.path === `/v1/hosts/${host}/vms/${vm}/power` && (action === undefined || call.body?.action === action);

/** A crash test's site: its namespace, a lab behind the test proxy, a client, and the workers in a child process. */
export interface CrashSite {
  namespace: string;
  lab: TestLab;
  proxy: LabProxy;
  client: Client;
  /** Kills the workers with SIGKILL. */
  killWorker(): Promise<void>;
  /** Starts the workers (again); resolves once they poll. */
  startWorker(): Promise<void>;
  close(): Promise<void>;
}

/**
 * Starts a crash test's site with the workers running: one job per VM (`job-<vm>`, to the DR host), so that a
 * planned failover moves every VM in a lane of its own, side by side; one proxy with 16 slots; alice may do all.
 */
export async function startCrashSite(estate: EstateInput, vms: readonly string[]): Promise<CrashSite> {
  const bundle = process.env.PF_TEST_WORKFLOW_BUNDLE;
  assert.ok(bundle, 'run crash tests through `npm test -- <file>`');
  const namespace = await createTestNamespace();
  const lab = await startTestLab(estate);
  const proxy = new LabProxy(lab.lab.url, await labServerTls(estate));
  const proxyUrl = await proxy.listen();
  const client = new Client({
    connection: await Connection.connect({ address: temporalAddress() }),
    namespace,
    interceptors: { workflow: [testSigner()] },
  });
  const adapter = { type: 'lab', url: proxyUrl };
  const env = {
    PF_WORKER_ADDRESS: temporalAddress(),
    PF_WORKER_NAMESPACE: namespace,
    PF_WORKER_CONFIG: JSON.stringify({
      hosts: [
        { name: PROD, role: 'production', adapter },
        { name: DR, role: 'dr', adapter },
      ],
      proxies: [{ name: 'proxy-a', slots: 16 }],
      jobs: vms.map((vm) => ({ name: `job-${vm}`, vms: [vm], targetHost: DR })),
      users: testUsers(),
      tls: testClientTls(),
    }),
    PF_WORKER_LAB_URL: proxyUrl,
    PF_WORKER_BUNDLE: bundle,
  };
  let worker: ChildProcessWithoutNullStreams | undefined = await startWorkerProcess(env);
  return {
    namespace,
    lab,
    proxy,
    client,
    async killWorker() {
      if (worker) await kill(worker);
      worker = undefined;
    },
    async startWorker() {
      worker = await startWorkerProcess(env);
    },
    async close() {
      if (worker) await kill(worker);
      await client.connection.close();
      await proxy.close();
      await lab.close();
    },
  };
}
