// Block digests as every host computes them: the orchestrator compares a source's with a replica's, which may live
// on hosts of different kinds, so the algorithm is part of the host API.
import { createHash } from 'node:crypto';
import {
  BLOCK_SIZE,
  type BlockDigests,
  type Extent,
  type ExtentData,
  type WriteVerification,
} from '../hypervisor/port';

export const DIGEST_ALGORITHM = 'sha256-128';

/** Bytes of one block's digest. */
export const DIGEST_BYTES = 16;

/** The first 128 bits of the SHA-256 of one BLOCK_SIZE block, in hex. */
export function blockDigest(block: Buffer): string {
  return blockDigestBytes(block).toString('hex');
}

/** The first 128 bits of the SHA-256 of one BLOCK_SIZE block. */
export function blockDigestBytes(block: Buffer): Buffer {
  return createHash('sha256').update(block).digest().subarray(0, DIGEST_BYTES);
}

/** The digests of whole blocks, one after another (DIGEST_BYTES each). */
export function digestsOfBlocks(data: Buffer): Buffer {
  if (data.length % BLOCK_SIZE !== 0) throw new Error(`${data.length} bytes are not whole blocks of ${BLOCK_SIZE}`);
  const out = Buffer.allocUnsafe((data.length / BLOCK_SIZE) * DIGEST_BYTES);
  for (let b = 0; b * BLOCK_SIZE < data.length; b++)
    blockDigestBytes(data.subarray(b * BLOCK_SIZE, (b + 1) * BLOCK_SIZE)).copy(out, b * DIGEST_BYTES);
  return out;
}

/** The digests of consecutive block data read from `startBlock` on (a host's answer to a digests request). */
export async function digestsOf(pieces: AsyncIterable<ExtentData>, startBlock: number): Promise<BlockDigests> {
  const digests: string[] = [];
  for await (const piece of pieces)
    for (let at = 0; at < piece.data.length; at += BLOCK_SIZE)
      digests.push(blockDigest(piece.data.subarray(at, at + BLOCK_SIZE)));
  return { algorithm: DIGEST_ALGORITHM, startBlock, digests };
}

/**
 * A write's proof: each range the source sent digests for is read back from where it was stored (after its flush)
 * and each block's digest compared; blocks that differ come back as extents.
 */
export async function verifyStored(
  expected: readonly { offset: number; digests: Buffer }[],
  readBack: (extent: Extent) => Promise<Buffer>,
): Promise<WriteVerification> {
  const mismatched: Extent[] = [];
  let blocksCompared = 0;
  for (const { offset, digests } of expected) {
    const blocks = digests.length / DIGEST_BYTES;
    const stored = digestsOfBlocks(await readBack({ offset, length: blocks * BLOCK_SIZE }));
    for (let b = 0; b < blocks; b++) {
      blocksCompared++;
      const at = b * DIGEST_BYTES;
      if (stored.subarray(at, at + DIGEST_BYTES).equals(digests.subarray(at, at + DIGEST_BYTES))) continue;
      const blockOffset = offset + b * BLOCK_SIZE;
      const last = mismatched.at(-1);
      if (last && last.offset + last.length === blockOffset) last.length += BLOCK_SIZE;
      else mismatched.push({ offset: blockOffset, length: BLOCK_SIZE });
    }
  }
  return { blocksCompared, mismatched };
}
