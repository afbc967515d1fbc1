// Benchmark: the downtime of a planned failover of a real guest between two KVM hosts (two libvirt instances, our
// host process on each, TCG), and its breakdown, against a naive move of the same guest in the same round: ACPI
// shutdown, a replication job of the stopped guest, power-on of the replica, one after another through the same
// port and workers. Each move is undone before the next (replica off, its running layer discarded, source on).
//   npx tsx bench/kvm-failover.ts        (BENCH_ROUNDS, default 5)   →   bench/results/kvm-failover.json
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Runtime } from '@temporalio/worker';
import { ensureGuest, lastSeq } from '../kvm/guest/guest';
import { replicaNameOf } from '../src/activities/inventory';
import { startPlannedFailover, startReplicationJob } from '../src/client';
import { connectHypervisor } from '../src/config/hypervisor';
import { parseConfiguration } from '../src/config/load';
import { operationUpdates, replicaWorkflowId, type DowntimeBreakdown } from '../src/contract';
import { createLogger } from '../src/logging';
import { createOrchestrator } from '../src/orchestrator';
import { ensureTemporalCli, freePort, startDevServer } from '../scripts/lib/dev-server';
import { startTestKvmHost } from '../test/kvm/helpers';
import { makeTestKeys, signingTestClient, testPublicKey } from '../test/keys';
import { makeTestSite, testClientTls } from '../test/tls';
import type { Comparison } from './report/comparisons';
import { commitOf, machine, median, round3, sleep, writeResult } from './lib';

const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 5);
const PROD = 'bench-kvm-prod';
const DR = 'bench-kvm-dr';
const VM = 'bench-fo';
const USER = 'alice';
/** The guest writes this long between the last replication and the move: the unreplicated delta. */
const SINCE_REPLICATION_MS = 5_000;

async function timed<T>(fn: () => Promise<T>): Promise<{ ms: number; value: T }> {
  const started = process.hrtime.bigint();
  const value = await fn();
  return { ms: Number(process.hrtime.bigint() - started) / 1e6, value };
}

interface NaiveSample {
  totalMs: number;
  guestShutdownMs: number;
  /** The replication job of the stopped guest, from its start to its result. */
  syncMs: number;
  bootMs: number;
  bytesCopied: number;
}

async function main(): Promise<void> {
  const started = new Date();
  ensureGuest();
  Runtime.install({ logger: createLogger('WARN') });
  const dir = await mkdtemp(join(tmpdir(), 'pf-bench-kvmfo-'));
  const undo: (() => Promise<unknown> | void)[] = [() => rm(dir, { recursive: true, force: true })];
  const planned: (DowntimeBreakdown & { bytesAfterPowerOff: number })[] = [];
  const naive: NaiveSample[] = [];
  try {
    const server = await startDevServer({
      cli: ensureTemporalCli(),
      port: await freePort(),
      dbFile: join(dir, 'temporal.db'),
      logFile: join(dir, 'temporal.log'),
    });
    undo.push(() => server.stop());
    await makeTestSite(join(dir, 'certs'));
    await makeTestKeys(join(dir, 'keys'));
    const prod = await startTestKvmHost({ dir: join(dir, 'prod'), name: PROD, domain: VM });
    undo.push(() => prod.stop());
    const dr = await startTestKvmHost({ dir: join(dir, 'dr'), name: DR, role: 'dr' });
    undo.push(() => dr.stop());
    const config = parseConfiguration(
      JSON.stringify({
        hosts: [
          { name: PROD, role: 'production', adapter: { type: 'kvm', url: prod.host.url } },
          { name: DR, role: 'dr', adapter: { type: 'kvm', url: dr.host.url } },
        ],
        proxies: [{ name: 'proxy-a', slots: 4 }],
        users: [{ name: USER, roles: ['BackupAdministrator'], keys: [testPublicKey(USER)] }],
        jobs: [{ name: 'kvm', vms: [VM], targetHost: DR }],
        tls: testClientTls(),
      }),
      'benchmark configuration',
    );
    const port = connectHypervisor(config);
    undo.push(() => port.close());
    const orchestrator = await createOrchestrator({
      connectionOptions: { address: server.address },
      namespace: 'default',
      config,
      port: connectHypervisor(config),
    });
    undo.push(() => orchestrator.close());
    await orchestrator.startWorkers();
    const client = signingTestClient(orchestrator.client);
    const source = { host: PROD, vm: VM };
    const replica = { host: DR, replica: replicaNameOf(VM) };
    const replicaVm = { host: DR, vm: replica.replica };

    const replicate = async () => {
      const result = await (await startReplicationJob(client, { job: 'kvm', requestedBy: USER })).result();
      const s = result.sessions[0]!;
      if (s.outcome !== 'replicated') throw new Error(`replication: ${s.outcome} ${s.detail}`);
      return s.copy?.bytesCopied ?? 0;
    };
    const runSource = async () => {
      const since = (await prod.guestLines()).length;
      await port.powerOn(source);
      await prod.readyAfter(since);
      await prod.seqAtLeast((lastSeq(await prod.guestLines()) ?? 0) + 5);
    };
    /** Undo by hand, as the naive move has no entity operation: replica off, its writes gone, source on. */
    const undoByPort = async () => {
      await port.powerOff(replicaVm);
      await port.discardRunningLayer(replica);
      await runSource();
    };

    await runSource();
    await replicate(); // the seed
    for (let r = 0; r < ROUNDS; r++) {
      // (a) planned failover, then undone by the entity's own operation.
      await replicate();
      await sleep(SINCE_REPLICATION_MS);
      const result = await (
        await startPlannedFailover(client, { vms: [VM], requestedBy: USER, reason: 'bench' })
      ).result();
      const s = result.sessions[0]!;
      if (s.outcome !== 'failedOver' || !s.downtime || s.verification?.identical !== true)
        throw new Error(`round ${r}: planned failover ${s.outcome} ${s.detail}`);
      planned.push({ ...s.downtime, bytesAfterPowerOff: s.bytesAfterPowerOff });
      console.log(`round ${r} planned: ${JSON.stringify(planned.at(-1))}`);
      await client.workflow
        .getHandle(replicaWorkflowId(VM))
        .executeUpdate(operationUpdates.undoFailover, { args: [{ requestedBy: USER, reason: 'bench' }] });
      await prod.seqAtLeast((lastSeq(await prod.guestLines()) ?? 0) + 5);

      // (b) the naive move of the same guest, timed the same way in the same round.
      await replicate();
      await sleep(SINCE_REPLICATION_MS);
      const shutdown = await timed(() => port.shutdownGuest(source, 60_000));
      if (shutdown.value.outcome !== 'off') throw new Error(`round ${r}: shutdown ${shutdown.value.outcome}`);
      const sync = await timed(replicate);
      const boot = await timed(() => port.powerOn(replicaVm));
      naive.push({
        totalMs: shutdown.ms + sync.ms + boot.ms,
        guestShutdownMs: shutdown.ms,
        syncMs: sync.ms,
        bootMs: boot.ms,
        bytesCopied: sync.value,
      });
      console.log(`round ${r} naive:   ${JSON.stringify(naive.at(-1))}`);
      await undoByPort();
    }
  } finally {
    for (const step of undo.reverse()) await Promise.resolve(step()).catch((e: unknown) => console.error(e));
  }
  const m = <T>(samples: T[], k: keyof T) => Math.round(median(samples.map((s) => Number(s[k]))));
  const result = {
    benchmark: 'kvm-failover',
    commit: commitOf(),
    date: started.toISOString(),
    machine: machine(),
    accelerator: 'tcg',
    rounds: ROUNDS,
    sinceReplicationMs: SINCE_REPLICATION_MS,
    planned,
    naive,
    medians: {
      planned: Object.fromEntries(
        (
          [
            'totalMs',
            'guestShutdownMs',
            'finalSyncMs',
            'switchMs',
            'bootMs',
            'orchestrationMs',
            'bytesAfterPowerOff',
          ] as const
        ).map((k) => [k, m(planned, k)]),
      ),
      naive: Object.fromEntries(
        (['totalMs', 'guestShutdownMs', 'syncMs', 'bootMs', 'bytesCopied'] as const).map((k) => [k, m(naive, k)]),
      ),
    },
    ratios: {
      /** Per round, planned over naive downtime; the median of those. */
      plannedToNaive: round3(median(planned.map((p, i) => p.totalMs / naive[i]!.totalMs))),
    },
    comparisons: [
      {
        title: 'Downtime of a real guest, shutdown to replica booted',
        unit: 'ms',
        measured: { label: 'planned failover', samples: planned.map((p) => p.totalMs) },
        baseline: { label: 'naive stop-copy-start', samples: naive.map((n) => n.totalMs) },
      },
    ] satisfies Comparison[],
  };
  console.log(`medians ${JSON.stringify(result.medians)} ratios ${JSON.stringify(result.ratios)}`);
  console.log(`results in ${await writeResult('kvm-failover', result)}`);
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    console.error(err);
    process.exit(1);
  },
);
