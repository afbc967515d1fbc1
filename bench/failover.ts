// Benchmark: the downtime of a planned failover against a naive move of an identical VM, in the same run;
// extra pre-sync passes against none; and the history budget of a session on a 1 TiB disk against a 64 MiB one.
// Run: npx tsx bench/failover.ts   →   bench/results/failover.json
// BENCH_ROUNDS (default 5) and BENCH_SINCE_REPLICATION_MS (default 18000) change the schedule;
// BENCH_PROXY_TRANSPORT=host-to-host runs it with that proxy transport (→ bench/results/failover-host-to-host.json).

import { createActivities, type Activities } from '../src/activities';
import type { CopyDiskInput } from '../src/activities/replication';
import { startPlannedFailover, startReplicationJob } from '../src/client';
import {
  PLANNED_FAILOVER_DEFAULTS,
  sessionWorkflowId,
  type DowntimeBreakdown,
  type PlannedFailoverOptions,
  type PlannedFailoverSessionResult,
} from '../src/contract';
import { checkpointProvenance, PointMetadata } from '../src/domain/restore-points';
import { labPort } from '../test/tls';
import type { Comparison } from './report/comparisons';
import {
  asActivity,
  commitOf,
  criticalWindow,
  DR,
  estateOf,
  historyStats,
  machine,
  PROXY_TRANSPORT,
  median,
  MiB,
  PROD,
  round1,
  round3,
  sleep,
  startEnvironment,
  stepMedians,
  USER,
  writeResult,
  type BenchEnvironment,
  type EstateVm,
  type HistoryStats,
  type WindowStep,
} from './lib';

const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 5);
/** Time the guest writes between the last replication run and the move: the unreplicated delta. */
const SINCE_REPLICATION_MS = Number(process.env.BENCH_SINCE_REPLICATION_MS ?? 18_000);
/** Moves measured at once are never overlapped; this many VMs are between their last run and their move. */
const PIPELINE_DEPTH = 2;

/** Every VM of (a) and (b) has this profile; they differ only by name. */
const PROFILE = {
  disks: [
    { id: 'os', size: '256MiB' },
    { id: 'data', size: '128MiB' },
  ],
  writeRate: 200,
  hotSetFraction: 0.1,
  hotWriteShare: 0.8,
  shutdownMs: 1000,
  bootMs: 1000,
} as const;

type Variant = 'planned' | 'naive' | 'presync3';
const VARIANTS: readonly Variant[] = ['planned', 'naive', 'presync3'];
// Extra passes stop once a pass copies less than preSyncTargetBytes. With the default (64 MiB) that is after the
// first or second pass at this delta (about 70-85 MiB); a 4 MiB target lets the three extra passes run.
const PRESYNC3: PlannedFailoverOptions = { preSyncMaxPasses: 3, preSyncTargetBytes: 4 * 1024 * 1024 };

const HISTORY_VMS = [
  { name: 'hist-1tib', size: '1TiB', label: '1TiB' },
  { name: 'hist-64mib', size: '64MiB', label: '64MiB' },
] as const;

interface Task {
  round: number;
  variant: Variant;
  vm: string;
  replicatedAt?: number;
}

/** The session's own downtime breakdown, and what the benchmark adds to it. */
interface PlannedSample extends DowntimeBreakdown {
  round: number;
  variant: Variant;
  vm: string;
  sinceReplicationMs: number;
  /** Shutdown start to boot done as the two activities measured them: timed as the naive move is. */
  activitySpanMs: number;
  /** From the request to the workflow's result, pre-sync and bookkeeping included. */
  wallMs: number;
  bytesBeforePowerOff: number;
  bytesAfterPowerOff: number;
  passesBeforePowerOff: number;
  verified: boolean;
  /** Where the downtime goes, from the session's history: each activity or signal from shutdown to power-on. */
  criticalWindow: WindowStep[];
}

interface NaiveSample {
  round: number;
  vm: string;
  sinceReplicationMs: number;
  /** Shutdown start to boot done, as the shutDownSource and powerOnVm activities measured them. */
  totalMs: number;
  guestShutdownMs: number;
  /** Shutdown done to power-on started: the checkpoint, open, copy and seal activities, one after another. */
  syncMs: number;
  bootMs: number;
  /** Each activity of the sync, as the benchmark timed its call. */
  steps: WindowStep[];
  bytesCopied: number;
}

const vmName = (variant: Variant, round: number): string => `${variant}-r${round}`;
const jobOf = (vm: string): string => `job-${vm}`;
const replicaOf = (vm: string) => ({ host: DR, vm: `${vm}_replica` });

async function replicate(env: BenchEnvironment, vm: string, reason: string): Promise<string> {
  const handle = await startReplicationJob(env.orchestrator.client, { job: jobOf(vm), requestedBy: USER, reason });
  const result = await handle.result();
  const session = result.sessions[0];
  if (session?.outcome !== 'replicated') throw new Error(`${reason} of ${vm}: ${session?.outcome} ${session?.detail}`);
  return sessionWorkflowId(vm, session.sessionId);
}

async function failOver(
  env: BenchEnvironment,
  vm: string,
  options?: PlannedFailoverOptions,
): Promise<{ session: PlannedFailoverSessionResult; workflowId: string; wallMs: number }> {
  const started = performance.now();
  const handle = await startPlannedFailover(env.orchestrator.client, {
    vms: [vm],
    reason: 'benchmark',
    requestedBy: USER,
    options,
  });
  const result = await handle.result();
  const wallMs = performance.now() - started;
  const session = result.sessions[0];
  if (session?.outcome !== 'failedOver' || !session.downtime)
    throw new Error(`planned failover of ${vm}: ${session?.outcome} ${session?.detail}`);
  return { session, workflowId: handle.workflowId, wallMs };
}

/** Powers the VM on, and seeds its replica: from here its guest writes the delta the move has to carry. */
async function prepare(env: BenchEnvironment, task: Task): Promise<void> {
  await env.hypervisor.powerOn({ host: PROD, vm: task.vm });
  await replicate(env, task.vm, 'benchmark seed');
  task.replicatedAt = performance.now();
}

async function measurePlanned(env: BenchEnvironment, task: Task): Promise<PlannedSample> {
  const sinceReplicationMs = performance.now() - task.replicatedAt!;
  const { session, wallMs } = await failOver(env, task.vm, task.variant === 'presync3' ? PRESYNC3 : undefined);
  const sessionHandle = env.orchestrator.client.workflow.getHandle(sessionWorkflowId(task.vm, session.sessionId));
  const window = await criticalWindow(sessionHandle, task.vm);
  return {
    round: task.round,
    variant: task.variant,
    vm: task.vm,
    sinceReplicationMs: Math.round(sinceReplicationMs),
    ...session.downtime!,
    activitySpanMs: window.activitySpanMs,
    wallMs: Math.round(wallMs),
    bytesBeforePowerOff: session.bytesBeforePowerOff,
    bytesAfterPowerOff: session.bytesAfterPowerOff,
    passesBeforePowerOff: session.passesBeforePowerOff,
    verified: session.verification?.identical === true,
    criticalWindow: window.steps,
  };
}

/**
 * The move without the orchestrator: the planned failover's own activities, called one after another with no
 * workflow: power off, one sync of everything unreplicated since the last run (checkpoint, open a point, copy
 * every disk side by side, seal), power on the replica.
 */
async function measureNaive(activities: Activities, task: Task): Promise<NaiveSample> {
  const vm = task.vm;
  // Found before the power-off, as the planned failover's session finds it before its window.
  const target = await asActivity(() => activities.prepareReplication({ vm, job: jobOf(vm), fromProduction: true }));
  const checkpointId = `ckpt-naive-${vm}`;
  const pointId = `rp-naive-${vm}`;
  const referencePointId = `ref-naive-${vm}`;
  const steps: WindowStep[] = [];
  const timed = async <T>(step: string, call: () => Promise<T>): Promise<T> => {
    // Listed in the order started, as a history lists what a workflow scheduled.
    const entry: WindowStep = { step, ms: 0 };
    steps.push(entry);
    const started = performance.now();
    const out = await asActivity(call);
    entry.ms = Math.round(performance.now() - started);
    return out;
  };

  const sinceReplicationMs = performance.now() - task.replicatedAt!;
  const shutdown = await asActivity(() =>
    activities.shutDownSource({
      vm: target.source,
      timeoutMs: PLANNED_FAILOVER_DEFAULTS.shutdownTimeoutSeconds * 1000,
    }),
  );
  if (shutdown.outcome !== 'shut-down') throw new Error(`shutdown of ${vm}: ${shutdown.outcome}`);
  const checkpoint = await timed('checkpoint', () => activities.createCheckpoint({ vm: target.source, checkpointId }));
  await timed('open restore point', () =>
    activities.beginRestorePoint({
      replica: target.replica,
      pointId,
      kind: 'regular',
      metadata: { [PointMetadata.session]: `naive-${vm}` },
    }),
  );
  const copies = await Promise.all(
    target.disks.map((disk) => {
      const input: CopyDiskInput = {
        source: {
          kind: 'checkpoint',
          vm: target.source,
          checkpointId,
          baseReferencePointId: target.baseReferencePointId,
        },
        disk,
        replica: target.replica,
        pointId,
        replicaHeadPointId: target.headPointId,
      };
      return timed(`copy ${disk.id}`, () => activities.copyDisk(input, PROXY_TRANSPORT));
    }),
  );
  await timed('seal', () =>
    activities.sealRestorePoint({
      replica: target.replica,
      pointId,
      metadata: checkpointProvenance(target.source, checkpoint, referencePointId),
    }),
  );
  const replicaVm = { host: target.replica.host, vm: target.replica.replica };
  const boot = await asActivity(() => activities.powerOnVm({ vm: replicaVm }));
  // After the downtime, as a job run does: the source keeps no checkpoint's copy-on-write data.
  await asActivity(() => activities.promoteCheckpoint({ vm: target.source, checkpointId, referencePointId }));
  return {
    round: task.round,
    vm,
    sinceReplicationMs: Math.round(sinceReplicationMs),
    totalMs: boot.finishedAt - shutdown.startedAt,
    guestShutdownMs: shutdown.finishedAt - shutdown.startedAt,
    syncMs: boot.startedAt - shutdown.finishedAt,
    bootMs: boot.finishedAt - boot.startedAt,
    steps,
    bytesCopied: copies.reduce((n, c) => n + c.bytesCopied, 0),
  };
}

/** Medians of every numeric field of the samples. */
function medians<T extends object>(samples: T[], fields: (keyof T)[]): Record<string, number> {
  return Object.fromEntries(fields.map((f) => [String(f), Math.round(median(samples.map((s) => Number(s[f]))))]));
}

async function historyBudget(env: BenchEnvironment, log: (line: string) => void) {
  const client = env.orchestrator.client;
  const out: Record<string, Record<string, HistoryStats>> = {};
  await Promise.all(
    HISTORY_VMS.map(async ({ name, label }) => {
      await env.hypervisor.powerOn({ host: PROD, vm: name });
      const seed = await replicate(env, name, 'history budget: seed');
      await sleep(5_000);
      const incremental = await replicate(env, name, 'history budget: incremental run');
      await sleep(5_000);
      const failover = await failOver(env, name);
      await env.hypervisor.powerOff(replicaOf(name));
      const session = sessionWorkflowId(name, failover.session.sessionId);
      const stats = {
        plannedFailoverSession: await historyStats(client.workflow.getHandle(session)),
        plannedFailoverWorkflow: await historyStats(client.workflow.getHandle(failover.workflowId)),
        seedReplicationSession: await historyStats(client.workflow.getHandle(seed)),
        incrementalReplicationSession: await historyStats(client.workflow.getHandle(incremental)),
      };
      out[label] = stats;
      const show = (s: HistoryStats) =>
        `${s.events} events, largest event ${s.largestEventBytes} B, largest payload ${s.largestPayloadBytes} B`;
      log(`  ${label} planned failover session: ${show(stats.plannedFailoverSession)}`);
      log(`  ${label} incremental replication session: ${show(stats.incrementalReplicationSession)}`);
    }),
  );
  return out;
}

async function main(): Promise<void> {
  const log = (line: string) => console.log(line);
  const began = performance.now();
  const commit = commitOf();
  log(`Code: ${commit}`);
  const tasks: Task[] = [];
  for (let round = 0; round < ROUNDS; round++)
    // Rotate the order each round so that no variant always runs first or last.
    for (let i = 0; i < VARIANTS.length; i++) {
      const variant = VARIANTS[(i + round) % VARIANTS.length]!;
      tasks.push({ round, variant, vm: vmName(variant, round) });
    }
  const vms: EstateVm[] = [
    ...tasks.map((t): EstateVm => ({ name: t.vm, power: 'Off', ...PROFILE, disks: [...PROFILE.disks] })),
    ...HISTORY_VMS.map((h): EstateVm => ({
      name: h.name,
      power: 'Off',
      ...PROFILE,
      disks: [{ id: 'os', size: h.size }],
    })),
  ];
  const env = await startEnvironment({
    name: 'failover',
    estate: estateOf(vms),
    jobs: () => vms.map((v) => ({ name: jobOf(v.name), vms: [v.name] })),
    log,
  });
  // The naive move's activities get a port of their own, as the workers' activities do.
  const naivePort = labPort(env.lab.url, { timeoutMs: 120_000 });
  const activities = createActivities({
    port: naivePort,
    config: env.orchestrator.config,
    client: env.orchestrator.client,
  });
  try {
    const planned: PlannedSample[] = [];
    const naive: NaiveSample[] = [];
    log(
      `(a, b) ${ROUNDS} rounds of ${VARIANTS.join(', ')}; each move ${SINCE_REPLICATION_MS / 1000} s after the VM's last ` +
        `replication, moves never overlap`,
    );
    // A pipeline: while one VM waits out its time since the last run, the next is prepared or another is moved.
    for (let i = 0; i < tasks.length + PIPELINE_DEPTH - 1; i++) {
      if (i < tasks.length) await prepare(env, tasks[i]!);
      const j = i - PIPELINE_DEPTH + 1;
      if (j < 0) continue;
      const task = tasks[j]!;
      await sleep(task.replicatedAt! + SINCE_REPLICATION_MS - performance.now());
      if (task.variant === 'naive') {
        const s = await measureNaive(activities, task);
        naive.push(s);
        log(
          `  round ${s.round} naive    ${s.vm}: downtime ${s.totalMs} ms (shutdown ${s.guestShutdownMs}, sync ${s.syncMs}, boot ${s.bootMs}), ${(s.bytesCopied / MiB).toFixed(1)} MiB after power-off`,
        );
      } else {
        const s = await measurePlanned(env, task);
        planned.push(s);
        log(
          `  round ${s.round} ${s.variant.padEnd(8)} ${s.vm}: downtime ${s.activitySpanMs} ms (reported ${s.totalMs}: shutdown ${s.guestShutdownMs}, final sync ${s.finalSyncMs}, switch ${s.switchMs}, boot ${s.bootMs}, orchestration ${s.orchestrationMs}), ${(s.bytesBeforePowerOff / MiB).toFixed(1)} MiB before / ${(s.bytesAfterPowerOff / MiB).toFixed(1)} MiB after power-off, ${s.passesBeforePowerOff} pass(es)${s.verified ? '' : ', NOT VERIFIED'}`,
        );
      }
      // The replica's guest would keep writing: stop it, so that the background load stays the same.
      await env.hypervisor.powerOff(replicaOf(task.vm));
    }

    log('(c) history budget: 1 TiB sparse disk and 64 MiB disk');
    const history = await historyBudget(env, log);

    const plain = planned.filter((s) => s.variant === 'planned');
    const presync = planned.filter((s) => s.variant === 'presync3');
    const plannedMedian = median(plain.map((s) => s.activitySpanMs));
    const naiveMedian = median(naive.map((s) => s.totalMs));
    const pairedRatios = plain.map((p) => p.activitySpanMs / naive.find((n) => n.round === p.round)!.totalMs);
    const plannedFields: (keyof PlannedSample)[] = [
      'activitySpanMs',
      'totalMs',
      'guestShutdownMs',
      'finalSyncMs',
      'switchMs',
      'bootMs',
      'orchestrationMs',
      'wallMs',
      'bytesBeforePowerOff',
      'bytesAfterPowerOff',
      'passesBeforePowerOff',
      'sinceReplicationMs',
    ];
    const presyncSummary = (samples: PlannedSample[]) => ({
      medianDowntimeMs: Math.round(median(samples.map((s) => s.activitySpanMs))),
      medianReportedDowntimeMs: Math.round(median(samples.map((s) => s.totalMs))),
      medianFinalSyncMs: Math.round(median(samples.map((s) => s.finalSyncMs))),
      medianBytesAfterPowerOff: Math.round(median(samples.map((s) => s.bytesAfterPowerOff))),
      medianBytesBeforePowerOff: Math.round(median(samples.map((s) => s.bytesBeforePowerOff))),
      medianWallMs: Math.round(median(samples.map((s) => s.wallMs))),
      passesTaken: samples.map((s) => s.passesBeforePowerOff),
    });
    const p0 = presyncSummary(plain);
    const p3 = presyncSummary(presync);
    const result = {
      benchmark: 'failover',
      commit,
      date: new Date().toISOString(),
      machine: machine(),
      durationSeconds: Math.round((performance.now() - began) / 1000),
      rounds: ROUNDS,
      settings: {
        proxyTransport: PROXY_TRANSPORT,
        sinceReplicationMs: SINCE_REPLICATION_MS,
        profile: PROFILE,
        blockBytes: 65536,
        presync3Options: PRESYNC3,
        note:
          'Every VM of (a) and (b) is fresh, seeded right after power-on, and moved sinceReplicationMs later; moves ' +
          'never overlap; each round runs the three variants in a rotated order. Downtime on both sides = the ' +
          "shutDownSource activity's startedAt to the powerOnVm activity's finishedAt, as those activities measured " +
          'them (one process, one clock). Planned: the plannedFailover workflow; its window also holds the workflow ' +
          'tasks between steps, the verification of helper point 2, the slot release and the switch signal; totalMs ' +
          'is its own report (server clock, from the workflow task that schedules the shutdown to the one that ' +
          'records the boot). Naive: the same activities called with no workflow: shutDownSource, createCheckpoint, ' +
          'beginRestorePoint, copyDisk of every disk side by side (the proxy transport), sealRestorePoint, ' +
          'powerOnVm of the replica.',
      },
      downtime: {
        plannedMedianMs: Math.round(plannedMedian),
        naiveMedianMs: Math.round(naiveMedian),
        ratioPlannedToNaive: round3(plannedMedian / naiveMedian),
        medianOfPairedRatios: round3(median(pairedRatios)),
        plannedMedians: medians(plain, plannedFields),
        plannedCriticalWindowMedians: stepMedians(plain.map((s) => s.criticalWindow)),
        naiveMedians: medians(naive, [
          'totalMs',
          'guestShutdownMs',
          'syncMs',
          'bootMs',
          'bytesCopied',
          'sinceReplicationMs',
        ]),
        naiveStepMedians: stepMedians(naive.map((s) => s.steps)),
        planned: plain,
        naive,
      },
      preSync: {
        passes0: p0,
        passes3: p3,
        ratioDowntime3To0: round3(p3.medianDowntimeMs / p0.medianDowntimeMs),
        ratioFinalSyncBytes3To0: round3(p3.medianBytesAfterPowerOff / p0.medianBytesAfterPowerOff),
        presync3: presync,
      },
      history,
      comparisons: [
        {
          title: 'Downtime, shutdown started to replica booted',
          unit: 'ms',
          measured: { label: 'planned failover', samples: plain.map((s) => s.activitySpanMs) },
          baseline: { label: 'naive stop-copy-start', samples: naive.map((s) => s.totalMs) },
        },
        {
          title: 'Downtime with 3 pre-sync passes',
          unit: 'ms',
          measured: { label: 'planned failover, 3 passes', samples: presync.map((s) => s.activitySpanMs) },
          baseline: { label: 'naive stop-copy-start', samples: naive.map((s) => s.totalMs) },
        },
      ] satisfies Comparison[],
    };
    const path = await writeResult(PROXY_TRANSPORT === 'network' ? 'failover' : `failover-${PROXY_TRANSPORT}`, result);
    log(
      `\nDowntime median: planned ${result.downtime.plannedMedianMs} ms, naive ${result.downtime.naiveMedianMs} ms, ` +
        `ratio ${result.downtime.ratioPlannedToNaive} (paired ${result.downtime.medianOfPairedRatios})`,
    );
    log(
      `Pre-sync 3 vs 0: downtime ${p3.medianDowntimeMs} vs ${p0.medianDowntimeMs} ms, final sync ` +
        `${round1(p3.medianBytesAfterPowerOff / MiB)} vs ${round1(p0.medianBytesAfterPowerOff / MiB)} MiB`,
    );
    log(`Results in ${path} (${result.durationSeconds} s)`);
  } finally {
    naivePort.close();
    await env.cleanup();
  }
}

main().then(
  // The SDK's native runtime keeps the event loop alive after everything is closed.
  () => process.exit(0),
  (err: unknown) => {
    console.error(err);
    process.exit(1);
  },
);
