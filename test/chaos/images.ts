// Whole-disk images of source VMs and of replica points, as digests: what the invariants compare byte for byte.
import { createHash, randomUUID } from 'node:crypto';
import { replicaNameOf } from '../../src/activities/inventory';
import type { HostApiHypervisor } from '../../src/hypervisor/host-api-adapter';
import type { ExtentData } from '../../src/hypervisor/port';
import { assemble } from '../lab/helpers';

export interface DiskShape {
  id: string;
  size: number;
}

async function digestOf(
  disks: readonly DiskShape[],
  read: (d: DiskShape) => AsyncIterable<ExtentData>,
): Promise<string> {
  const hash = createHash('sha256');
  for (const d of disks) {
    hash.update(d.id).update(await assemble(read(d), d.size));
  }
  return hash.digest('hex');
}

/** The source VM's disks at one of its checkpoints, or now (through a checkpoint of the suite's own). */
export async function sourceDigest(
  lab: HostApiHypervisor,
  host: string,
  vm: string,
  disks: readonly DiskShape[],
  checkpointId?: string,
): Promise<string> {
  const ref = { host, vm };
  const own = checkpointId === undefined ? `chaos-${randomUUID()}` : undefined;
  if (own) await lab.createCheckpoint(ref, own);
  try {
    return await digestOf(disks, (d) =>
      lab.readExtents({ ...ref, disk: d.id }, checkpointId ?? own!, [{ offset: 0, length: d.size }]),
    );
  } finally {
    if (own) await lab.deleteCheckpoint(ref, own).catch(() => undefined);
  }
}

/** A replica's disks as one of its restore points shows them. */
export const pointDigest = (
  lab: HostApiHypervisor,
  drHost: string,
  vm: string,
  disks: readonly DiskShape[],
  pointId: string,
): Promise<string> =>
  digestOf(disks, (d) =>
    lab.readReplicaExtents({ host: drHost, replica: replicaNameOf(vm), disk: d.id }, { pointId }, [
      { offset: 0, length: d.size },
    ]),
  );
