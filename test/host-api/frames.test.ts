import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { blockDigestBytes, DIGEST_BYTES, digestsOfBlocks, verifyStored } from '../../src/host-api/digests';
import {
  decodeFrames,
  encodeFrames,
  FrameError,
  framedLength,
  FrameReader,
  type DigestsFrame,
  type FramePiece,
} from '../../src/host-api/frames';
import type { ExtentData } from '../../src/hypervisor/port';

const BLOCK = 65536;

async function* from<T>(items: T[]): AsyncGenerator<T> {
  for (const i of items) yield await Promise.resolve(i);
}

async function encode(extents: ExtentData[]): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const p of encodeFrames(from(extents))) parts.push(p);
  return Buffer.concat(parts);
}

/** Cuts a byte stream at random points, as a socket would. */
function chop(bytes: Buffer): Buffer[] {
  const out: Buffer[] = [];
  for (let at = 0; at < bytes.length;) {
    const n = 1 + Math.floor(Math.random() * 100_000);
    out.push(bytes.subarray(at, at + n));
    at += n;
  }
  return out;
}

test('frames survive arbitrary chunking, whole or in pieces sliced from the received chunks', async () => {
  const extents = [
    { offset: 0, data: randomBytes(3 * BLOCK) },
    { offset: 10 * BLOCK, data: randomBytes(BLOCK) },
    { offset: 64 * BLOCK, data: randomBytes(40 * BLOCK) },
  ];
  const wire = await encode(extents);
  const whole: ExtentData[] = [];
  for await (const e of decodeFrames(from(chop(wire)))) whole.push(e);
  assert.deepEqual(
    whole.map((e) => [e.offset, e.data.equals(extents.find((x) => x.offset === e.offset)!.data)]),
    extents.map((e) => [e.offset, true]),
  );

  // Pieces of at most 4 blocks, made of slices of the chunks as they were pushed (nothing copied).
  const reader = new FrameReader(4 * BLOCK);
  const rebuilt = new Map<number, Buffer>();
  for (const chunk of chop(wire))
    for (const p of reader.push(chunk)) {
      assert.ok(p.length <= 4 * BLOCK);
      assert.equal(
        p.length,
        p.parts.reduce((n, b) => n + b.length, 0),
      );
      assert.ok(p.parts.every((b) => b.buffer === wire.buffer));
      rebuilt.set(p.offset, Buffer.concat(p.parts));
    }
  reader.end();
  for (const e of extents)
    for (let at = 0; at < e.data.length; at += 4 * BLOCK)
      assert.ok(rebuilt.get(e.offset + at)!.equals(e.data.subarray(at, at + 4 * BLOCK)), `piece at ${e.offset + at}`);
  assert.throws(() => reader.push(Buffer.alloc(1)), /after the END frame/);
});

test('a stream cut anywhere before the END frame is an error, never a silent short read', async () => {
  const wire = await encode([{ offset: 0, data: randomBytes(2 * BLOCK) }]);
  for (const cut of [0, 10, 24, 24 + BLOCK, wire.length - 1]) {
    await assert.rejects(async () => {
      for await (const _ of decodeFrames(from([wire.subarray(0, cut)])));
    }, FrameError);
  }
  const garbage = Buffer.from(wire);
  garbage.writeUInt32BE(0xdeadbeef, 0);
  await assert.rejects(async () => {
    for await (const _ of decodeFrames(from([garbage])));
  }, /magic/);
});

test('a read with digests: a DIGESTS frame after each data frame, the digest of each block as it was sent', async () => {
  const extents = [
    { offset: 0, data: randomBytes(3 * BLOCK) },
    { offset: 64 * BLOCK, data: randomBytes(40 * BLOCK) },
  ];
  const parts: Buffer[] = [];
  for await (const p of encodeFrames(from(extents), { digests: true })) parts.push(p);
  const wire = Buffer.concat(parts);
  assert.equal(
    wire.length,
    framedLength(
      extents.map((e) => ({ offset: e.offset, length: e.data.length })),
      { digests: true },
    ),
  );

  const got: DigestsFrame[] = [];
  const pieces: FramePiece[] = [];
  const reader = new FrameReader(4 * BLOCK, (d) => got.push(d));
  for (const chunk of chop(wire)) pieces.push(...reader.push(chunk));
  reader.end();
  assert.deepEqual(
    got.map((d) => [d.frame, d.offset, d.digests.length]),
    [
      [0, 0, 3 * DIGEST_BYTES],
      [1, 64 * BLOCK, 40 * DIGEST_BYTES],
    ],
  );
  for (const [i, e] of extents.entries())
    for (let b = 0; b < e.data.length / BLOCK; b++)
      assert.ok(
        got[i]!.digests.subarray(b * DIGEST_BYTES, (b + 1) * DIGEST_BYTES).equals(
          blockDigestBytes(e.data.subarray(b * BLOCK, (b + 1) * BLOCK)),
        ),
        `digest of block ${b} of frame ${i}`,
      );
  for (const e of extents) {
    const of = pieces.filter((p) => p.offset >= e.offset && p.offset < e.offset + e.data.length);
    assert.ok(Buffer.concat(of.flatMap((p) => p.parts)).equals(e.data), `the data at ${e.offset}, whole`);
  }

  // A receiver that takes no digests refuses them; decoding passes them over.
  assert.throws(() => new FrameReader().push(wire), /unknown frame kind 3/);
  const decoded: ExtentData[] = [];
  for await (const e of decodeFrames(from(chop(wire)))) decoded.push(e);
  assert.deepEqual(
    decoded.map((e) => e.data.length),
    extents.map((e) => e.data.length),
  );
});

test('a write’s proof: the blocks read back against the source’s digests, those that differ as merged extents', async () => {
  const source = randomBytes(8 * BLOCK);
  const stored = Buffer.from(source);
  stored[2 * BLOCK + 7]! ^= 1;
  stored[3 * BLOCK]! ^= 1;
  stored[6 * BLOCK + BLOCK - 1]! ^= 1;
  const sent = [
    { offset: 0, digests: digestsOfBlocks(source.subarray(0, 4 * BLOCK)) },
    { offset: 4 * BLOCK, digests: digestsOfBlocks(source.subarray(4 * BLOCK)) },
  ];
  const proof = await verifyStored(sent, async (e) => stored.subarray(e.offset, e.offset + e.length));
  assert.deepEqual(proof, {
    blocksCompared: 8,
    mismatched: [
      { offset: 2 * BLOCK, length: 2 * BLOCK },
      { offset: 6 * BLOCK, length: BLOCK },
    ],
  });
  assert.deepEqual(await verifyStored(sent, async (e) => source.subarray(e.offset, e.offset + e.length)), {
    blocksCompared: 8,
    mismatched: [],
  });
  assert.throws(() => digestsOfBlocks(Buffer.alloc(BLOCK + 1)), /not whole blocks/);
});
