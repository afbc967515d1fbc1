// Pure arithmetic over extents: batching for large I/O, resuming after a crash, and digest comparison.
import { BLOCK_SIZE, type Extent } from '../hypervisor/port';

export const extentBytes = (extents: readonly Extent[]): number => extents.reduce((n, e) => n + e.length, 0);

/** The extents still to copy when everything below `resumeOffset` is already on the replica. */
export function extentsFrom(extents: readonly Extent[], resumeOffset: number): Extent[] {
  const out: Extent[] = [];
  for (const e of extents) {
    const end = e.offset + e.length;
    if (end <= resumeOffset) continue;
    const start = Math.max(e.offset, resumeOffset);
    out.push({ offset: start, length: end - start });
  }
  return out;
}

/** Groups extents (ascending) into batches of at most `maxBytes`, splitting long extents at block boundaries. */
export function batchExtents(extents: readonly Extent[], maxBytes: number): Extent[][] {
  const limit = Math.max(BLOCK_SIZE, maxBytes - (maxBytes % BLOCK_SIZE));
  const batches: Extent[][] = [];
  let batch: Extent[] = [];
  let size = 0;
  for (const e of extents) {
    let offset = e.offset;
    let left = e.length;
    while (left > 0) {
      if (size === limit) {
        batches.push(batch);
        batch = [];
        size = 0;
      }
      const take = Math.min(left, limit - size);
      batch.push({ offset, length: take });
      size += take;
      offset += take;
      left -= take;
    }
  }
  if (batch.length > 0) batches.push(batch);
  return batches;
}

/** Blocks whose digests differ, as merged extents; `startBlock` is the index of the first digest. */
export function differingExtents(startBlock: number, source: readonly string[], replica: readonly string[]): Extent[] {
  const out: Extent[] = [];
  for (let i = 0; i < source.length; i++) {
    if (source[i] === replica[i]) continue;
    const offset = (startBlock + i) * BLOCK_SIZE;
    const last = out.at(-1);
    if (last && last.offset + last.length === offset) last.length += BLOCK_SIZE;
    else out.push({ offset, length: BLOCK_SIZE });
  }
  return out;
}

/** The union of two ascending extent lists, merged where they touch or overlap. */
export function unionExtents(a: readonly Extent[], b: readonly Extent[]): Extent[] {
  const all = [...a, ...b].sort((x, y) => x.offset - y.offset);
  const out: Extent[] = [];
  for (const e of all) {
    const last = out.at(-1);
    if (last && e.offset <= last.offset + last.length) {
      last.length = Math.max(last.length, e.offset + e.length - last.offset);
    } else {
      out.push({ ...e });
    }
  }
  return out;
}
