import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { CAPABILITIES_CACHE, LibvirtInstance } from '../../kvm/libvirt/instance';
import { blockDigest } from '../../src/host-api/digests';
import { encodeFrames } from '../../src/host-api/frames';
import { BadRequestError, ConflictError, NotFoundError } from '../../src/hypervisor/errors';
import type { HostApiHypervisor } from '../../src/hypervisor/host-api-adapter';
import { BLOCK_SIZE, type Extent, type ExtentData } from '../../src/hypervisor/port';
import { kvmPort, rawRequest } from '../tls';
import { killExportDaemons, spawnKvmHostProcess, type KvmHostProcess } from './helpers';

const HOST = 'kvm-dr1';
const DISK_BYTES = 16 * 1024 * 1024;
const replica = { host: HOST, replica: 'vm9_replica' };
const disk = { ...replica, disk: 'vda' };
const spec = { kind: 'regular', crashConsistent: true };

async function* pieces(list: ExtentData[]): AsyncGenerator<ExtentData> {
  for (const p of list) yield p;
}
const range = (from: number, to: number): number[] => Array.from({ length: to - from }, (_, i) => from + i);
const randomExtents = (blocks: number[]): ExtentData[] =>
  blocks.map((b) => ({ offset: b * BLOCK_SIZE, data: randomBytes(BLOCK_SIZE) }));
/** Blocks as extents, adjacent ones merged (as the host answers them). */
function extentsOf(blocks: number[]): Extent[] {
  const out: Extent[] = [];
  for (const b of [...new Set(blocks)].sort((x, y) => x - y)) {
    const last = out.at(-1);
    if (last && last.offset + last.length === b * BLOCK_SIZE) last.length += BLOCK_SIZE;
    else out.push({ offset: b * BLOCK_SIZE, length: BLOCK_SIZE });
  }
  return out;
}

// The replica side of the KVM host process, run as the process an operator runs (npm run kvm-host), killed with
// SIGKILL in the middle of a restore point: its qcow2 chain and its state file must carry on.
describe('restore points as qcow2 chains on a KVM DR host, through a SIGKILL of its host process', () => {
  let dir: string;
  let libvirt: LibvirtInstance;
  let child: KvmHostProcess | undefined;
  let port: HostApiHypervisor;
  /** What each block of the disk must read as, by point: the test's own model of the chain. */
  const expected = new Map<string, Map<number, Buffer>>();

  async function startProcess(): Promise<void> {
    child = await spawnKvmHostProcess({
      name: HOST,
      role: 'dr',
      libvirtUri: libvirt.virsh.uri,
      // Relative, as an operator may type it: qcow2 backing names and libvirt's paths must still resolve (m1).
      stateDir: relative(process.cwd(), join(dir, 'state')),
    });
    port = kvmPort(child.url, HOST);
  }
  async function kill(): Promise<void> {
    port.close();
    await child!.kill();
  }
  async function digestsOf(pointId: string): Promise<string[]> {
    return (await port.replicaBlockDigests(disk, { pointId }, { startBlock: 0, count: DISK_BYTES / BLOCK_SIZE }))
      .digests;
  }
  const zeroDigest = blockDigest(Buffer.alloc(BLOCK_SIZE));
  async function assertPoint(pointId: string): Promise<void> {
    const want = expected.get(pointId)!;
    const got = await digestsOf(pointId);
    const differing = got.flatMap((d, b) => (d === (want.has(b) ? blockDigest(want.get(b)!) : zeroDigest) ? [] : [b]));
    assert.deepEqual(differing, [], `blocks of ${pointId} that differ`);
  }

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'pf-kvmchain-'));
    libvirt = await LibvirtInstance.start({ dir: join(dir, 'libvirt'), capabilitiesCache: CAPABILITIES_CACHE });
    await startProcess();
  });

  after(async () => {
    port?.close();
    await child?.stop();
    await libvirt?.stop();
    // The killed runs' export daemons were stopped by the next run, and its own by its clean stop.
    const left = spawnSync('pgrep', ['-f', join(dir, 'state')], { encoding: 'utf8' }).stdout.trim();
    rmSync(dir, { recursive: true, force: true });
    assert.equal(left, '', 'no qemu-storage-daemon of the host process is left running');
  });

  test('a point written, the host process killed, the writes retried and sealed: exact', async () => {
    await port.createReplica(replica, { sourceVm: 'vm9', disks: [{ id: 'vda', sizeBytes: DISK_BYTES }] });
    await assert.rejects(
      port.createReplica(replica, { sourceVm: 'other', disks: [{ id: 'vda', sizeBytes: DISK_BYTES }] }),
      ConflictError,
    );
    await port.beginRestorePoint(replica, 'p1', spec);
    const first = randomExtents([0, 3, 4, 5, 100, 255]);
    await port.writeRestorePoint(disk, 'p1', pieces(first));
    await kill(); // its qemu-storage-daemon is left holding the point's image
    await startProcess();
    assert.equal((await port.getReplica(replica)).points[0]!.sealed, false, 'the open point survived');
    // The copy is retried from the start, as a copy activity does after losing its worker.
    await port.writeRestorePoint(disk, 'p1', pieces(first));
    const sealed = await port.sealRestorePoint(replica, 'p1', { metadata: { source: 'test' } });
    assert.equal(sealed.sealed, true);
    assert.equal(sealed.metadata.source, 'test');
    expected.set('p1', new Map(first.map((e) => [e.offset / BLOCK_SIZE, e.data])));
    await assertPoint('p1');
    // Refused at once, while the upload is still arriving: the client must get the refusal, not a broken pipe.
    const large = randomExtents(Array.from({ length: 128 }, (_, i) => i));
    for (let i = 0; i < 3; i++)
      await assert.rejects(
        port.writeRestorePoint(disk, 'p1', pieces(large)),
        ConflictError,
        'a sealed point is read-only',
      );
    await assert.rejects(port.discardRestorePoint(replica, 'p1'), ConflictError);
  });

  test('an abandoned point is replaced; a point’s own extents, the chain’s, and retention merging the oldest', async () => {
    await port.beginRestorePoint(replica, 'abandoned', spec);
    await port.writeRestorePoint(disk, 'abandoned', pieces(randomExtents([7, 8])));
    await kill();
    await startProcess();
    await port.beginRestorePoint(replica, 'p2', spec); // replaces the abandoned one
    assert.deepEqual(
      (await port.listRestorePoints(replica)).map((p) => [p.id, p.sealed]),
      [
        ['p1', true],
        ['p2', false],
      ],
    );
    const second = randomExtents([4, 5, 6, 200]);
    await port.writeRestorePoint(disk, 'p2', pieces(second));
    await port.sealRestorePoint(replica, 'p2');
    const p2 = new Map(expected.get('p1'));
    for (const e of second) p2.set(e.offset / BLOCK_SIZE, e.data);
    expected.set('p2', p2);
    await assertPoint('p2');
    assert.deepEqual(
      (await port.listRestorePointExtents(disk, 'p2')).extents,
      [
        { offset: 4 * BLOCK_SIZE, length: 3 * BLOCK_SIZE },
        { offset: 200 * BLOCK_SIZE, length: BLOCK_SIZE },
      ],
      'p2’s own layer holds what was written into it, and not 7 or 8',
    );
    assert.deepEqual(
      (await port.listReplicaAllocatedExtents(disk, { pointId: 'p2' })).extents,
      extentsOf([...p2.keys()]),
    );

    await assert.rejects(port.mergeOldestRestorePoint(replica, 'p2'), ConflictError, 'only the oldest merges');
    const merged = await port.mergeOldestRestorePoint(replica, 'p1');
    assert.deepEqual(
      merged.points.map((p) => p.id),
      ['p2'],
    );
    assert.deepEqual(await port.mergeOldestRestorePoint(replica, 'p1'), merged, 'merged already is fine');
    await assertPoint('p2');
    await assert.rejects(port.mergeOldestRestorePoint(replica, 'p2'), ConflictError, 'retention keeps the last one');
  });

  test('a seal while a write is still arriving: the rest of the write is refused, and the sealed point never changes', async () => {
    await port.beginRestorePoint(replica, 'p3', spec);
    // 64 blocks, 20 ms apart; the seal is asked for after the eighth.
    let sealing: Promise<unknown> | undefined;
    async function* slowly(): AsyncGenerator<ExtentData> {
      for (let b = 180; b < 244; b++) {
        if (b === 188) sealing = port.sealRestorePoint(replica, 'p3');
        yield { offset: b * BLOCK_SIZE, data: randomBytes(BLOCK_SIZE) };
        await new Promise((r) => setTimeout(r, 20));
      }
    }
    let uploaded: unknown;
    const upload = port.writeRestorePoint(disk, 'p3', slowly()).then(
      () => (uploaded = 'all of it written'),
      (e: unknown) => (uploaded = e),
    );
    while (!sealing && uploaded === undefined) await new Promise((r) => setTimeout(r, 5));
    assert.ok(sealing, `the upload ended before the seal was asked for: ${String(uploaded)}`);
    await sealing;
    const atSeal = await digestsOf('p3');
    await upload;
    assert.ok(uploaded instanceof ConflictError, `the upload after the seal: ${String(uploaded)}`);
    assert.deepEqual(await digestsOf('p3'), atSeal, 'nothing landed in the sealed point');
    await port.mergeOldestRestorePoint(replica, 'p2');
  });

  test('a writer daemon SIGKILLed after its writes answered: nothing answered is lost, writes go on without a restart', async () => {
    const below = await digestsOf('p3');
    await port.beginRestorePoint(replica, 'p5', spec);
    const first = randomExtents(range(16, 48));
    await port.writeRestorePoint(disk, 'p5', pieces(first));
    assert.ok((await killExportDaemons(join(dir, 'state'))) > 0, 'the point had a writer daemon');
    const want = [...below];
    for (const e of first) want[e.offset / BLOCK_SIZE] = blockDigest(e.data);
    // The open point reads through a new writer, which finds every answered write on disk.
    assert.deepEqual(await digestsOf('p5'), want);
    const second = randomExtents(range(60, 71));
    await port.writeRestorePoint(disk, 'p5', pieces(second));
    for (const e of second) want[e.offset / BLOCK_SIZE] = blockDigest(e.data);
    // A copy retried after its answer was lost writes its last batch again: counted once.
    await port.writeRestorePoint(disk, 'p5', pieces(second));
    await killExportDaemons(join(dir, 'state'));
    await kill();
    await startProcess();
    const sealed = await port.sealRestorePoint(replica, 'p5');
    assert.equal(sealed.bytesWritten, (first.length + second.length) * BLOCK_SIZE, 'the bytes the point holds');
    assert.deepEqual(await digestsOf('p5'), want);
    await port.mergeOldestRestorePoint(replica, 'p3');
  });

  test('a merge of r5 leaves the export of r50 alone (one replica’s directory is not a prefix of another’s)', async () => {
    const r5 = { host: HOST, replica: 'r5' };
    const r50 = { host: HOST, replica: 'r50' };
    for (const r of [r5, r50])
      await port.createReplica(r, { sourceVm: `${r.replica}-vm`, disks: [{ id: 'vda', sizeBytes: DISK_BYTES }] });
    for (const p of ['p1', 'p2']) {
      await port.beginRestorePoint(r5, p, spec);
      await port.writeRestorePoint({ ...r5, disk: 'vda' }, p, pieces(randomExtents([1, 2])));
      await port.sealRestorePoint(r5, p);
    }
    const run = join(dir, 'state', 'run');
    const pidFiles = (): Map<string, string> =>
      new Map(
        readdirSync(run)
          .filter((n) => n.endsWith('.nbd.pid'))
          .map((n) => [n, readFileSync(join(run, n), 'utf8').trim()]),
      );
    const before = pidFiles();
    await port.beginRestorePoint(r50, 'p1', spec);
    await port.writeRestorePoint({ ...r50, disk: 'vda' }, 'p1', pieces(randomExtents([3])));
    const r50Writers = [...pidFiles()].filter(([n]) => !before.has(n));
    assert.equal(r50Writers.length, 1, 'r50’s open point has its writer');
    await port.mergeOldestRestorePoint(r5, 'p1');
    const after = pidFiles();
    for (const [name, pid] of r50Writers) {
      assert.equal(after.get(name), pid, 'r50’s writer is the same daemon, still running');
      process.kill(Number(pid), 0);
    }
    await port.sealRestorePoint(r50, 'p1');
  });

  test('bad input changes nothing and names the field', async () => {
    const before = await digestsOf('p5');
    await port.beginRestorePoint(replica, 'p4', spec);
    // A bad first frame with 8 MiB behind it: refused by its field, the rest read, not cut (no broken pipe).
    const badFirst = [{ offset: DISK_BYTES, data: Buffer.alloc(BLOCK_SIZE) }, ...randomExtents(range(0, 128))];
    for (let i = 0; i < 3; i++)
      await assert.rejects(
        port.writeRestorePoint(disk, 'p4', pieces(badFirst)),
        (e: Error) => e instanceof BadRequestError && /frames\.0\.offset/.test(e.message),
      );
    await assert.rejects(port.getReplica({ host: HOST, replica: 'nosuch' }), NotFoundError);
    // A disk id with a dot could name another point's file (`<point>.<disk>.qcow2`): refused by its field (m8).
    await assert.rejects(
      port.createReplica(
        { host: HOST, replica: 'dotted' },
        { sourceVm: 'vm8', disks: [{ id: 'a.b', sizeBytes: DISK_BYTES }] },
      ),
      (e: Error) => e instanceof BadRequestError && /body\.disks\.0\.id/.test(e.message),
    );
    // A name as long as an identifier may be (128) is a name, not a 414 of the web framework's (m3).
    const longest = { host: HOST, replica: `r${'x'.repeat(127)}` };
    assert.equal(
      (await port.createReplica(longest, { sourceVm: 'vm8', disks: [{ id: 'vda', sizeBytes: DISK_BYTES }] })).name,
      longest.replica,
    );
    await assert.rejects(port.beginRestorePoint({ host: HOST, replica: 'nosuch' }, 'p', spec), NotFoundError);
    // An open point reads through its writer (a final sync is verified before its seal): nothing written, so p5.
    assert.deepEqual(await digestsOf('p4'), before);
    await port.discardRestorePoint(replica, 'p4');
    assert.deepEqual(
      (await port.listRestorePoints(replica)).map((p) => p.id),
      ['p5'],
    );
    assert.deepEqual(await digestsOf('p5'), before);
  });

  test('a write sent with the source’s digests is read back once flushed and proven; a block altered on the way is named', async () => {
    await port.beginRestorePoint(replica, 'pv', spec);
    const data = randomBytes(6 * BLOCK_SIZE);
    const parts: Buffer[] = [];
    for await (const p of encodeFrames(pieces([{ offset: 2 * BLOCK_SIZE, data }]), { digests: true })) parts.push(p);
    const body = Buffer.concat(parts);
    const upload = (framed: Buffer) =>
      rawRequest(`${child!.url}/v1/hosts/${HOST}/replicas/${replica.replica}/points/pv/disks/vda/write`, {
        method: 'POST',
        body: framed,
        headers: { 'content-type': 'application/octet-stream' },
      });
    const proven = await upload(body);
    assert.equal(proven.status, 200, proven.text);
    assert.deepEqual(proven.json(), {
      bytesWritten: 6 * BLOCK_SIZE,
      verification: { blocksCompared: 6, mismatched: [] },
    });
    const altered = Buffer.from(body);
    altered[24 + 4 * BLOCK_SIZE + 9]! ^= 0xff; // block 4 of the data frame: disk block 6
    const caught = await upload(altered);
    assert.equal(caught.status, 200, caught.text);
    assert.deepEqual(caught.json(), {
      bytesWritten: 6 * BLOCK_SIZE,
      verification: { blocksCompared: 6, mismatched: [{ offset: 6 * BLOCK_SIZE, length: BLOCK_SIZE }] },
    });
    await port.discardRestorePoint(replica, 'pv');
  });
});
