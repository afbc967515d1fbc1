// What one metadata save (LabSite.persist: state.json written to a temporary file, fsynced, renamed, directory
// fsynced) costs for the demo estate with replicas, points, checkpoints and reference points (finding m6).
//   node --import tsx lab/persist-cost.ts [--points 12] [--runs 300]

import { mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Command } from 'commander';
import { loadEstate } from './estate';
import { LabSite } from './site';

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
  const estate = await loadEstate('config/estate.yaml');
  // Guests off: their writes would only add noise to a measurement of metadata saves.
  for (const s of estate.sites) for (const h of s.hosts) for (const v of h.vms) v.power = 'Off';
  const dir = await mkdtemp(join(tmpdir(), 'persist-cost-'));
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
    const fmt = (xs: number[]) =>
      `median ${percentile(xs, 0.5).toFixed(2)} ms, p90 ${percentile(xs, 0.9).toFixed(2)} ms`;
    console.log(
      `${sources.length} VMs, ${sources.length} replicas x ${opts.points} points; state.json ${stateBytes} bytes`,
    );
    console.log(`persist (serialize, write, fsync, rename, fsync dir), ${runs} runs: ${fmt(saves)}`);
    console.log(`of which serializing the metadata: ${fmt(serialize)}`);
  } finally {
    await site.stop(true);
    await rm(dir, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
