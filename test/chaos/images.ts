// Whole-disk images of source VMs and of replica points, as digests: what the invariants compare byte for byte.
import { createHash, randomUUID } from 'node:crypto';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { replicaNameOf } from '../../src/activities/inventory';
import type { ExtentData, HypervisorPort } from '../../src/hypervisor/port';
import { assemble } from '../lab/helpers';

const run = promisify(execFile);

export interface DiskShape {
  id: string;
  size: number;
}

/** The digest of a VM's disks, each read whole (the disk's id, then its bytes). */
export async function digestOf(disks: readonly DiskShape[], read: (d: DiskShape) => Promise<Buffer>): Promise<string> {
  const hash = createHash('sha256');
  for (const d of disks) hash.update(d.id).update(await read(d));
  return hash.digest('hex');
}

const whole = (d: DiskShape, extents: AsyncIterable<ExtentData>): Promise<Buffer> => assemble(extents, d.size);

/** The source VM's disks at one of its checkpoints, or now (through a checkpoint of the suite's own). */
export async function sourceDigest(
  port: HypervisorPort,
  host: string,
  vm: string,
  disks: readonly DiskShape[],
  checkpointId?: string,
): Promise<string> {
  const ref = { host, vm };
  const own = checkpointId === undefined ? `chaos-${randomUUID()}` : undefined;
  if (own) await port.createCheckpoint(ref, own);
  try {
    return await digestOf(disks, (d) =>
      whole(d, port.readExtents({ ...ref, disk: d.id }, checkpointId ?? own!, [{ offset: 0, length: d.size }])),
    );
  } finally {
    if (own) await port.deleteCheckpoint(ref, own).catch(() => undefined);
  }
}

/** A replica's disks as one of its restore points shows them. */
export const pointDigest = (
  port: HypervisorPort,
  drHost: string,
  vm: string,
  disks: readonly DiskShape[],
  pointId: string,
): Promise<string> =>
  digestOf(disks, (d) =>
    whole(
      d,
      port.readReplicaExtents({ host: drHost, replica: replicaNameOf(vm), disk: d.id }, { pointId }, [
        { offset: 0, length: d.size },
      ]),
    ),
  );

/** A disk image file read whole as the guest sees it (qcow2 chains followed), without asking its host. */
export async function imageFileBytes(image: string): Promise<Buffer> {
  const dir = await mkdtemp(join(tmpdir(), 'pf-chaos-image-'));
  try {
    const raw = join(dir, 'disk.raw');
    await run('qemu-img', ['convert', '-U', '-O', 'raw', image, raw]);
    return await readFile(raw);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
