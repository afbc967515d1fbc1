// Reading extents and comparing digests through the port: shared by copies, verification and failback.
import {
  BLOCK_SIZE,
  type BlockDigests,
  type BlockRange,
  type Extent,
  type ExtentPage,
  type PageRequest,
} from '../hypervisor/port';
import { differingExtents } from './copy-plan';

/** Extents are listed a page at a time by hosts; an activity wants the whole (bounded, never in a payload) list. */
export async function allPages(fetchPage: (page: PageRequest) => Promise<ExtentPage>): Promise<Extent[]> {
  const extents: Extent[] = [];
  let cursor: string | undefined;
  do {
    const page = await fetchPage({ cursor, limit: 10_000 });
    extents.push(...page.extents);
    cursor = page.nextCursor;
  } while (cursor);
  return extents;
}

/** Digests of one side's blocks: a source checkpoint, a replica view, a production VM. */
export type DigestReader = (range: BlockRange) => Promise<BlockDigests>;

/** Digests are compared a gigabyte of blocks at a time. */
const DIGEST_BLOCKS = 16384;
/** Changed blocks closer than this are compared in one request: a few more digests cost less than a round trip. */
const COALESCE_BLOCKS = 64;

/** Block ranges covering the extents, neighbours within COALESCE_BLOCKS merged. */
function coveringRanges(within: readonly Extent[]): { first: number; end: number }[] {
  const ranges: { first: number; end: number }[] = [];
  for (const e of within) {
    const first = e.offset / BLOCK_SIZE;
    const end = (e.offset + e.length) / BLOCK_SIZE;
    const last = ranges.at(-1);
    if (last && first - last.end <= COALESCE_BLOCKS) last.end = Math.max(last.end, end);
    else ranges.push({ first, end });
  }
  return ranges;
}

/** The blocks within `within` (and between its close neighbours) whose digests differ, and how many were compared. */
export async function differingBlocks(
  a: DigestReader,
  b: DigestReader,
  within: readonly Extent[],
  onCompared?: (blocks: number) => void,
): Promise<{ extents: Extent[]; blocksCompared: number }> {
  const extents: Extent[] = [];
  let blocksCompared = 0;
  for (const { first, end } of coveringRanges(within)) {
    for (let startBlock = first; startBlock < end; startBlock += DIGEST_BLOCKS) {
      const range = { startBlock, count: Math.min(DIGEST_BLOCKS, end - startBlock) };
      const [ours, theirs] = await Promise.all([a(range), b(range)]);
      extents.push(...differingExtents(startBlock, ours.digests, theirs.digests));
      blocksCompared += range.count;
      onCompared?.(range.count);
    }
  }
  return { extents, blocksCompared };
}
