import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { decodeFrames, encodeFrames, FrameError, FrameReader } from '../../src/host-api/frames';
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
