// Benchmark: orchestration overhead. A planned failover of a VM with nothing to copy (no writes, already
// replicated, zero shutdown and boot time) against a bare Temporal workflow of five no-op activities, on the
// same server in the same run, alternating.
// Run: npx tsx bench/overhead.ts   →   bench/results/overhead.json   (BENCH_ROUNDS, default 10)

import { randomUUID } from 'node:crypto';
import { NativeConnection, Worker } from '@temporalio/worker';
import { startPlannedFailover, startReplicationJob } from '../src/client';
import { sessionWorkflowId } from '../src/contract';
import type { BareActivities } from './bare-workflow';
import type { Comparison } from './report/comparisons';
import {
  commitOf,
  criticalWindow,
  estateOf,
  historyStats,
  machine,
  median,
  round3,
  startEnvironment,
  stepMedians,
  timeline,
  USER,
  writeResult,
  type EstateVm,
  type HistoryStats,
  type WindowStep,
} from './lib';

const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 10);
/** Runs of each kind before the measured rounds: bundles are loaded, connections and caches warm. */
const WARMUP = 2;
const BARE_QUEUE = 'bench-bare';
const JOB = 'bench';

interface PlannedRun {
  vm: string;
  workflowId: string;
  sessionWorkflowId: string;
  wallMs: number;
  downtimeMs: number;
  orchestrationMs: number;
  finalSyncMs: number;
  switchMs: number;
  guestShutdownMs: number;
  bootMs: number;
  bytesCopied: number;
  /** Scheduled to closed of each activity or signal of the session, in order. */
  sessionSteps: WindowStep[];
  /** The session's steps from the shutdown to the replica's power-on, in the order they were scheduled. */
  criticalWindow: WindowStep[];
}

async function main(): Promise<void> {
  const log = (line: string) => console.log(line);
  const began = performance.now();
  const commit = commitOf();
  log(`Code: ${commit}`);
  const vms: EstateVm[] = Array.from({ length: WARMUP + ROUNDS }, (_, i) => ({
    name: `ov-${i}`,
    disks: [{ id: 'os', size: '64MiB' }],
    writeRate: 0,
    shutdownMs: 0,
    bootMs: 0,
  }));
  const env = await startEnvironment({
    name: 'overhead',
    estate: estateOf(vms),
    jobs: () => [{ name: JOB, vms: vms.map((v) => v.name) }],
    log,
  });
  let bare: { worker: Worker; running: Promise<void>; connection: NativeConnection } | undefined;
  try {
    const client = env.orchestrator.client;
    const connection = await NativeConnection.connect({ address: env.server.address });
    const activities: BareActivities = { noop: async () => undefined };
    const worker = await Worker.create({
      connection,
      namespace: 'default',
      taskQueue: BARE_QUEUE,
      workflowsPath: require.resolve('./bare-workflow'),
      activities,
    });
    bare = { worker, connection, running: worker.run() };

    log('Seeding the replicas (nothing is written, so every failover has nothing to copy)...');
    const seed = await (await startReplicationJob(client, { job: JOB, requestedBy: USER, reason: 'seed' })).result();
    const failed = seed.sessions.filter((s) => s.outcome !== 'replicated');
    if (failed.length > 0) throw new Error(`seed failed: ${failed.map((s) => `${s.vm} ${s.detail}`).join('; ')}`);

    const runPlanned = async (vm: string): Promise<PlannedRun> => {
      const started = performance.now();
      const handle = await startPlannedFailover(client, { vms: [vm], reason: 'overhead benchmark', requestedBy: USER });
      const result = await handle.result();
      const wallMs = performance.now() - started;
      const session = result.sessions[0];
      if (session?.outcome !== 'failedOver' || !session.downtime)
        throw new Error(`planned failover of ${vm}: ${session?.outcome} ${session?.detail}`);
      // Guest shutdown writes the canary block: that one block is all there is to copy.
      if (session.bytesCopied > 65536)
        throw new Error(`${vm}: ${session.bytesCopied} bytes copied, expected at most the canary block`);
      const sessionId = sessionWorkflowId(vm, session.sessionId);
      const sessionHandle = client.workflow.getHandle(sessionId);
      const steps = await timeline(sessionHandle);
      return {
        vm,
        workflowId: handle.workflowId,
        sessionWorkflowId: sessionId,
        wallMs: Math.round(wallMs),
        downtimeMs: session.downtime.totalMs,
        orchestrationMs: session.downtime.orchestrationMs,
        finalSyncMs: session.downtime.finalSyncMs,
        switchMs: session.downtime.switchMs,
        guestShutdownMs: session.downtime.guestShutdownMs,
        bootMs: session.downtime.bootMs,
        bytesCopied: session.bytesCopied,
        sessionSteps: steps.map((s) => ({
          step: s.summary ? s.summary.split(vm).join('<vm>') : s.name.replace(/ to .*/, ''),
          ms: Math.round(s.closedMs - s.scheduledMs),
        })),
        criticalWindow: (await criticalWindow(sessionHandle, vm)).steps,
      };
    };
    const runBare = async (): Promise<number> => {
      const started = performance.now();
      await client.workflow.execute('bareWorkflow', {
        taskQueue: BARE_QUEUE,
        workflowId: `bare/${randomUUID()}`,
        args: [],
      });
      return performance.now() - started;
    };

    log(`Warm-up: ${WARMUP} of each`);
    for (let i = 0; i < WARMUP; i++) {
      await runPlanned(`ov-${i}`);
      await runBare();
    }
    const planned: PlannedRun[] = [];
    const bareMs: number[] = [];
    log(`${ROUNDS} rounds, alternating which goes first`);
    for (let round = 0; round < ROUNDS; round++) {
      const vm = `ov-${WARMUP + round}`;
      const order = round % 2 === 0 ? ['planned', 'bare'] : ['bare', 'planned'];
      for (const kind of order) {
        if (kind === 'planned') planned.push(await runPlanned(vm));
        else bareMs.push(await runBare());
      }
      const p = planned.at(-1)!;
      log(
        `  round ${round}: planned failover ${p.wallMs} ms (downtime ${p.downtimeMs} ms), bare ${Math.round(bareMs.at(-1)!)} ms`,
      );
    }

    // The history of the last measured failover, and of one bare run, to explain the ratio.
    const last = planned.at(-1)!;
    const histories: Record<string, HistoryStats> = {
      plannedFailoverWorkflow: await historyStats(client.workflow.getHandle(last.workflowId)),
      plannedFailoverSession: await historyStats(client.workflow.getHandle(last.sessionWorkflowId)),
    };
    const bareId = `bare/${randomUUID()}`;
    await client.workflow.execute('bareWorkflow', { taskQueue: BARE_QUEUE, workflowId: bareId, args: [] });
    histories.bareWorkflow = await historyStats(client.workflow.getHandle(bareId));

    const plannedMedian = median(planned.map((p) => p.wallMs));
    const bareMedian = median(bareMs);
    const window = stepMedians(planned.map((p) => p.criticalWindow));
    const result = {
      benchmark: 'overhead',
      commit,
      date: new Date().toISOString(),
      machine: machine(),
      durationSeconds: Math.round((performance.now() - began) / 1000),
      rounds: ROUNDS,
      warmupRuns: WARMUP,
      plannedFailoverMedianMs: Math.round(plannedMedian),
      bareWorkflowMedianMs: Math.round(bareMedian),
      ratio: round3(plannedMedian / bareMedian),
      plannedDowntimeMedianMs: Math.round(median(planned.map((p) => p.downtimeMs))),
      plannedDowntimeBreakdownMedians: Object.fromEntries(
        (['guestShutdownMs', 'finalSyncMs', 'switchMs', 'bootMs', 'orchestrationMs'] as const).map((f) => [
          f,
          Math.round(median(planned.map((p) => p[f]))),
        ]),
      ),
      plannedBytesCopied: planned.map((p) => p.bytesCopied),
      plannedFailoverMs: planned.map((p) => p.wallMs),
      bareWorkflowMs: bareMs.map(Math.round),
      plannedSessionStepMedians: stepMedians(planned.map((p) => p.sessionSteps)),
      plannedCriticalWindowMedians: window,
      histories,
      comparisons: [
        {
          title: 'Orchestration overhead',
          unit: 'ms',
          measured: { label: 'planned failover, nothing to copy', samples: planned.map((p) => p.wallMs) },
          baseline: { label: 'bare workflow, five no-op activities', samples: bareMs.map(Math.round) },
          targets: [{ text: 'at most 1.5x the bare workflow', of: 'ratio', atMost: 1.5 }],
        },
      ] satisfies Comparison[],
      note:
        'planned = startPlannedFailover to its result for a VM with writeRate 0, already replicated, shutdownMs 0, ' +
        'bootMs 0 (a parent workflow, one session child, its activities and the signals to the replica and proxy ' +
        'entities); bare = a workflow of five sequential no-op activities on its own worker and task queue, same server.',
    };
    const path = await writeResult('overhead', result);
    log(`Critical window, in order${window.sameOrder ? '' : ' (of the first run; the order varied)'}:`);
    for (const s of window.steps) log(`  ${s.step}: ${s.medianMs} ms`);
    log(
      `\nMedian: planned failover ${result.plannedFailoverMedianMs} ms, bare workflow ${result.bareWorkflowMedianMs} ms, ` +
        `ratio ${result.ratio}`,
    );
    log(`Results in ${path} (${result.durationSeconds} s)`);
  } finally {
    if (bare) {
      bare.worker.shutdown();
      await bare.running.catch(() => undefined);
      await bare.connection.close();
    }
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
