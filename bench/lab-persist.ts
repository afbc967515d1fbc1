// What one metadata save of the lab (LabSite.persist: state.json written to a temporary file, fsynced, renamed,
// directory fsynced) costs for the demo estate with replicas, points, checkpoints and reference points, against
// its baseline timed the same way in the same run: serializing the same metadata alone (finding m6).
//   npx tsx bench/lab-persist.ts [--points 12] [--runs 300]

import { mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Command } from 'commander';
import { loadEstate } from '../lab/estate';
import { LabSite } from '../lab/site';
import type { Comparison } from './report/comparisons';
import { commitOf, machine, median, round3, writeResult } from './lib';

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))]!;
}

async function timed(runs: number, fn: () => unknown): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < runs; i++) {
    const started = process.hrtime.bigint();
    await fn();
    out.push(Number(process.hrtime.bigint() - started) / 1e6);
  }
  return out.sort((a, b) => a - b);
}

async function main(): Promise<void> {
  const opts = new Command()
    .option('--points <n>', 'restore points per replica', '12')
    .option('--runs <n>', 'saves timed', '300')
    .parse()
    .opts<{ points: string; runs: string }>();
  const started = Date.now();
  const estate = await loadEstate(join(__dirname, '..', 'config', 'estate.yaml'));
  // Guests off: their writes would only add noise to a measurement of metadata saves.
  for (const s of estate.sites) for (const h of s.hosts) for (const v of h.vms) v.power = 'Off';
  const dir = await mkdtemp(join(tmpdir(), 'pf-bench-lab-persist-'));
  const site = await LabSite.open(estate, dir);
  try {
    const dr = estate.sites.find((s) => s.role === 'dr')!.hosts[0]!.name;
    const sources = [...site.vms.values()];
    for (const vm of sources) {
      for (const n of [1, 2]) {
        await site.createCheckpoint(vm, `ckpt-${vm.name}-${n}`);
        await site.createReferencePoint(vm, `ref-${vm.name}-${n}`, `ckpt-${vm.name}-${n}`);
      }
      await site.createReplica(dr, `${vm.name}-replica`, vm.name, vm.meta.disks);
      const replica = site.vm(dr, `${vm.name}-replica`);
      for (let n = 1; n <= Number(opts.points); n++) {
        const metadata = {
          job: 'sql',
          run: `run-${n}`,
          sourceCheckpoint: `ckpt-${n}`,
          sourceInstant: new Date().toISOString(),
        };
        await site.beginPoint(replica, `point-${n}`, { kind: 'regular', crashConsistent: true, metadata });
        await site.sealPoint(replica, `point-${n}`);
      }
    }
    const runs = Number(opts.runs);
    const stateBytes = (await stat(join(dir, 'state.json'))).size;
    const saves = await timed(runs, () => site.persist());
    const serialize = await timed(runs, () => JSON.stringify({ vms: [...site.vms.values()].map((v) => v.meta) }));
    const fmt = (xs: number[]) => `median ${median(xs).toFixed(2)} ms, p90 ${percentile(xs, 0.9).toFixed(2)} ms`;
    console.log(
      `${sources.length} VMs, ${sources.length} replicas x ${opts.points} points; state.json ${stateBytes} bytes`,
    );
    console.log(`persist (serialize, write, fsync, rename, fsync dir), ${runs} runs: ${fmt(saves)}`);
    console.log(`baseline, serializing the same metadata alone: ${fmt(serialize)}`);
    const path = await writeResult('lab-persist', {
      benchmark: 'lab-persist',
      commit: commitOf(),
      date: new Date().toISOString(),
      machine: machine(),
      durationSeconds: Math.round((Date.now() - started) / 1000),
      vms: sources.length,
      pointsPerReplica: Number(opts.points),
      stateBytes,
      runs,
      persistMedianMs: round3(median(saves)),
      persistP90Ms: round3(percentile(saves, 0.9)),
      serializeMedianMs: round3(median(serialize)),
      ratio: round3(median(saves) / median(serialize)),
      persistSamplesMs: saves.map(round3),
      serializeSamplesMs: serialize.map(round3),
      comparisons: [
        {
          title: "One save of the lab's metadata",
          unit: 'ms',
          measured: { label: 'serialize, write, fsync, rename, fsync dir', samples: saves.map(round3) },
          baseline: { label: 'serialize alone', samples: serialize.map(round3) },
        },
      ] satisfies Comparison[],
    });
    console.log(`ratio ${(median(saves) / median(serialize)).toFixed(1)}; written to ${path}`);
  } finally {
    await site.stop(true);
    await rm(dir, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
