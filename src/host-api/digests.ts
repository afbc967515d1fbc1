// Block digests as every host computes them: the orchestrator compares a source's with a replica's, which may live
// on hosts of different kinds, so the algorithm is part of the host API.
import { createHash } from 'node:crypto';

export const DIGEST_ALGORITHM = 'sha256-128';

/** The first 128 bits of the SHA-256 of one BLOCK_SIZE block, in hex. */
export function blockDigest(block: Buffer): string {
  return createHash('sha256').update(block).digest('hex').slice(0, 32);
}
