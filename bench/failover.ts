// Benchmark: the downtime of a planned failover against a naive move of an identical VM, in the same run;
// extra pre-sync passes against none; and the history budget of a session on a 1 TiB disk against a 64 MiB one.
// Run: npx tsx bench/failover.ts   →   bench/results/failover.json
// BENCH_ROUNDS (default 5) and BENCH_SINCE_REPLICATION_MS (default 18000) change the schedule;
// BENCH_PROXY_TRANSPORT=host-to-host runs it with that proxy transport (→ bench/results/failover-host-to-host.json).

import { startPlannedFailover, startReplicationJob } from '../src/client';
import {
  sessionWorkflowId,
  type DowntimeBreakdown,
  type PlannedFailoverOptions,
  type PlannedFailoverSessionResult,
} from '../src/contract';
import {
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
  timeline,
  USER,
  writeResult,
  type BenchEnvironment,
  type EstateVm,
  type HistoryStats,
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
  /** From the request to the workflow's result, pre-sync and bookkeeping included. */
  wallMs: number;
  bytesBeforePowerOff: number;
  bytesAfterPowerOff: number;
  passesBeforePowerOff: number;
  verified: boolean;
  /** Where the downtime goes, from the session's history: each activity or signal from shutdown to power-on. */
  criticalWindow: WindowStep[];
}

interface WindowStep {
  step: string;
  /** Scheduled to closed, server clock. */
  ms: number;
  /** Scheduled to picked up by a worker. */
  queueMs?: number;
}

/** The activities and signals from the source's shutdown to the replica's power-on, and the gaps between them. */
async function criticalWindow(env: BenchEnvironment, vm: string, workflowId: string): Promise<WindowStep[]> {
  const entries = await timeline(env.orchestrator.client.workflow.getHandle(workflowId));
  const first = entries.findIndex((e) => e.name === 'shutDownSource');
  let last = entries.length - 1;
  while (last > first && entries[last]!.name !== 'powerOnVm') last--;
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
  const span = window.length ? window.at(-1)!.closedMs - window[0]!.scheduledMs : 0;
  steps.push({ step: 'between steps (workflow tasks)', ms: Math.round(span - busy) });
  return steps;
}

interface NaiveSample {
  round: number;
  vm: string;
  sinceReplicationMs: number;
  totalMs: number;
  shutdownMs: number;
  /** One replication job run of the powered-off VM: start to result. */
  syncMs: number;
  bootMs: number;
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
  const window = await criticalWindow(env, task.vm, sessionWorkflowId(task.vm, session.sessionId));
  return {
    round: task.round,
    variant: task.variant,
    vm: task.vm,
    sinceReplicationMs: Math.round(sinceReplicationMs),
    ...session.downtime!,
    wallMs: Math.round(wallMs),
    bytesBeforePowerOff: session.bytesBeforePowerOff,
    bytesAfterPowerOff: session.bytesAfterPowerOff,
    passesBeforePowerOff: session.passesBeforePowerOff,
    verified: session.verification?.identical === true,
    criticalWindow: window,
  };
}

/** Power off, one job run of everything unreplicated, power on the replica: the move without the orchestrator. */
async function measureNaive(env: BenchEnvironment, task: Task): Promise<NaiveSample> {
  const started = performance.now();
  const sinceReplicationMs = started - task.replicatedAt!;
  const shutdown = await env.hypervisor.shutdownGuest({ host: PROD, vm: task.vm }, 300_000);
  if (shutdown.outcome !== 'off') throw new Error(`shutdown of ${task.vm}: ${shutdown.outcome}`);
  const off = performance.now();
  const handle = await startReplicationJob(env.orchestrator.client, {
    job: jobOf(task.vm),
    requestedBy: USER,
    reason: 'naive move: one sync of the powered-off VM',
  });
  const result = await handle.result();
  const synced = performance.now();
  const session = result.sessions[0];
  if (session?.outcome !== 'replicated') throw new Error(`naive sync of ${task.vm}: ${session?.outcome}`);
  await env.hypervisor.powerOn(replicaOf(task.vm));
  const on = performance.now();
  return {
    round: task.round,
    vm: task.vm,
    sinceReplicationMs: Math.round(sinceReplicationMs),
    totalMs: Math.round(on - started),
    shutdownMs: Math.round(off - started),
    syncMs: Math.round(synced - off),
    bootMs: Math.round(on - synced),
    bytesCopied: session.copy?.bytesCopied ?? 0,
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
        const s = await measureNaive(env, task);
        naive.push(s);
        log(
          `  round ${s.round} naive    ${s.vm}: downtime ${s.totalMs} ms (shutdown ${s.shutdownMs}, sync ${s.syncMs}, boot ${s.bootMs}), ${(s.bytesCopied / MiB).toFixed(1)} MiB after power-off`,
        );
      } else {
        const s = await measurePlanned(env, task);
        planned.push(s);
        log(
          `  round ${s.round} ${s.variant.padEnd(8)} ${s.vm}: downtime ${s.totalMs} ms (shutdown ${s.guestShutdownMs}, final sync ${s.finalSyncMs}, switch ${s.switchMs}, boot ${s.bootMs}, orchestration ${s.orchestrationMs}), ${(s.bytesBeforePowerOff / MiB).toFixed(1)} MiB before / ${(s.bytesAfterPowerOff / MiB).toFixed(1)} MiB after power-off, ${s.passesBeforePowerOff} pass(es)${s.verified ? '' : ', NOT VERIFIED'}`,
        );
      }
      // The replica's guest would keep writing: stop it, so that the background load stays the same.
      await env.hypervisor.powerOff(replicaOf(task.vm));
    }

    log('(c) history budget: 1 TiB sparse disk and 64 MiB disk');
    const history = await historyBudget(env, log);

    const plain = planned.filter((s) => s.variant === 'planned');
    const presync = planned.filter((s) => s.variant === 'presync3');
    const plannedMedian = median(plain.map((s) => s.totalMs));
    const naiveMedian = median(naive.map((s) => s.totalMs));
    const pairedRatios = plain.map((p) => p.totalMs / naive.find((n) => n.round === p.round)!.totalMs);
    const plannedFields: (keyof PlannedSample)[] = [
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
      medianDowntimeMs: Math.round(median(samples.map((s) => s.totalMs))),
      medianFinalSyncMs: Math.round(median(samples.map((s) => s.finalSyncMs))),
      medianBytesAfterPowerOff: Math.round(median(samples.map((s) => s.bytesAfterPowerOff))),
      medianBytesBeforePowerOff: Math.round(median(samples.map((s) => s.bytesBeforePowerOff))),
      medianWallMs: Math.round(median(samples.map((s) => s.wallMs))),
      passesTaken: samples.map((s) => s.passesBeforePowerOff),
    });
    const windowMedians = (samples: PlannedSample[]) => {
      const steps = samples[0]?.criticalWindow.map((w) => w.step) ?? [];
      return steps.map((step, i) => ({
        step,
        medianMs: Math.round(median(samples.map((s) => s.criticalWindow[i]?.ms ?? Number.NaN))),
        medianQueueMs:
          samples[0]?.criticalWindow[i]?.queueMs === undefined
            ? undefined
            : Math.round(median(samples.map((s) => s.criticalWindow[i]?.queueMs ?? Number.NaN))),
      }));
    };
    const p0 = presyncSummary(plain);
    const p3 = presyncSummary(presync);
    const result = {
      benchmark: 'failover',
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
          'Every VM of (a) and (b) is fresh, seeded right after power-on, and moved sinceReplicationMs later; moves never ' +
          'overlap; each round runs the three variants in a rotated order. Planned downtime comes from the workflow ' +
          '(activity timestamps: shutdown start to replica boot done); naive downtime is measured by the benchmark: ' +
          "shutdownGuest, one replicationJob run of the powered-off VM, powerOn of '<vm>_replica'.",
      },
      downtime: {
        plannedMedianMs: Math.round(plannedMedian),
        naiveMedianMs: Math.round(naiveMedian),
        ratioPlannedToNaive: round3(plannedMedian / naiveMedian),
        medianOfPairedRatios: round3(median(pairedRatios)),
        plannedMedians: medians(plain, plannedFields),
        plannedCriticalWindowMedians: windowMedians(plain),
        naiveMedians: medians(naive, [
          'totalMs',
          'shutdownMs',
          'syncMs',
          'bootMs',
          'bytesCopied',
          'sinceReplicationMs',
        ]),
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
