// A sync of a real guest through the KVM host process, as the orchestrator drives it (checkpoint, changed extents,
// read, reference point, drop), of the guest powered off (the planned failover's final sync: libvirt backs up no
// shut-off domain, so the host process starts it paused) against the same sync of the running guest a moment
// before (the pre-sync), timed the same way in the same round. Also the ACPI shutdown between them, through the port.
//   npx tsx bench/kvm-sync.ts        (BENCH_ROUNDS, default 5)
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ensureGuest, lastSeq } from '../kvm/guest/guest';
import type { Extent } from '../src/hypervisor/port';
import { startTestKvmHost } from '../test/kvm/helpers';
import { kvmPort, makeTestSite } from '../test/tls';
import type { Comparison } from './report/comparisons';
import { commitOf, machine, median, round3, sleep, writeResult } from './lib';

const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 5);
const HOST = 'bench-kvm';
const VM = 'bench-sync';

async function timed<T>(fn: () => Promise<T>): Promise<{ ms: number; value: T }> {
  const started = process.hrtime.bigint();
  const value = await fn();
  return { ms: Number(process.hrtime.bigint() - started) / 1e6, value };
}

async function main(): Promise<void> {
  const started = new Date();
  ensureGuest();
  const dir = await mkdtemp(join(tmpdir(), 'pf-bench-kvmsync-'));
  await makeTestSite(join(dir, 'certs'));
  const kvm = await startTestKvmHost({ dir, name: HOST, domain: VM });
  const port = kvmPort(kvm.host.url, HOST);
  const vm = { host: HOST, vm: VM };
  const disk = { ...vm, disk: 'vda' };
  let reference: string | null = null;
  /** One sync: what a session does for one disk, from the checkpoint to the dropped checkpoint. */
  const sync = async (checkpointId: string) => {
    await port.createCheckpoint(vm, checkpointId);
    const extents: Extent[] = [];
    if (reference) {
      let cursor: string | undefined;
      do {
        const page = await port.listChangedExtents(disk, { referencePointId: reference, checkpointId }, { cursor });
        extents.push(...page.extents);
        cursor = page.nextCursor;
      } while (cursor !== undefined);
    } else {
      extents.push(...(await port.listAllocatedExtents(disk, checkpointId)).extents);
    }
    let bytes = 0;
    for await (const piece of port.readExtents(disk, checkpointId, extents)) bytes += piece.data.length;
    const next = `ref-${checkpointId}`;
    await port.createReferencePoint(vm, next, checkpointId);
    await port.deleteCheckpoint(vm, checkpointId);
    if (reference) await port.deleteReferencePoint(vm, reference);
    reference = next;
    return bytes;
  };
  const samples: {
    runningSyncMs: number;
    runningBytes: number;
    shutdownMs: number;
    finalSyncMs: number;
    finalBytes: number;
  }[] = [];
  try {
    for (let r = 0; r < ROUNDS; r++) {
      const since = (await kvm.guestLines()).length;
      await port.powerOn(vm);
      await kvm.readyAfter(since);
      await kvm.seqAtLeast((lastSeq(await kvm.guestLines()) ?? 0) + 10);
      if (r === 0) await sync('seed');
      await sleep(1000);
      const running = await timed(() => sync(`running-${r}`));
      await sleep(1000);
      const shutdown = await timed(() => port.shutdownGuest(vm, 60_000));
      if (shutdown.value.outcome !== 'off') throw new Error(`round ${r}: shutdown ${shutdown.value.outcome}`);
      const final = await timed(() => sync(`final-${r}`));
      samples.push({
        runningSyncMs: running.ms,
        runningBytes: running.value,
        shutdownMs: shutdown.ms,
        finalSyncMs: final.ms,
        finalBytes: final.value,
      });
      console.log(`round ${r}: ${JSON.stringify(samples.at(-1))}`);
    }
  } finally {
    port.close();
    await kvm.stop();
    await rm(dir, { recursive: true, force: true });
  }
  const m = (k: keyof (typeof samples)[number]) => round3(median(samples.map((s) => s[k])));
  const result = {
    benchmark: 'kvm-sync',
    commit: commitOf(),
    date: started.toISOString(),
    machine: machine(),
    accelerator: 'tcg',
    rounds: ROUNDS,
    samples,
    medians: {
      runningSyncMs: m('runningSyncMs'),
      runningBytes: m('runningBytes'),
      shutdownMs: m('shutdownMs'),
      finalSyncMs: m('finalSyncMs'),
      finalBytes: m('finalBytes'),
    },
    ratios: { finalToRunningSync: round3(median(samples.map((s) => s.finalSyncMs / s.runningSyncMs))) },
    comparisons: [
      {
        title: 'Final sync of the powered-off guest',
        unit: 'ms',
        measured: { label: 'sync of the powered-off guest', samples: samples.map((s) => s.finalSyncMs) },
        baseline: { label: 'the same sync of it running', samples: samples.map((s) => s.runningSyncMs) },
      },
    ] satisfies Comparison[],
  };
  console.log(`medians ${JSON.stringify(result.medians)} ratios ${JSON.stringify(result.ratios)}`);
  console.log(`results in ${await writeResult('kvm-sync', result)}`);
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
