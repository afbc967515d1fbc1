// The guest sequence canary the host API reports for a disk: the last iteration a guest that keeps one (the project's
// test guest, kvm/guest/init.sh) finished writing, in the first 4 KiB block of its first disk. Any other guest's
// block 0 is not a canary, and reads as 0.

/** The canary is one guest block: the first of the first disk. */
export const CANARY_BYTES = 4096;
const CANARY_PREFIX = 'PFCANARY v1 seq=';

/** The sequence number in a canary block: 0 when there is none (a zeroed disk or another guest's data). */
export function parseCanary(block: Buffer): number {
  const text = block.subarray(0, 64).toString('latin1');
  if (!text.startsWith(CANARY_PREFIX)) return 0;
  const match = text.slice(CANARY_PREFIX.length).match(/^(\d+)\n/);
  if (!match) throw new Error(`corrupt canary: ${JSON.stringify(text.replace(/\0+$/, ''))}`);
  return Number(match[1]);
}
