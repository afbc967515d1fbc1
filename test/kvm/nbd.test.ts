// The NBD client against a real qemu-storage-daemon: each suite starts its own daemon (on a unix socket, one on TCP)
// in a temp dir and kills it afterwards. Data written through the client is checked byte for byte, and against qemu-img / nbdinfo
// where an independent view exists.
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setTimeout as delay } from 'node:timers/promises';
import { promisify } from 'node:util';
import { NbdClient, NbdConnectionError, NbdError, NbdNegotiationError, type NbdExtent } from '../../agent/nbd/client';
import { BASE_ALLOCATION, STATE_DIRTY, STATE_HOLE, STATE_ZERO, dirtyBitmapContext } from '../../agent/nbd/protocol';
import { ensureGuest } from '../../kvm/guest/guest';

const exec = promisify(execFile);
const KiB = 1024;
const MiB = 1024 * KiB;

interface Daemon {
  socket: string;
  /** SIGKILLs the daemon at once, as a host crash would. */
  crash(): void;
  /** SIGKILLs the daemon (if still running) and waits for it to be gone. */
  kill(): Promise<void>;
}

// The daemon runs under a tiny sh watchdog that SIGKILLs it once its stdin pipe from us closes, which happens however
// this process ends: after() never reached, an uncaught error, the test runner itself killed.
const WATCHDOG =
  'exec 3<&0; qemu-storage-daemon "$@" </dev/null & qsd=$!; (read _ <&3; kill -9 $qsd 2>/dev/null) & wait $qsd';

/** Starts qemu-storage-daemon in `dir`; resolves once its pidfile is written, i.e. once every export is up. */
async function startDaemon(
  dir: string,
  blockdevs: string[],
  exports: string[],
  options: { tcpPort?: number } = {},
): Promise<Daemon> {
  const socket = join(dir, 'nbd.sock');
  const addr =
    options.tcpPort === undefined
      ? `addr.type=unix,addr.path=${socket}`
      : `addr.type=inet,addr.host=127.0.0.1,addr.port=${options.tcpPort}`;
  const pidfile = join(dir, 'qsd.pid');
  const args = [
    ...blockdevs.flatMap((b) => ['--blockdev', b]),
    '--nbd-server',
    addr,
    ...exports.flatMap((e) => ['--export', e]),
    '--pidfile',
    pidfile,
  ];
  const child = spawn('sh', ['-c', WATCHDOG, 'sh', ...args], { cwd: dir, stdio: ['pipe', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  let pid: number | undefined;
  let crashed = false;
  const crash = (): void => {
    if (pid === undefined || crashed) return;
    crashed = true;
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // Already gone by itself.
    }
  };
  const kill = async (): Promise<void> => {
    crash();
    child.stdin?.end();
    await exited;
  };
  const deadline = Date.now() + 10_000;
  while (pid === undefined) {
    if (child.exitCode !== null || Date.now() > deadline) {
      await kill();
      throw new Error(`qemu-storage-daemon did not start: ${stderr.trim() || 'timeout'}`);
    }
    await delay(10);
    // The file can exist a moment before the pid is in it.
    const text = existsSync(pidfile) ? await readFile(pidfile, 'utf8') : '';
    if (/^\d+\s*$/.test(text)) pid = Number(text);
  }
  return { socket, crash, kill };
}

function qcow2(dir: string, name: string): string[] {
  return [
    `driver=file,node-name=${name}-file,filename=${join(dir, `${name}.qcow2`)}`,
    `driver=qcow2,node-name=${name},file=${name}-file`,
  ];
}

/** Deterministic offsets (so a failure can be replayed); the data itself is random. */
function prng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Merges adjacent extents with equal flags, so maps from different clients or request sizes compare equal. */
function normalise(extents: readonly NbdExtent[]): NbdExtent[] {
  const out: NbdExtent[] = [];
  for (const e of extents) {
    const last = out[out.length - 1];
    if (last && last.flags === e.flags && last.offset + last.length === e.offset) last.length += e.length;
    else out.push({ ...e });
  }
  return out;
}

function assertContiguous(extents: readonly NbdExtent[], offset: number, length: number): void {
  let at = offset;
  for (const e of extents) {
    assert.equal(e.offset, at, 'extents are contiguous');
    assert.ok(e.length > 0);
    at += e.length;
  }
  assert.equal(at, offset + length, 'extents cover exactly the requested range');
}

/** The flags of every extent overlapping [offset, offset+length). */
function flagsOver(extents: readonly NbdExtent[], offset: number, length: number): number[] {
  return extents.filter((e) => e.offset < offset + length && e.offset + e.length > offset).map((e) => e.flags);
}

function granules(writes: readonly { offset: number; length: number }[], granularity: number): NbdExtent[] {
  const covered: NbdExtent[] = [];
  for (const w of [...writes].sort((a, b) => a.offset - b.offset)) {
    const start = Math.floor(w.offset / granularity) * granularity;
    const end = Math.ceil((w.offset + w.length) / granularity) * granularity;
    covered.push({ offset: start, length: end - start, flags: STATE_DIRTY });
  }
  // Overlapping or touching granule runs collapse into one extent.
  const merged: NbdExtent[] = [];
  for (const e of covered) {
    const last = merged[merged.length - 1];
    if (last && e.offset <= last.offset + last.length) {
      last.length = Math.max(last.length, e.offset + e.length - last.offset);
    } else merged.push({ ...e });
  }
  return merged;
}

async function nbdinfoMap(socket: string, exportName: string, context: string): Promise<NbdExtent[]> {
  const { stdout } = await exec('nbdinfo', [
    '--json',
    `--map=${context}`,
    `nbd+unix:///${exportName}?socket=${socket}`,
  ]);
  const rows = JSON.parse(stdout) as { offset: number; length: number; type: number }[];
  return rows.map((r) => ({ offset: r.offset, length: r.length, flags: r.type }));
}

// QEMU's tools come with the KVM side's install (a fresh machine has none).
before(() => {
  ensureGuest();
});

describe('NBD client against qemu-storage-daemon: writable, read-only and 4 KiB-aligned exports', () => {
  const SIZE = 96 * MiB;
  let dir = '';
  let daemon: Daemon | undefined;
  let disk: NbdClient;
  const seed = Date.now() % 1_000_000;
  const FAULT = { blockStatus: 90 * MiB, read: 91 * MiB, write: 92 * MiB };
  const rule = (i: number, event: string, iotype: string, errno: number, offset: number): string =>
    `,inject-error.${i}.event=${event},inject-error.${i}.iotype=${iotype},inject-error.${i}.errno=${errno},` +
    `inject-error.${i}.sector=${offset / 512},inject-error.${i}.once=off`;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'pf-nbd-'));
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', join(dir, 'disk0.qcow2'), String(SIZE)]);
    daemon = await startDaemon(
      dir,
      [
        ...qcow2(dir, 'disk0'),
        'driver=blkdebug,node-name=aligned0,image=disk0,align=4096',
        // Injected faults: raw emits the read_aio/write_aio events that arm blkdebug's rules; offsets pass through.
        'driver=blkdebug,node-name=faulty-dbg,image=disk0' +
          rule(0, 'read_aio', 'block-status', 5, FAULT.blockStatus) +
          rule(1, 'read_aio', 'read', 5, FAULT.read) +
          rule(2, 'write_aio', 'write', 28, FAULT.write) +
          rule(3, 'write_aio', 'write-zeroes', 28, FAULT.write),
        'driver=raw,node-name=faulty0,file=faulty-dbg',
      ],
      [
        'type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on',
        'type=nbd,id=exp1,node-name=disk0,name=ro,writable=off',
        'type=nbd,id=exp2,node-name=aligned0,name=aligned,writable=on',
        'type=nbd,id=exp3,node-name=faulty0,name=faulty,writable=on',
      ],
    );
    disk = await NbdClient.connect({ path: daemon.socket, exportName: 'disk0', metaContexts: [BASE_ALLOCATION] });
  });

  after(async () => {
    disk?.destroy();
    await daemon?.kill();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  test('handshake reports export size, read-only flag, block sizes and the granted meta contexts', async () => {
    assert.equal(disk.size, SIZE);
    assert.equal(disk.readOnly, false);
    assert.equal(disk.exportName, 'disk0');
    assert.ok(disk.info.structuredReplies);
    assert.ok(disk.info.canFlush && disk.info.canFua && disk.info.canWriteZeroes && disk.info.canTrim);
    assert.equal(disk.info.minBlockSize, 1);
    assert.equal(disk.info.maxBlockSize, 32 * MiB);
    assert.deepEqual([...disk.metaContexts.keys()], [BASE_ALLOCATION]);

    const ro = await NbdClient.connect({
      path: daemon!.socket,
      exportName: 'ro',
      metaContexts: [BASE_ALLOCATION, dirtyBitmapContext('nope')],
    });
    try {
      assert.equal(ro.size, SIZE);
      assert.equal(ro.readOnly, true);
      assert.equal(ro.info.canWriteZeroes, false);
      // Asked for, but the export has no such bitmap: simply not granted.
      assert.deepEqual([...ro.metaContexts.keys()], [BASE_ALLOCATION]);
      await assert.rejects(ro.blockStatus(dirtyBitmapContext('nope'), 0, 4096), (e: unknown) => {
        assert.ok(e instanceof NbdError && e.local && e.code === 'ENOTSUP');
        assert.match(e.message, /qemu:dirty-bitmap:nope' was not negotiated; granted: base:allocation\)/);
        return true;
      });
    } finally {
      await ro.close();
    }

    const { stdout } = await exec('nbdinfo', ['--json', `nbd+unix:///ro?socket=${daemon!.socket}`]);
    const info = JSON.parse(stdout) as { exports: { 'export-size': number; is_read_only: boolean }[] };
    assert.equal(info.exports[0]?.['export-size'], SIZE);
    assert.equal(info.exports[0]?.is_read_only, true);
  });

  test('scattered unaligned writes with many in flight read back byte-exact; after FLUSH qemu-img sees them', async (t) => {
    t.diagnostic(`offset seed ${seed}`);
    const random = prng(seed);
    const REGION = 16 * MiB;
    const SLOTS = 512;
    const slot = REGION / SLOTS;
    const model = Buffer.alloc(REGION);
    const writes: Promise<void>[] = [];
    // One write per slot, at a random unaligned place inside it: no overlaps, so the outcome does not depend on order.
    for (let i = 0; i < SLOTS; i++) {
      const length = 1 + Math.floor(random() * (slot - 1));
      const offset = i * slot + Math.floor(random() * (slot - length));
      const data = randomBytes(length);
      data.copy(model, offset);
      writes.push(disk.write(offset, data, { fua: i % 50 === 0 }));
    }
    await new Promise((resolve) => setImmediate(resolve));
    assert.equal(disk.inFlight, 8, 'the default in-flight limit is reached and held');
    await Promise.all(writes);
    assert.equal(disk.inFlight, 0);

    assert.ok((await disk.read(0, REGION)).equals(model), 'the whole region reads back');
    const reads = Array.from({ length: 300 }, () => {
      const length = 1 + Math.floor(random() * 64 * KiB);
      const offset = Math.floor(random() * (REGION - length));
      return disk.read(offset, length).then((data) => ({ offset, data }));
    });
    for (const { offset, data } of await Promise.all(reads)) {
      assert.ok(data.equals(model.subarray(offset, offset + data.length)), `read at ${offset}`);
    }

    // A wider window on a second connection: the limit is the client's, not the server's.
    const wide = await NbdClient.connect({ path: daemon!.socket, exportName: 'disk0', maxInFlight: 32 });
    try {
      const many = Array.from({ length: 200 }, (_, i) => wide.read(i * 4 * KiB + 3, 4 * KiB));
      await new Promise((resolve) => setImmediate(resolve));
      assert.equal(wide.inFlight, 32);
      const results = await Promise.all(many);
      results.forEach((data, i) => assert.ok(data.equals(model.subarray(i * 4 * KiB + 3, i * 4 * KiB + 3 + 4 * KiB))));
    } finally {
      await wide.close();
    }

    await disk.flush();
    const raw = join(dir, 'region.raw');
    await exec('qemu-img', [
      'dd',
      '-U',
      '-f',
      'qcow2',
      '-O',
      'raw',
      `if=${join(dir, 'disk0.qcow2')}`,
      `of=${raw}`,
      'bs=1M',
      `count=${REGION / MiB}`,
    ]);
    assert.ok((await readFile(raw)).equals(model), 'the image file holds the writes after FLUSH');
  });

  test('a 40 MiB unaligned write and read are split into pieces the server accepts', async () => {
    const offset = 16 * MiB + 12345;
    const data = randomBytes(40 * MiB + 7);
    const writing = disk.write(offset, data);
    await new Promise((resolve) => setImmediate(resolve));
    assert.equal(disk.inFlight, 2, 'a 32 MiB piece and the rest');
    await writing;
    const back = await disk.read(offset, data.length);
    assert.ok(back.equals(data));
    // The piece boundary (32 MiB into the request) read on its own.
    const edge = await disk.read(offset + 32 * MiB - 5, 10);
    assert.ok(edge.equals(data.subarray(32 * MiB - 5, 32 * MiB + 5)));
  });

  test('never-written ranges and zeroed ranges read as zeroes', async () => {
    const hole = await disk.read(64 * MiB + 17, 8 * MiB - 100);
    assert.ok(hole.equals(Buffer.alloc(hole.length)), 'a hole reads as zeroes');

    await disk.write(60 * MiB, randomBytes(4 * MiB));
    await disk.writeZeroes(60 * MiB + MiB, MiB + 333);
    await disk.writeZeroes(60 * MiB + 3 * MiB, 64 * KiB, { noHole: true, fua: true });
    const mixed = await disk.read(60 * MiB, 4 * MiB);
    assert.ok(!mixed.subarray(0, MiB).equals(Buffer.alloc(MiB)), 'data before the zeroed range survives');
    assert.ok(mixed.subarray(MiB, 2 * MiB + 333).equals(Buffer.alloc(MiB + 333)));
    assert.ok(mixed.subarray(3 * MiB, 3 * MiB + 64 * KiB).equals(Buffer.alloc(64 * KiB)));
    assert.ok(!mixed.subarray(3 * MiB + 64 * KiB).equals(Buffer.alloc(MiB - 64 * KiB)));
  });

  test('BLOCK_STATUS on base:allocation tells data from zeroes, and matches nbdinfo --map', async () => {
    const base = 72 * MiB;
    await disk.write(base + 128 * KiB, randomBytes(256 * KiB));
    await disk.write(base + 4 * MiB, randomBytes(MiB));
    await disk.writeZeroes(base + 4 * MiB + 256 * KiB, 512 * KiB);

    const extents = await disk.blockStatus(BASE_ALLOCATION, base, 24 * MiB);
    assertContiguous(extents, base, 24 * MiB);
    for (const flags of flagsOver(extents, base + 128 * KiB, 256 * KiB)) assert.equal(flags & STATE_ZERO, 0);
    for (const flags of flagsOver(extents, base + 4 * MiB, 256 * KiB)) assert.equal(flags & STATE_ZERO, 0);
    for (const flags of flagsOver(extents, base + 4 * MiB + 256 * KiB, 512 * KiB)) assert.ok(flags & STATE_ZERO);
    for (const flags of flagsOver(extents, base + 8 * MiB, 16 * MiB)) assert.equal(flags, STATE_HOLE | STATE_ZERO);

    // Unaligned sub-range: clipped to exactly what was asked.
    const clipped = await disk.blockStatus(BASE_ALLOCATION, base + 100 * KiB + 1, 100 * KiB);
    assertContiguous(clipped, base + 100 * KiB + 1, 100 * KiB);
    assert.deepEqual(
      clipped.map((e) => e.flags & STATE_ZERO),
      [STATE_ZERO, 0],
    );

    const whole = await disk.blockStatus(BASE_ALLOCATION, 0, SIZE);
    assertContiguous(whole, 0, SIZE);
    assert.deepEqual(normalise(whole), normalise(await nbdinfoMap(daemon!.socket, 'disk0', BASE_ALLOCATION)));
  });

  test('readExtents yields pieces of the given ranges in order, several in flight', async () => {
    const ranges = [
      { offset: 0, length: 100 },
      { offset: 5 * MiB + 1, length: 10 * MiB + 3 },
      { offset: 16 * MiB + 12345, length: 0 },
      { offset: 17 * MiB, length: 64 * KiB },
      { offset: SIZE - 1, length: 1 },
    ];
    const pieces: { offset: number; length: number }[] = [];
    let maxInFlight = 0;
    for await (const piece of disk.readExtents(ranges, { pieceSize: MiB })) {
      maxInFlight = Math.max(maxInFlight, disk.inFlight);
      assert.ok(piece.data.equals(await disk.read(piece.offset, piece.data.length)));
      pieces.push({ offset: piece.offset, length: piece.data.length });
    }
    const second = ranges[1]!;
    const expected = [
      { offset: 0, length: 100 },
      ...Array.from({ length: 11 }, (_, i) => ({
        offset: second.offset + i * MiB,
        length: Math.min(MiB, second.length - i * MiB),
      })),
      { offset: 17 * MiB, length: 64 * KiB },
      { offset: SIZE - 1, length: 1 },
    ];
    assert.deepEqual(pieces, expected);
    assert.ok(maxInFlight > 1, 'reads ahead of the consumer');

    // Breaking out early leaves nothing in flight; a bad range fails the generator where it is reached.
    for await (const _ of disk.readExtents(ranges)) break;
    assert.equal(disk.inFlight, 0);
    await assert.rejects(async () => {
      for await (const _ of disk.readExtents([
        { offset: 0, length: 10 },
        { offset: SIZE, length: 1 },
      ])) {
        /* drain */
      }
    }, RangeError);
  });

  test('a write to the read-only export fails with NbdError EPERM and the connection stays usable', async () => {
    const ro = await NbdClient.connect({ path: daemon!.socket, exportName: 'ro' });
    try {
      const expected = await disk.read(16 * MiB + 12345, 64 * KiB);
      const reads = [ro.read(16 * MiB + 12345, 64 * KiB), ro.read(0, 4096)];
      await assert.rejects(ro.write(4096, randomBytes(8192)), (e: unknown) => {
        assert.ok(e instanceof NbdError, String(e));
        assert.equal(e.code, 'EPERM');
        assert.equal(e.errno, 1);
        assert.equal(e.command, 'WRITE');
        assert.equal(e.offset, 4096);
        assert.equal(e.length, 8192);
        // Refused by the client (QEMU 7.2 itself would answer EINVAL "Export is read-only").
        assert.equal(e.local, true);
        assert.match(e.message, /NBD WRITE of 8192 bytes at offset 4096 on export 'ro' refused without sending: EPERM/);
        return true;
      });
      for (const attempt of [ro.writeZeroes(0, 4096), ro.trim(0, 4096)]) {
        await assert.rejects(attempt, (e: unknown) => e instanceof NbdError && e.code === 'EPERM');
      }
      const [data] = await Promise.all(reads);
      assert.ok(data?.equals(expected), 'pipelined reads around the failed write succeed');
      assert.ok((await ro.read(16 * MiB + 12345, 64 * KiB)).equals(expected), 'the connection still works');
      await ro.flush();
      assert.equal(ro.closed, false);
    } finally {
      await ro.close();
    }
  });

  test('server errors (EIO on READ and BLOCK_STATUS, ENOSPC on WRITE) become NbdError; the connection stays usable', async () => {
    const faulty = await NbdClient.connect({
      path: daemon!.socket,
      exportName: 'faulty',
      metaContexts: [BASE_ALLOCATION],
    });
    try {
      // Data where the read fault sits: over a hole QEMU would not read the file at all.
      await disk.write(FAULT.read, randomBytes(64 * KiB));
      // blkdebug arms its read rules on the first read it sees.
      const expected = await disk.read(0, 640 * KiB);
      assert.ok((await faulty.read(0, 64 * KiB)).equals(expected.subarray(0, 64 * KiB)));

      const around = Array.from({ length: 10 }, (_, i) => faulty.read(i * 64 * KiB, 64 * KiB));
      await assert.rejects(faulty.read(FAULT.blockStatus - 10, 20), (e: unknown) => {
        assert.ok(e instanceof NbdError, String(e));
        assert.equal(e.code, 'EIO');
        assert.equal(e.command, 'READ');
        assert.equal(e.offset, FAULT.blockStatus - 10);
        assert.equal(e.local, false);
        assert.match(e.serverMessage ?? '', /unable to check for holes/);
        return true;
      });
      assert.ok(Buffer.concat(await Promise.all(around)).equals(expected), 'pipelined reads around it succeed');

      await assert.rejects(faulty.blockStatus(BASE_ALLOCATION, 0, SIZE), (e: unknown) => {
        assert.ok(e instanceof NbdError && e.code === 'EIO' && e.command === 'BLOCK_STATUS', String(e));
        return true;
      });
      assertContiguous(await faulty.blockStatus(BASE_ALLOCATION, 0, MiB), 0, MiB);

      await assert.rejects(faulty.write(FAULT.write, randomBytes(4096)), (e: unknown) => {
        assert.ok(e instanceof NbdError, String(e));
        assert.equal(e.code, 'ENOSPC');
        assert.equal(e.command, 'WRITE');
        assert.match(e.message, /NBD WRITE of 4096 bytes at offset 96468992 on export 'faulty' failed: ENOSPC/);
        return true;
      });
      await assert.rejects(faulty.writeZeroes(FAULT.write, 4096), (e: unknown) => {
        assert.ok(e instanceof NbdError && e.code === 'ENOSPC' && e.command === 'WRITE_ZEROES', String(e));
        return true;
      });
      const data = randomBytes(4096);
      await faulty.write(FAULT.write + MiB, data);
      assert.ok((await faulty.read(FAULT.write + MiB, 4096)).equals(data), 'still usable after the errors');
      assert.equal(faulty.closed, false);

      // A failing data read is different: QEMU 7.2 drops the client instead of sending an error chunk. Whatever the
      // server does, the request must fail clearly and nothing may hang.
      const settled = await Promise.allSettled([faulty.read(0, 4096), faulty.read(FAULT.read, 4096)]);
      const broken = settled[1];
      const reason: unknown = broken?.status === 'rejected' ? broken.reason : undefined;
      assert.ok(
        reason instanceof NbdConnectionError || (reason instanceof NbdError && reason.code === 'EIO'),
        String(reason),
      );
    } finally {
      faulty.destroy();
    }
  });

  test('an unknown export name is refused with an error naming it', async () => {
    for (const metaContexts of [[], [BASE_ALLOCATION]]) {
      await assert.rejects(
        NbdClient.connect({ path: daemon!.socket, exportName: 'no-such-disk', metaContexts }),
        (e: unknown) => {
          assert.ok(e instanceof NbdNegotiationError, String(e));
          assert.equal(e.reply, 'NBD_REP_ERR_UNKNOWN');
          assert.equal(e.exportName, 'no-such-disk');
          assert.match(e.message, /refused export 'no-such-disk': no such export/);
          return true;
        },
      );
    }
    await assert.rejects(
      NbdClient.connect({ path: join(dir, 'missing.sock'), exportName: 'disk0' }),
      (e: unknown) =>
        e instanceof NbdConnectionError && /cannot connect to NBD server at unix:.*ENOENT/.test(e.message),
    );
  });

  test('requests past the end of the export are refused locally, before sending', async () => {
    const refusedLocally = (e: unknown): boolean => {
      assert.ok(e instanceof RangeError, String(e));
      assert.match(e.message, /past the end of export 'disk0' \(size 100663296\); refused without sending/);
      return true;
    };
    await assert.rejects(disk.read(SIZE - 10, 11), refusedLocally);
    await assert.rejects(disk.write(SIZE, Buffer.alloc(1)), refusedLocally);
    await assert.rejects(disk.writeZeroes(SIZE - MiB, 2 * MiB), refusedLocally);
    await assert.rejects(disk.blockStatus(BASE_ALLOCATION, 0, SIZE + 1), refusedLocally);
    await assert.rejects(disk.read(-1, 1), RangeError);
    assert.equal(disk.inFlight, 0);
    assert.equal((await disk.read(SIZE - 10, 10)).length, 10, 'the last bytes are readable');
  });

  test('a 4 KiB minimum block size: unaligned reads are widened, unaligned writes refused locally', async () => {
    const aligned = await NbdClient.connect({ path: daemon!.socket, exportName: 'aligned' });
    try {
      assert.equal(aligned.info.minBlockSize, 4096);
      const expected = await disk.read(3, 70_000);
      assert.ok((await aligned.read(3, 70_000)).equals(expected));
      await assert.rejects(aligned.write(4095, Buffer.alloc(4096)), /not aligned to the 4096-byte minimum block size/);
      const data = randomBytes(8192);
      await aligned.write(58 * MiB, data);
      assert.ok((await disk.read(58 * MiB, 8192)).equals(data));
    } finally {
      await aligned.close();
    }
  });

  test('close() waits for requests in flight, then disconnects; later requests reject at once', async () => {
    const client = await NbdClient.connect({ path: daemon!.socket, exportName: 'disk0' });
    const reads = Array.from({ length: 20 }, (_, i) => client.read(i * MiB, MiB));
    await client.close();
    assert.equal((await Promise.all(reads)).length, 20, 'every read in flight completed');
    assert.equal(client.closed, true);
    await assert.rejects(
      client.read(0, 1),
      (e: unknown) => e instanceof NbdConnectionError && /closed/.test(e.message),
    );
    await client.close();
  });
});

describe('NBD client reading dirty bitmaps exported by qemu-storage-daemon', () => {
  const SIZE = 32 * MiB;
  const GRANULARITY = 64 * KiB;
  let dir = '';
  let daemon: Daemon | undefined;
  let backup: NbdClient;
  const model = Buffer.alloc(SIZE);
  type Write = { offset: number; length: number; pattern?: number };
  const beforeBitmaps: Write[] = [
    { offset: 0, length: 4 * MiB, pattern: 0x11 },
    { offset: 12 * MiB, length: 2 * MiB, pattern: 0x12 },
  ];
  // While only b0 is enabled.
  const first: Write[] = [
    { offset: 100 * KiB + 7, length: 3, pattern: 0x21 },
    { offset: MiB - 1, length: 2, pattern: 0x22 }, // straddles a granule boundary
    { offset: 5 * MiB, length: 200 * KiB, pattern: 0x23 },
    { offset: 20 * MiB + 3 * GRANULARITY, length: GRANULARITY, pattern: 0x24 },
  ];
  // While both b0 and b1 are enabled; the one without a pattern writes zeroes.
  const second: Write[] = [
    { offset: 9 * MiB + 1000, length: 70_000, pattern: 0x31 },
    { offset: 12 * MiB, length: MiB },
    { offset: SIZE - 4096, length: 4096, pattern: 0x32 },
  ];

  const qemuIo = async (image: string, writes: Write[]): Promise<void> => {
    const commands = writes.flatMap((w) => [
      '-c',
      w.pattern === undefined ? `write -z ${w.offset} ${w.length}` : `write -P ${w.pattern} ${w.offset} ${w.length}`,
    ]);
    await exec('qemu-io', ['-f', 'qcow2', ...commands, image]);
    for (const w of writes) model.fill(w.pattern ?? 0, w.offset, w.offset + w.length);
  };

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'pf-nbd-bitmap-'));
    const image = join(dir, 'vm.qcow2');
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(SIZE)]);
    await qemuIo(image, beforeBitmaps);
    await exec('qemu-img', ['bitmap', '--add', image, 'b0']);
    await qemuIo(image, first);
    await exec('qemu-img', ['bitmap', '--add', image, 'b1']);
    await qemuIo(image, second);
    // QEMU exports only disabled bitmaps from a writable node (and a pull backup freezes them anyway).
    await exec('qemu-img', ['bitmap', '--disable', image, 'b0']);
    await exec('qemu-img', ['bitmap', '--disable', image, 'b1']);
    daemon = await startDaemon(dir, qcow2(dir, 'vm'), [
      'type=nbd,id=backup0,node-name=vm,name=backup,writable=off,bitmaps.0=b0,bitmaps.1=b1',
    ]);
    backup = await NbdClient.connect({
      path: daemon.socket,
      exportName: 'backup',
      metaContexts: [BASE_ALLOCATION, dirtyBitmapContext('b0'), dirtyBitmapContext('b1')],
    });
  });

  after(async () => {
    backup?.destroy();
    await daemon?.kill();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  test('each exported bitmap is granted as its own meta context', () => {
    assert.equal(backup.readOnly, true);
    const ids = [BASE_ALLOCATION, 'qemu:dirty-bitmap:b0', 'qemu:dirty-bitmap:b1'].map((c) =>
      backup.metaContexts.get(c),
    );
    assert.ok(ids.every((id) => id !== undefined));
    assert.equal(new Set(ids).size, 3, 'distinct context ids');
  });

  test('BLOCK_STATUS on qemu:dirty-bitmap:b0 returns exactly the 64 KiB granules written while it was enabled', async () => {
    const extents = await backup.blockStatus(dirtyBitmapContext('b0'), 0, SIZE);
    assertContiguous(extents, 0, SIZE);
    const dirty = extents.filter((e) => e.flags & STATE_DIRTY);
    assert.deepEqual(dirty, granules([...first, ...second], GRANULARITY));
    assert.ok(extents.every((e) => e.flags === 0 || e.flags === STATE_DIRTY));
    assert.deepEqual(
      normalise(extents),
      normalise(await nbdinfoMap(daemon!.socket, 'backup', dirtyBitmapContext('b0'))),
    );
  });

  test('a bitmap added later (b1) holds only the later writes; sub-range queries are clipped', async () => {
    const extents = await backup.blockStatus(dirtyBitmapContext('b1'), 0, SIZE);
    assertContiguous(extents, 0, SIZE);
    assert.deepEqual(
      extents.filter((e) => e.flags & STATE_DIRTY),
      granules(second, GRANULARITY),
    );

    const offset = 9 * MiB + 5;
    const sub = await backup.blockStatus(dirtyBitmapContext('b1'), offset, 200 * KiB);
    const dirtyEnd = 9 * MiB + 2 * GRANULARITY;
    assert.deepEqual(sub, [
      { offset, length: dirtyEnd - offset, flags: STATE_DIRTY },
      { offset: dirtyEnd, length: offset + 200 * KiB - dirtyEnd, flags: 0 },
    ]);
  });

  test('copying the dirty extents with readExtents reproduces the written data; zeroed ones are zero in base:allocation', async () => {
    const dirty = (await backup.blockStatus(dirtyBitmapContext('b0'), 0, SIZE)).filter((e) => e.flags & STATE_DIRTY);
    let copied = 0;
    for await (const { offset, data } of backup.readExtents(dirty, { pieceSize: 128 * KiB })) {
      assert.ok(data.equals(model.subarray(offset, offset + data.length)), `piece at ${offset}`);
      copied += data.length;
    }
    assert.equal(
      copied,
      dirty.reduce((sum, e) => sum + e.length, 0),
    );

    // The adapter's way to skip reading zeroes: the zeroed dirty megabyte is ZERO in base:allocation.
    const allocation = await backup.blockStatus(BASE_ALLOCATION, 12 * MiB, MiB);
    assertContiguous(allocation, 12 * MiB, MiB);
    assert.ok(allocation.every((e) => e.flags & STATE_ZERO));
    const data = await backup.blockStatus(BASE_ALLOCATION, 13 * MiB, MiB);
    assert.ok(
      data.every((e) => (e.flags & STATE_ZERO) === 0),
      'the unzeroed rest of that write is data',
    );
  });
});

describe('NBD client when the server dies', () => {
  let dir = '';
  let daemon: Daemon | undefined;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'pf-nbd-kill-'));
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', join(dir, 'disk0.qcow2'), String(64 * MiB)]);
    daemon = await startDaemon(dir, qcow2(dir, 'disk0'), ['type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on']);
  });

  after(async () => {
    await daemon?.kill();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  test('killing the daemon mid-flight rejects every pending and queued request with NbdConnectionError', async () => {
    const client = await NbdClient.connect({
      path: daemon!.socket,
      exportName: 'disk0',
      metaContexts: [BASE_ALLOCATION],
    });
    await client.write(0, randomBytes(32 * MiB));
    const requests: Promise<unknown>[] = [
      ...Array.from({ length: 32 }, (_, i) => client.read((i % 8) * 4 * MiB, 4 * MiB)),
      ...Array.from({ length: 8 }, (_, i) => client.write(32 * MiB + i * MiB, randomBytes(MiB))),
      client.blockStatus(BASE_ALLOCATION, 0, 64 * MiB),
      client.flush(),
    ];
    await new Promise((resolve) => setImmediate(resolve));
    assert.equal(client.inFlight, 8);
    daemon!.crash();

    const settled = await Promise.race([Promise.allSettled(requests), delay(5000, 'timeout' as const, { ref: false })]);
    assert.notEqual(settled, 'timeout', 'every request settles');
    if (settled === 'timeout') return;
    const rejections = settled.flatMap((s) => (s.status === 'rejected' ? [s.reason as unknown] : []));
    assert.ok(rejections.length > 0);
    for (const e of rejections) {
      assert.ok(e instanceof NbdConnectionError, String(e));
      assert.match(
        e.message,
        /did not complete: NBD (server at unix:.* closed the connection|connection to .* failed)/,
      );
    }
    assert.equal(client.closed, true);
    await assert.rejects(client.read(0, 1), NbdConnectionError);
    await client.close();
  });
});

describe('NBD client over TCP, and against servers that misbehave', () => {
  let dir = '';
  let daemon: Daemon | undefined;
  let port = 0;
  const fakes: Server[] = [];

  /** A TCP server that accepts connections and does `onConnection` with them; its port. */
  async function fakeServer(onConnection: (socket: Socket) => void): Promise<number> {
    const server = createServer(onConnection);
    fakes.push(server);
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return (server.address() as AddressInfo).port;
  }

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'pf-nbd-tcp-'));
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', join(dir, 'disk0.qcow2'), String(16 * MiB)]);
    // A port that was free a moment ago; QEMU cannot report the one it picks for port 0.
    const probe = createServer();
    await new Promise<void>((resolve) => probe.listen(0, '127.0.0.1', resolve));
    port = (probe.address() as AddressInfo).port;
    await new Promise((resolve) => probe.close(resolve));
    daemon = await startDaemon(dir, qcow2(dir, 'disk0'), ['type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on'], {
      tcpPort: port,
    });
  });

  after(async () => {
    for (const server of fakes) server.close();
    await daemon?.kill();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  test('connects over TCP host:port and moves data', async () => {
    const client = await NbdClient.connect({
      host: '127.0.0.1',
      port,
      exportName: 'disk0',
      metaContexts: [BASE_ALLOCATION],
    });
    try {
      assert.equal(client.address, `127.0.0.1:${port}`);
      assert.equal(client.size, 16 * MiB);
      const data = randomBytes(3 * MiB + 1);
      await client.write(MiB + 1, data, { fua: true });
      assert.ok((await client.read(MiB + 1, data.length)).equals(data));
      const extents = await client.blockStatus(BASE_ALLOCATION, 0, 16 * MiB);
      assertContiguous(extents, 0, 16 * MiB);
      assert.deepEqual(flagsOver(extents, 0, MiB), [STATE_HOLE | STATE_ZERO]);
    } finally {
      await client.close();
    }
  });

  test('a silent server is abandoned when the AbortSignal fires; a non-NBD server is refused clearly', async () => {
    await assert.rejects(
      NbdClient.connect({ host: '127.0.0.1', port, signal: AbortSignal.abort() }),
      (e: unknown) => e instanceof NbdConnectionError && /aborted/.test(e.message),
    );

    const silent = await fakeServer(() => {});
    const started = Date.now();
    await assert.rejects(
      NbdClient.connect({ host: '127.0.0.1', port: silent, signal: AbortSignal.timeout(100) }),
      (e: unknown) =>
        e instanceof NbdConnectionError && /connecting to NBD server at 127\.0\.0\.1:\d+ aborted/.test(e.message),
    );
    assert.ok(Date.now() - started < 2000);

    const chatty = await fakeServer((socket) => socket.end('SSH-2.0-OpenSSH_9.2\r\n'));
    await assert.rejects(
      NbdClient.connect({ host: '127.0.0.1', port: chatty }),
      (e: unknown) =>
        e instanceof NbdConnectionError && /broke the protocol during the handshake: not an NBD server/.test(e.message),
    );

    const hangUp = await fakeServer((socket) => socket.destroy());
    await assert.rejects(
      NbdClient.connect({ host: '127.0.0.1', port: hangUp }),
      (e: unknown) => e instanceof NbdConnectionError && /closed the connection during the handshake/.test(e.message),
    );
  });
});
