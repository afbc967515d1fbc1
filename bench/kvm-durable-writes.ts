// What "durable before acknowledged" costs on a KVM DR host: the copy activity's uploads into a restore point (32 MiB
// requests of scattered 64 KiB blocks, through the agent's host API) with each request flushed before it answers, as
// the agent does, against the same uploads with that flush skipped (the agent before the change: writes answered
// from the daemon's cache). Both in the same run, alternating, timed the same way, each followed by the point's seal
// (which flushed in both, and fsyncs).
//   npx tsx bench/kvm-durable-writes.ts        (BENCH_ROUNDS, default 5)
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { NbdClient } from '../agent/nbd/client';
import { startKvmHost } from '../agent/server';
import { CAPABILITIES_CACHE, LibvirtInstance } from '../kvm/libvirt/instance';
import { BLOCK_SIZE, type ExtentData } from '../src/hypervisor/port';
import { kvmPort, makeTestSite, testServerTls } from '../test/tls';
import type { Comparison } from './report/comparisons';
import { commitOf, machine, median, MiB, round3, writeResult } from './lib';

const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 5);
const DISK_BYTES = 1024 * MiB;
/** As the copy activity sends them (src/activities/replication.ts). */
const REQUEST_BYTES = 32 * MiB;
const REQUESTS = 8; // 256 MiB a point
const HOST = 'bench-dr';

/** One request's blocks: every fourth 64 KiB block from its start, so that the image's metadata grows as it would. */
function requestBlocks(request: number, data: Buffer): ExtentData[] {
  const blocks = REQUEST_BYTES / BLOCK_SIZE;
  return Array.from({ length: blocks }, (_, i) => ({
    offset: (request * blocks + i) * 4 * BLOCK_SIZE,
    data: data.subarray(i * BLOCK_SIZE, (i + 1) * BLOCK_SIZE),
  }));
}

async function* pieces(list: ExtentData[]): AsyncGenerator<ExtentData> {
  for (const p of list) yield p;
}

async function timed(fn: () => Promise<unknown>): Promise<number> {
  const started = process.hrtime.bigint();
  await fn();
  return Number(process.hrtime.bigint() - started) / 1e6;
}

async function main(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'pf-bench-durable-'));
  await makeTestSite(join(dir, 'certs'));
  const libvirt = await LibvirtInstance.start({ dir: join(dir, 'libvirt'), capabilitiesCache: CAPABILITIES_CACHE });
  const host = await startKvmHost({
    name: HOST,
    site: 'dr',
    role: 'dr',
    libvirtUri: libvirt.virsh.uri,
    stateDir: join(dir, 'state'),
    tls: await testServerTls([HOST]),
  });
  const port = kvmPort(host.url, HOST);
  const flush = Object.getOwnPropertyDescriptor(NbdClient.prototype, 'flush')!.value as NbdClient['flush'];
  const data = randomBytes(REQUEST_BYTES);
  const samples: { flushedMs: number; unflushedMs: number; flushedSealMs: number; unflushedSealMs: number }[] = [];
  try {
    for (let r = 0; r <= ROUNDS; r++) {
      const sample = { flushedMs: 0, unflushedMs: 0, flushedSealMs: 0, unflushedSealMs: 0 };
      // Alternating which goes first, so that neither always finds the page cache warmer.
      const order = r % 2 === 0 ? (['flushed', 'unflushed'] as const) : (['unflushed', 'flushed'] as const);
      for (const variant of order) {
        const replica = { host: HOST, replica: `r${r}-${variant}` };
        await port.createReplica(replica, { sourceVm: replica.replica, disks: [{ id: 'vda', sizeBytes: DISK_BYTES }] });
        await port.beginRestorePoint(replica, 'p1', { kind: 'regular', crashConsistent: true });
        // The baseline: a request's flush skipped (the seal's flush is the daemon's own, at its exit).
        NbdClient.prototype.flush = variant === 'flushed' ? flush : async () => undefined;
        const uploadMs = await timed(async () => {
          for (let q = 0; q < REQUESTS; q++)
            await port.writeRestorePoint({ ...replica, disk: 'vda' }, 'p1', pieces(requestBlocks(q, data)));
        });
        NbdClient.prototype.flush = flush;
        const sealMs = await timed(() => port.sealRestorePoint(replica, 'p1'));
        sample[`${variant}Ms`] = uploadMs;
        sample[`${variant}SealMs`] = sealMs;
      }
      if (r > 0) samples.push(sample); // round 0 warms up
      console.log(`round ${r}: ${JSON.stringify(sample)}`);
    }
  } finally {
    NbdClient.prototype.flush = flush;
    port.close();
    await host.stop();
    await libvirt.stop();
    await rm(dir, { recursive: true, force: true });
  }
  const bytes = REQUESTS * REQUEST_BYTES;
  const total = (s: (typeof samples)[number], v: 'flushed' | 'unflushed') =>
    v === 'flushed' ? s.flushedMs + s.flushedSealMs : s.unflushedMs + s.unflushedSealMs;
  const result = {
    benchmark: 'kvm-durable-writes',
    commit: commitOf(),
    date: new Date().toISOString(),
    machine: machine(),
    rounds: ROUNDS,
    bytesPerPoint: bytes,
    requestBytes: REQUEST_BYTES,
    samples,
    medianFlushedUploadMs: round3(median(samples.map((s) => s.flushedMs))),
    medianUnflushedUploadMs: round3(median(samples.map((s) => s.unflushedMs))),
    uploadRatio: round3(median(samples.map((s) => s.flushedMs / s.unflushedMs))),
    medianFlushedSealMs: round3(median(samples.map((s) => s.flushedSealMs))),
    medianUnflushedSealMs: round3(median(samples.map((s) => s.unflushedSealMs))),
    /** Uploads and seal together: what a restore point costs end to end. */
    pointRatio: round3(median(samples.map((s) => total(s, 'flushed') / total(s, 'unflushed')))),
    flushedMiBPerSecond: round3(bytes / MiB / (median(samples.map((s) => s.flushedMs)) / 1000)),
    comparisons: [
      {
        title: 'A restore point written, uploads and seal',
        unit: 'ms',
        measured: { label: 'flushed before each answer', samples: samples.map((s) => round3(total(s, 'flushed'))) },
        baseline: { label: 'unflushed', samples: samples.map((s) => round3(total(s, 'unflushed'))) },
      },
    ] satisfies Comparison[],
  };
  console.log(JSON.stringify(result, null, 2));
  console.log(`written to ${await writeResult('kvm-durable-writes', result)}`);
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
