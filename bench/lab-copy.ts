// Benchmark: copy changed blocks from a VM disk to a replica restore point through the lab adapter,
// against a raw copy of the same bytes (same extents, same disk, fsync at the end) in the same run.
// Run: npx tsx bench/lab-copy.ts   →   bench/results/lab-copy.json

import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir, open, rm, writeFile } from 'node:fs/promises';
import http from 'node:http';
import { cpus, loadavg } from 'node:os';
import { join, resolve } from 'node:path';
import { LabHypervisor } from '../src/hypervisor/lab-adapter';
import { BLOCK_SIZE, type Extent, type ExtentData } from '../src/hypervisor/port';

const ROOT = resolve(__dirname, '..');
const WORK = join(ROOT, '.data', `bench-lab-copy-${process.pid}`);
const DISK_BYTES = 1024 * 1024 * 1024;
const CHANGED_TARGET = 256 * 1024 * 1024;
const ROUNDS = 5;
const HOST = 'prod-bench';
const DR = 'dr-bench';
const vm = { host: HOST, vm: 'bench01' };

const estate = `sites:
  - name: production
    role: production
    hosts:
      - name: ${HOST}
        vms:
          - { name: bench01, disks: [{ id: d0, size: ${DISK_BYTES} }], writeRate: 0, power: Off, shutdownMs: 0, bootMs: 0 }
  - name: dr
    role: dr
    hosts:
      - name: ${DR}
`;

/** Changed runs of 1..64 blocks scattered over the disk, like a busy guest's writes between runs. */
function changedExtents(seed: number): Extent[] {
  let x = seed;
  const rand = (n: number): number => {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    return x % n;
  };
  const blocks = DISK_BYTES / BLOCK_SIZE;
  const taken = new Uint8Array(blocks);
  let total = 0;
  while (total < CHANGED_TARGET) {
    const len = 1 + rand(64);
    const start = rand(blocks - len);
    for (let b = start; b < start + len; b++) {
      if (taken[b]) continue;
      taken[b] = 1;
      total += BLOCK_SIZE;
    }
  }
  const out: Extent[] = [];
  for (let b = 0; b < blocks; b++) {
    if (!taken[b]) continue;
    const last = out[out.length - 1];
    if (last && last.offset + last.length === b * BLOCK_SIZE) last.length += BLOCK_SIZE;
    else out.push({ offset: b * BLOCK_SIZE, length: BLOCK_SIZE });
  }
  return out;
}

async function* fill(extents: Extent[]): AsyncGenerator<ExtentData> {
  for (const e of extents)
    for (let at = e.offset; at < e.offset + e.length; at += 4 * 1024 * 1024) {
      const len = Math.min(4 * 1024 * 1024, e.offset + e.length - at);
      const data = Buffer.allocUnsafe(len);
      for (let i = 0; i < len; i += 4) data.writeUInt32LE((at + i) ^ 0x5bd1e995, i);
      yield await Promise.resolve({ offset: at, data });
    }
}

function startLabProcess(dataDir: string, estatePath: string): Promise<{ child: ChildProcess; url: string }> {
  // LAB_NODE_ARGS (e.g. "--cpu-prof") lets a profiler look inside the lab process.
  const extra = (process.env.LAB_NODE_ARGS ?? '').split(' ').filter(Boolean);
  const args = [...extra, '--import', 'tsx', 'lab/main.ts', '--estate', estatePath, '--data', dataDir, '--port', '0'];
  const child = spawn(process.execPath, args, { cwd: ROOT, stdio: ['ignore', 'pipe', 'inherit'] });
  return new Promise((ok, fail) => {
    let out = '';
    child.stdout.on('data', (c: Buffer) => {
      out += c.toString();
      const m = /listening on (http:\/\/[\d.:]+)/.exec(out);
      if (m) ok({ child, url: m[1]! });
    });
    child.on('exit', (code) => fail(new Error(`lab exited with ${code}: ${out}`)));
  });
}

/** Raw copy: the same extents read from the source disk file and written to a new file, then fsync. */
async function rawCopy(sourcePath: string, targetPath: string, extents: Extent[]): Promise<number> {
  const src = await open(sourcePath, 'r');
  const dst = await open(targetPath, 'w');
  const buf = Buffer.allocUnsafe(4 * 1024 * 1024);
  const started = performance.now();
  for (const e of extents)
    for (let at = e.offset; at < e.offset + e.length; at += buf.length) {
      const len = Math.min(buf.length, e.offset + e.length - at);
      await src.read(buf, 0, len, at);
      await dst.write(buf, 0, len, at);
    }
  await dst.datasync();
  const ms = performance.now() - started;
  await src.close();
  await dst.close();
  await rm(targetPath);
  return ms;
}

/**
 * Context for the ratio: one bare HTTP transfer of the same byte count from another Node process,
 * memory to memory. A lab copy needs two such hops (lab → proxy → lab) plus the disk work.
 */
async function bareHttpHopMs(bytes: number, rounds: number): Promise<number[]> {
  const server = `const http = require('http'); const b = Buffer.alloc(4 << 20, 1); const n = ${bytes};
    http.createServer(async (q, r) => { r.writeHead(200, { 'content-length': n });
      for (let s = 0; s < n; s += b.length) { const c = b.subarray(0, Math.min(b.length, n - s));
        if (!r.write(c)) await new Promise((d) => r.once('drain', d)); } r.end(); })
    .listen(0, '127.0.0.1', function () { console.log('port ' + this.address().port); });`;
  const child = spawn(process.execPath, ['-e', server], { stdio: ['ignore', 'pipe', 'inherit'] });
  try {
    const port = await new Promise<number>((ok) =>
      child.stdout.once('data', (c: Buffer) => ok(Number(/port (\d+)/.exec(c.toString())![1]))),
    );
    const agent = new http.Agent({ keepAlive: true });
    const out: number[] = [];
    for (let i = 0; i < rounds; i++) {
      const started = performance.now();
      await new Promise<void>((ok, fail) =>
        http.get({ host: '127.0.0.1', port, agent }, (res) =>
          res
            .on('data', () => undefined)
            .on('end', ok)
            .on('error', fail),
        ),
      );
      out.push(performance.now() - started);
    }
    agent.destroy();
    return out;
  } finally {
    child.kill();
  }
}

const median = (a: number[]): number => {
  const s = [...a].sort((x, y) => x - y);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

async function main(): Promise<void> {
  await rm(WORK, { recursive: true, force: true });
  await mkdir(WORK, { recursive: true });
  const estatePath = join(WORK, 'estate.yaml');
  await writeFile(estatePath, estate);
  const dataDir = join(WORK, 'lab');
  const { child, url } = await startLabProcess(dataDir, estatePath);
  const port = new LabHypervisor({ url, timeoutMs: 120_000 });
  try {
    // Baseline checkpoint and reference point, then the guest's changes, then the checkpoint to copy from.
    await port.createCheckpoint(vm, 'cp0');
    await port.createReferencePoint(vm, 'rp0', 'cp0');
    await port.deleteCheckpoint(vm, 'cp0');
    const written = changedExtents(42);
    await port.writeExtents({ ...vm, disk: 'd0' }, fill(written));
    await port.createCheckpoint(vm, 'cp1');
    await port.createReplica(
      { host: DR, replica: 'bench01-replica' },
      { sourceVm: 'bench01', disks: [{ id: 'd0', sizeBytes: DISK_BYTES }] },
    );

    const labMs: number[] = [];
    const rawMs: number[] = [];
    const sealMs: number[] = [];
    let bytes = 0;
    const sourceFile = join(dataDir, 'vms', 'bench01', 'base-d0.img');
    for (let round = 0; round < ROUNDS; round++) {
      // Alternate the order so neither side always runs on a warmer cache.
      const raw = async () => rawMs.push(await rawCopy(sourceFile, join(dataDir, `raw-${round}.img`), written));
      if (round % 2 === 1) await raw();
      const rep = { host: DR, replica: 'bench01-replica' };
      const started = performance.now();
      const extents: Extent[] = [];
      let cursor: string | undefined;
      do {
        const page = await port.listChangedExtents(
          { ...vm, disk: 'd0' },
          { referencePointId: 'rp0', checkpointId: 'cp1' },
          { cursor, limit: 4096 },
        );
        extents.push(...page.extents);
        cursor = page.nextCursor;
      } while (cursor);
      const pointId = `p${round}`;
      await port.beginRestorePoint(rep, pointId, { kind: 'regular', crashConsistent: true });
      const result = await port.writeRestorePoint(
        { ...rep, disk: 'd0' },
        pointId,
        port.readExtents({ ...vm, disk: 'd0' }, 'cp1', extents),
      );
      const streamed = performance.now();
      await port.sealRestorePoint(rep, pointId);
      labMs.push(performance.now() - started);
      sealMs.push(performance.now() - streamed);
      bytes = result.bytesWritten;
      if (round % 2 === 0) await raw();
      if (round > 0) await port.mergeOldestRestorePoint(rep, `p${round - 1}`);
    }
    const expected = written.reduce((n, e) => n + e.length, 0);
    if (bytes !== expected) throw new Error(`copied ${bytes} bytes, expected ${expected}`);
    const labMedian = median(labMs);
    const rawMedian = median(rawMs);
    const mibps = (ms: number): number => Math.round((bytes / 1024 / 1024 / (ms / 1000)) * 10) / 10;
    const hopMs = await bareHttpHopMs(bytes, ROUNDS);
    const result = {
      benchmark: 'lab-copy',
      date: new Date().toISOString(),
      machine: {
        cpus: cpus().length,
        node: process.version,
        loadAverage: loadavg().map((l) => Math.round(l * 100) / 100),
      },
      changedBytes: bytes,
      extents: written.length,
      diskBytes: DISK_BYTES,
      rounds: ROUNDS,
      labCopyMs: labMs.map(Math.round),
      rawCopyMs: rawMs.map(Math.round),
      labSealMs: sealMs.map(Math.round),
      labCopyMedianMs: Math.round(labMedian),
      rawCopyMedianMs: Math.round(rawMedian),
      labCopyMiBps: mibps(labMedian),
      rawCopyMiBps: mibps(rawMedian),
      ratio: Math.round((rawMedian / labMedian) * 1000) / 1000,
      bareHttpHopMs: hopMs.map(Math.round),
      bareHttpHopMedianMs: Math.round(median(hopMs)),
      target: 0.8,
      note:
        'lab copy = list changed extents + stream from checkpoint through the adapter into a restore point + seal (fsync); ' +
        'raw = pread/pwrite of the same extents + fdatasync; bare HTTP hop = the same bytes from memory over one Node HTTP ' +
        'connection between two processes (a lab copy crosses two)',
    };
    await mkdir(join(ROOT, 'bench', 'results'), { recursive: true });
    await writeFile(join(ROOT, 'bench', 'results', 'lab-copy.json'), `${JSON.stringify(result, null, 2)}\n`);
    console.log(JSON.stringify(result, null, 2));
  } finally {
    port.close();
    child.kill('SIGTERM');
    await new Promise((r) => child.once('exit', r));
    await rm(WORK, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
