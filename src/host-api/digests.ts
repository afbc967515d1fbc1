// Block digests as every host computes them: the orchestrator compares a source's with a replica's, which may live
// on hosts of different kinds, so the algorithm is part of the host API.
import { createHash } from 'node:crypto';
import { BLOCK_SIZE, type BlockDigests, type ExtentData } from '../hypervisor/port';

export const DIGEST_ALGORITHM = 'sha256-128';

/** The first 128 bits of the SHA-256 of one BLOCK_SIZE block, in hex. */
export function blockDigest(block: Buffer): string {
  return createHash('sha256').update(block).digest('hex').slice(0, 32);
}

/** The digests of consecutive block data read from `startBlock` on (a host's answer to a digests request). */
export async function digestsOf(pieces: AsyncIterable<ExtentData>, startBlock: number): Promise<BlockDigests> {
  const digests: string[] = [];
  for await (const piece of pieces)
    for (let at = 0; at < piece.data.length; at += BLOCK_SIZE)
      digests.push(blockDigest(piece.data.subarray(at, at + BLOCK_SIZE)));
  return { algorithm: DIGEST_ALGORITHM, startBlock, digests };
}
