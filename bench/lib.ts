// Shared by the orchestrator benchmarks: a Temporal dev server of their own (free port, temporary SQLite file),
// a lab site in a temporary directory, the orchestrator's workers wired to both, and a clean stop on success,
// failure or Ctrl-C. Also medians, history statistics and result files.

import { execFileSync } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import type { WorkflowHandle } from '@temporalio/client';
import { temporal } from '@temporalio/proto';
import { MockActivityEnvironment } from '@temporalio/testing';
import { Runtime } from '@temporalio/worker';
import type { EstateInput } from '../lab/estate';
import { startLab, type RunningLab } from '../lab/server';
import { ensureTemporalCli, freePort, startDevServer, type DevServer } from '../scripts/lib/dev-server';
import { parseConfiguration } from '../src/config/load';
import type { Configuration, ProxyTransport } from '../src/config/schema';
import type { LabControl, HostApiHypervisor } from '../src/hypervisor/host-api-adapter';
import { createLogger } from '../src/logging';
import { createOrchestrator, type Orchestrator } from '../src/orchestrator';
import { makeTestKeys, signingTestClient, testPublicKey } from '../test/keys';
import { labControl, labPort, labServerTls, makeTestSite, testClientTls } from '../test/tls';
import { median } from './report/comparisons';

export const MiB = 1024 * 1024;
export const PROD = 'prod-a';
export const DR = 'dr-a';
export const USER = 'alice';

export type EstateVm = NonNullable<EstateInput['sites'][number]['hosts'][number]['vms']>[number];

/** Every VM on one production host, and one empty DR host. */
export function estateOf(vms: EstateVm[]): EstateInput {
  return {
    sites: [
      { name: 'production', role: 'production', hosts: [{ name: PROD, vms }] },
      { name: 'dr', role: 'dr', hosts: [{ name: DR }] },
    ],
  };
}

/** How the benchmarks' proxy moves blocks (BENCH_PROXY_TRANSPORT: network, the default, or host-to-host). */
export const PROXY_TRANSPORT = ((): ProxyTransport => {
  const transport = process.env.BENCH_PROXY_TRANSPORT ?? 'network';
  if (transport !== 'network' && transport !== 'host-to-host')
    throw new Error(`BENCH_PROXY_TRANSPORT: '${transport}' is neither network nor host-to-host`);
  return transport;
})();

/** Hosts prod-a and dr-a on the lab, one proxy, alice as Backup Administrator, and the given jobs. */
export function configurationOf(
  labUrl: string,
  jobs: { name: string; vms: string[] }[],
  proxySlots = 4,
): Configuration {
  const adapter = { type: 'lab', url: labUrl };
  return parseConfiguration(
    JSON.stringify({
      hosts: [
        { name: PROD, role: 'production', adapter },
        { name: DR, role: 'dr', adapter },
      ],
      proxies: [{ name: 'proxy-a', slots: proxySlots, transport: PROXY_TRANSPORT }],
      users: [{ name: USER, roles: ['BackupAdministrator'], keys: [testPublicKey(USER)] }],
      jobs: jobs.map((j) => ({ ...j, targetHost: DR })),
      tls: testClientTls(),
    }),
    'benchmark configuration',
  );
}

export interface BenchEnvironment {
  workDir: string;
  server: DevServer;
  lab: RunningLab;
  hypervisor: HostApiHypervisor;
  control: LabControl;
  orchestrator: Orchestrator;
  /** Stops whatever was started, in reverse order, and removes the temporary directory; safe to call twice. */
  cleanup(): Promise<void>;
}

/**
 * Starts the server, the lab and the workers. When anything fails on the way, what was started is stopped
 * again before the error is thrown. Ctrl-C stops everything too.
 */
export async function startEnvironment(options: {
  name: string;
  estate: EstateInput;
  jobs: (labUrl: string) => { name: string; vms: string[] }[];
  log?: (line: string) => void;
}): Promise<BenchEnvironment> {
  const log = options.log ?? ((line: string) => console.log(line));
  Runtime.install({ logger: createLogger('WARN') });
  const workDir = await mkdtemp(join(tmpdir(), `pf-bench-${options.name}-`));
  const undo: (() => Promise<void> | void)[] = [() => rm(workDir, { recursive: true, force: true })];
  let cleaned: Promise<void> | undefined;
  const cleanup = (): Promise<void> =>
    (cleaned ??= (async () => {
      for (const step of undo.reverse()) {
        try {
          await step();
        } catch (err) {
          console.error(`cleanup: ${err instanceof Error ? err.message : String(err)}`);
        }
      }
    })());
  const onSignal = () => {
    console.error('Interrupted: stopping the workers, the lab and the server...');
    // Calls still in flight fail once their connections close; that must not end the process before cleanup.
    const quiet = (err: unknown) =>
      console.error(`(while stopping) ${err instanceof Error ? err.message : String(err)}`);
    process.on('uncaughtException', quiet);
    process.on('unhandledRejection', quiet);
    void cleanup().finally(() => process.exit(130));
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    const cli = ensureTemporalCli();
    const port = await freePort();
    log(`Temporal dev server on 127.0.0.1:${port} (state in ${workDir})...`);
    const server = await startDevServer({
      cli,
      port,
      dbFile: join(workDir, 'temporal.db'),
      logFile: join(workDir, 'temporal.log'),
    });
    undo.push(() => server.stop());
    // The site of the host API's mutual TLS, as the tests make theirs.
    await makeTestSite(join(workDir, 'certs'));
    // The operator's signing key, as the tests make theirs: the benchmark's requests are signed like any other.
    await makeTestKeys(join(workDir, 'keys'));
    const tls = await labServerTls(options.estate);
    const lab = await startLab({ estate: options.estate, dataDir: join(workDir, 'lab'), port: 0, tls });
    undo.push(() => lab.stop());
    const hypervisor = labPort(lab.url, { timeoutMs: 120_000 });
    const control = labControl(lab.url);
    undo.push(() => hypervisor.close());
    undo.push(() => control.close());
    // The workers get a port of their own, so the benchmark's own lab calls never share its connections.
    const workerPort = labPort(lab.url, { timeoutMs: 120_000 });
    undo.push(() => workerPort.close());
    log(`Lab at ${lab.url}; bundling the workflows and starting the workers...`);
    const orchestrator = await createOrchestrator({
      connectionOptions: { address: server.address },
      namespace: 'default',
      config: configurationOf(lab.url, options.jobs(lab.url)),
      port: workerPort,
    });
    undo.push(() => orchestrator.close());
    await orchestrator.startWorkers();
    return {
      workDir,
      server,
      lab,
      hypervisor,
      control,
      orchestrator: { ...orchestrator, client: signingTestClient(orchestrator.client) },
      cleanup,
    };
  } catch (err) {
    await cleanup();
    throw err;
  }
}

export { median };

/** Runs an activity call with no worker, in an activity context of its own (heartbeats go nowhere). */
export const asActivity = <R>(call: () => Promise<R>): Promise<R> => new MockActivityEnvironment().run(call);

export const round1 = (n: number): number => Math.round(n * 10) / 10;
export const round3 = (n: number): number => Math.round(n * 1000) / 1000;
export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export function machine(): { cpus: number; node: string; loadAverage: number[] } {
  return { cpus: cpus().length, node: process.version, loadAverage: loadavg().map((l) => Math.round(l * 100) / 100) };
}

/**
 * The code a run measures: HEAD, marked when the working tree differs from it. Result files are left out: one
 * written by an earlier benchmark changes no code.
 */
export function commitOf(): string {
  const git = (...args: string[]) => execFileSync('git', args, { cwd: __dirname, encoding: 'utf8' }).trim();
  const head = git('rev-parse', 'HEAD');
  const dirty = git('status', '--porcelain', '--', ':/', ':(exclude,top)bench/results') !== '';
  return dirty ? `${head} with uncommitted changes` : head;
}

export async function writeResult(name: string, result: unknown): Promise<string> {
  const dir = resolve(__dirname, 'results');
  await mkdir(dir, { recursive: true });
  const path = join(dir, `${name}.json`);
  await writeFile(path, `${JSON.stringify(result, null, 2)}\n`);
  return path;
}

/** The history budget of one workflow execution. */
export interface HistoryStats {
  workflowId: string;
  events: number;
  /** The whole history, protobuf-encoded, as the server stores and sends it. */
  historyBytes: number;
  largestEventBytes: number;
  largestEventType: string;
  /** The largest single payload (data and metadata) anywhere in the history: inputs, results, heartbeats... */
  largestPayloadBytes: number;
  largestPayloadEventType: string;
  activitiesScheduled: number;
  eventTypes: Record<string, number>;
}

type Payload = { metadata?: Record<string, Uint8Array> | null; data?: Uint8Array | null };

function isPayload(value: object): value is Payload {
  return 'data' in value && (value as Payload).data instanceof Uint8Array && 'metadata' in value;
}

function payloadsIn(value: unknown, out: number[]): void {
  if (value === null || typeof value !== 'object' || value instanceof Uint8Array) return;
  if (isPayload(value)) {
    const meta = Object.entries(value.metadata ?? {}).reduce((n, [k, v]) => n + k.length + v.length, 0);
    out.push((value.data?.length ?? 0) + meta);
    return;
  }
  for (const v of Object.values(value)) payloadsIn(v, out);
}

const eventTypeName = (t: temporal.api.enums.v1.EventType | null | undefined): string =>
  (temporal.api.enums.v1.EventType[t ?? 0] ?? String(t)).replace(/^EVENT_TYPE_/, '');

export async function historyStats(handle: WorkflowHandle): Promise<HistoryStats> {
  const history = await handle.fetchHistory();
  const events = history.events ?? [];
  const stats: HistoryStats = {
    workflowId: handle.workflowId,
    events: events.length,
    historyBytes: temporal.api.history.v1.History.encode(history).finish().length,
    largestEventBytes: 0,
    largestEventType: '',
    largestPayloadBytes: 0,
    largestPayloadEventType: '',
    activitiesScheduled: 0,
    eventTypes: {},
  };
  for (const event of events) {
    const type = eventTypeName(event.eventType);
    stats.eventTypes[type] = (stats.eventTypes[type] ?? 0) + 1;
    if (type === 'ACTIVITY_TASK_SCHEDULED') stats.activitiesScheduled++;
    const bytes = temporal.api.history.v1.HistoryEvent.encode(event).finish().length;
    if (bytes > stats.largestEventBytes) {
      stats.largestEventBytes = bytes;
      stats.largestEventType = type;
    }
    const sizes: number[] = [];
    payloadsIn(event, sizes);
    const largest = Math.max(0, ...sizes);
    if (largest > stats.largestPayloadBytes) {
      stats.largestPayloadBytes = largest;
      stats.largestPayloadEventType = type;
    }
  }
  return stats;
}

/** One activity (or signal to another workflow) of a history: what, and when, in ms since the history began. */
export interface TimelineEntry {
  name: string;
  summary?: string;
  scheduledMs: number;
  /** When it was picked up by a worker (activities only). */
  startedMs?: number;
  closedMs: number;
  /** What a completed activity returned. */
  result?: unknown;
}

const eventMs = (t: { seconds?: unknown; nanos?: number | null } | null | undefined): number =>
  Number(t?.seconds ?? 0) * 1000 + (t?.nanos ?? 0) / 1e6;

/** The activities and outgoing signals of a workflow, in the order they were scheduled. */
export async function timeline(handle: WorkflowHandle): Promise<TimelineEntry[]> {
  const events = (await handle.fetchHistory()).events ?? [];
  const { payloadConverter } = handle.client.options.loadedDataConverter;
  const t0 = eventMs(events[0]?.eventTime);
  const byId = new Map<string, TimelineEntry>();
  const out: TimelineEntry[] = [];
  for (const e of events) {
    const at = eventMs(e.eventTime) - t0;
    const id = String(e.eventId);
    if (e.activityTaskScheduledEventAttributes) {
      const summary = e.userMetadata?.summary?.data;
      const entry: TimelineEntry = {
        name: e.activityTaskScheduledEventAttributes.activityType?.name ?? '?',
        summary: summary ? (JSON.parse(Buffer.from(summary).toString()) as string) : undefined,
        scheduledMs: at,
        closedMs: Number.NaN,
      };
      byId.set(id, entry);
      out.push(entry);
    } else if (e.signalExternalWorkflowExecutionInitiatedEventAttributes) {
      const a = e.signalExternalWorkflowExecutionInitiatedEventAttributes;
      const entry: TimelineEntry = {
        name: `signal ${a.signalName ?? '?'} to ${a.workflowExecution?.workflowId ?? '?'}`,
        scheduledMs: at,
        closedMs: Number.NaN,
      };
      byId.set(id, entry);
      out.push(entry);
    } else {
      const started = e.activityTaskStartedEventAttributes;
      if (started) {
        const entry = byId.get(String(started.scheduledEventId));
        if (entry) entry.startedMs = at;
      }
      const activity =
        e.activityTaskCompletedEventAttributes ??
        e.activityTaskFailedEventAttributes ??
        e.activityTaskTimedOutEventAttributes;
      const signal =
        e.externalWorkflowExecutionSignaledEventAttributes ?? e.signalExternalWorkflowExecutionFailedEventAttributes;
      const key = activity ? activity.scheduledEventId : signal?.initiatedEventId;
      const entry = key === undefined || key === null ? undefined : byId.get(String(key));
      if (entry) entry.closedMs = at;
      const result = e.activityTaskCompletedEventAttributes?.result?.payloads?.[0];
      if (entry && result) entry.result = payloadConverter.fromPayload(result);
    }
  }
  return out;
}

/** One activity or signal of a critical window. */
export interface WindowStep {
  step: string;
  /** Scheduled to closed, server clock. */
  ms: number;
  /** Scheduled to picked up by a worker. */
  queueMs?: number;
}

export interface CriticalWindow {
  /** From the source's shutdown to the replica's power-on, in the order they were scheduled; then the gaps. */
  steps: WindowStep[];
  /**
   * The shutdown's start to the power-on's end as those two activities measured them (the worker's clock): the
   * downtime timed as the naive move's is.
   */
  activitySpanMs: number;
}

interface PowerTimes {
  startedAt: number;
  finishedAt: number;
}

/** The critical window of a planned failover session, from its history; `vm` is written `<vm>` in step names. */
export async function criticalWindow(handle: WorkflowHandle, vm: string): Promise<CriticalWindow> {
  const entries = await timeline(handle);
  const first = entries.findIndex((e) => e.name === 'shutDownSource');
  let last = entries.length - 1;
  while (last > first && entries[last]!.name !== 'powerOnVm') last--;
  if (first < 0 || last <= first) throw new Error(`${handle.workflowId}: no shutdown and power-on in its history`);
  const window = entries.slice(first, last + 1);
  const steps: WindowStep[] = window.map((e) => ({
    step: e.summary ? e.summary.split(vm).join('<vm>') : e.name.replace(/ to .*/, ''),
    ms: Math.round(e.closedMs - e.scheduledMs),
    queueMs: e.startedMs === undefined ? undefined : Math.round(e.startedMs - e.scheduledMs),
  }));
  // Copies of several disks overlap: count the time anything ran once.
  let busy = 0;
  let until = Number.NEGATIVE_INFINITY;
  for (const e of [...window].sort((a, b) => a.scheduledMs - b.scheduledMs)) {
    busy += Math.max(0, e.closedMs - Math.max(e.scheduledMs, until));
    until = Math.max(until, e.closedMs);
  }
  const span = window.at(-1)!.closedMs - window[0]!.scheduledMs;
  steps.push({ step: 'between steps (workflow tasks)', ms: Math.round(span - busy) });
  const shutdown = window[0]!.result as PowerTimes;
  const boot = window.at(-1)!.result as PowerTimes;
  return { steps, activitySpanMs: boot.finishedAt - shutdown.startedAt };
}

/**
 * Median time of each step over several runs, listed in the first run's order. Steps are matched by name and
 * occurrence (parallel copies may be scheduled in either order; a name may come twice, as the helper point's
 * opening does); `sameOrder` says whether every run scheduled its steps in the first run's order.
 */
export function stepMedians(runs: readonly WindowStep[][]): {
  sameOrder: boolean;
  steps: { step: string; medianMs: number; medianQueueMs?: number }[];
} {
  const keyed = runs.map((run) => {
    const seen = new Map<string, number>();
    return run.map((s) => {
      const n = (seen.get(s.step) ?? 0) + 1;
      seen.set(s.step, n);
      return { key: `${s.step}#${n}`, ...s };
    });
  });
  const order = (run: { key: string }[]) => run.map((s) => s.key).join('\n');
  const first = keyed[0] ?? [];
  const of = (key: string) => keyed.flatMap((run) => run.filter((s) => s.key === key));
  return {
    sameOrder: keyed.every((run) => order(run) === order(first)),
    steps: first.map(({ key, step, queueMs }) => ({
      step,
      medianMs: Math.round(median(of(key).map((s) => s.ms))),
      medianQueueMs: queueMs === undefined ? undefined : Math.round(median(of(key).map((s) => s.queueMs ?? 0))),
    })),
  };
}
