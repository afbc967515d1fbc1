// Reads through a stack of layers: for each block the topmost layer holding it wins, else the base.
// Runs of contiguous blocks served by one layer become one read (I/O batched to ≥1 MiB).

import { BLOCK_SIZE } from '../../src/hypervisor/port';
import type { Layer } from './layer';
import { blockDigest } from '../../src/host-api/digests';

export interface View {
  /** Topmost first; the base is not included. */
  layers: Layer[];
  base: Layer;
}

function sourceOf(view: View, block: number): Layer {
  for (const layer of view.layers) if (layer.has(block)) return layer;
  return view.base;
}

export async function readView(view: View, offset: number, length: number, into?: Buffer): Promise<Buffer> {
  const out = into ?? Buffer.allocUnsafe(length);
  const first = offset / BLOCK_SIZE;
  const count = length / BLOCK_SIZE;
  let runStart = 0;
  let runLayer = sourceOf(view, first);
  for (let i = 1; i <= count; i++) {
    const layer = i < count ? sourceOf(view, first + i) : null;
    if (layer !== runLayer) {
      await runLayer.read((first + runStart) * BLOCK_SIZE, (i - runStart) * BLOCK_SIZE, out, runStart * BLOCK_SIZE);
      runStart = i;
      if (layer) runLayer = layer;
    }
  }
  return out;
}

/** True if some layer of the view (base included) holds data for the block. */
export function viewHas(view: View, block: number): boolean {
  return view.base.has(block) || view.layers.some((l) => l.has(block));
}

export function viewAllocatedBlocks(view: View): number[] {
  const all = new Set<number>(view.base.present);
  for (const l of view.layers) for (const b of l.present) all.add(b);
  return [...all].sort((a, b) => a - b);
}

const ZERO_DIGEST = blockDigest(Buffer.alloc(BLOCK_SIZE));
const DIGEST_BATCH_BLOCKS = 64;

export async function digestView(view: View, startBlock: number, count: number): Promise<string[]> {
  const out: string[] = [];
  let b = startBlock;
  const end = startBlock + count;
  while (b < end) {
    if (!viewHas(view, b)) {
      out.push(ZERO_DIGEST);
      b++;
      continue;
    }
    let runEnd = b + 1;
    while (runEnd < end && runEnd - b < DIGEST_BATCH_BLOCKS && viewHas(view, runEnd)) runEnd++;
    const data = await readView(view, b * BLOCK_SIZE, (runEnd - b) * BLOCK_SIZE);
    for (let i = 0; i < runEnd - b; i++) out.push(blockDigest(data.subarray(i * BLOCK_SIZE, (i + 1) * BLOCK_SIZE)));
    b = runEnd;
  }
  return out;
}
