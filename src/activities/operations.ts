import { ApplicationFailure, Context } from '@temporalio/activity';
import type { Configuration } from '../config/schema';
import { FailureTypes, type ProxyDeclaration, type RestorePointSummary, type VmLocation } from '../contract';
import type { HostReplicaFacts } from '../domain/replica-state';
import { PointMetadata } from '../domain/restore-points';
import { NotFoundError, TrackingLostError } from '../hypervisor/errors';
import {
  BLOCK_SIZE,
  type DiskInfo,
  type Extent,
  type HypervisorPort,
  type ReplicaInfo,
  type ReplicaRef,
  type ReplicaView,
  type RestorePointKind,
  type VmRef,
} from '../hypervisor/port';
import { batchExtents, extentBytes, unionExtents } from './copy-plan';
import { allPages, differingBlocks } from './extents';
import { withHypervisorFailures } from './failures';
import { heartbeatWhile } from './heartbeat';
import { findJob, hostFactsOf, replicaNameOf, summarizePoint } from './inventory';

const BATCH_BYTES = 32 * 1024 * 1024;

/** A whole disk as one extent, for digest comparisons. */
const whole = (disk: DiskInfo): Extent => ({ offset: 0, length: disk.sizeBytes });

export interface ReplicaDescription {
  /** The production VM the replica was made from; null when it is on no production host any more. */
  source: VmRef | null;
  replica: ReplicaRef;
  disks: DiskInfo[];
  headPointId: string | null;
  /** The source reference point the head point was copied at: where production's own changes are tracked from. */
  headReferencePointId: string | null;
  restorePoints: RestorePointSummary[];
  /** What the DR host shows, checked before an operation changes anything. */
  host: HostReplicaFacts;
  /**
   * The failback-protective point the replica stopped at (off, no running layer), with the production VM and
   * reference point it was sealed for: in Failover, a failback that sealed it and was stopped before it finished
   * (terminated, its worker gone for good); the next failback resumes from it. Absent from 0.2.0 histories.
   */
  sealedProtectivePoint?: { id: string; production: VmLocation; referencePointId: string | null } | null;
  /** The job's proxies, for the operations that move data (failback). */
  proxies: string[] | 'auto';
  declaredProxies: ProxyDeclaration[];
}

function sealedProtectivePointOf(info: ReplicaInfo): ReplicaDescription['sealedProtectivePoint'] {
  const head = info.points.find((p) => p.id === info.headPointId);
  if (!head?.sealed || head.kind !== 'failback-protective' || info.hasRunningLayer || info.powerState !== 'Off')
    return null;
  const host = head.metadata[PointMetadata.productionHost];
  const vm = head.metadata[PointMetadata.productionVm];
  if (!host || !vm) return null;
  return {
    id: head.id,
    production: { host, vm },
    referencePointId: head.metadata[PointMetadata.sourceReferencePoint] ?? null,
  };
}

export interface ShipResult {
  bytesShipped: number;
  /** How production's own changes since failover were found, per disk. */
  modes: Record<string, 'tracked' | 'digest'>;
  /** What production itself changed since the replica's head was copied (tracked disks only; null: not known). */
  productionChangedBytes: number | null;
}

/** Activities of the operations that finish a failover: undo, permanent failover, failback, regular failover. */
export function createOperationActivities(port: HypervisorPort, config: Configuration) {
  async function findOnProduction(vm: string): Promise<VmRef | null> {
    for (const host of config.hosts.filter((h) => h.role === 'production')) {
      if ((await port.listVms(host.name)).some((v) => v.name === vm)) return { host: host.name, vm };
    }
    return null;
  }

  /** Blocks whose digests differ between a replica view and a production checkpoint, within `within`. */
  async function differing(
    replicaDisk: ReplicaRef & { disk: string },
    view: ReplicaView,
    productionDisk: VmRef & { disk: string },
    checkpointId: string,
    within: readonly Extent[],
    signal: AbortSignal,
  ): Promise<Extent[]> {
    const result = await differingBlocks(
      (range) => port.replicaBlockDigests(replicaDisk, view, range, { signal }),
      (range) => port.blockDigests(productionDisk, checkpointId, range, { signal }),
      within,
    );
    return result.extents;
  }

  return {
    /**
     * The replica as its DR host shows it, with the VM that runs production for it: the one its entity names
     * after a committed failback elsewhere, else the job's VM wherever it is now. The job is the one the
     * configuration puts the VM in today.
     */
    async describeReplica(input: {
      vm: string;
      job: string;
      productionVm: VmLocation | null;
    }): Promise<ReplicaDescription> {
      const job = config.jobs.find((j) => j.vms.includes(input.vm)) ?? findJob(config, input.job);
      return withHypervisorFailures(async () => {
        const replica: ReplicaRef = { host: job.targetHost, replica: replicaNameOf(input.vm) };
        const info = await port.getReplica(replica);
        const head = info.points.find((p) => p.id === info.headPointId);
        return {
          source: input.productionVm ?? (await findOnProduction(input.vm)),
          replica,
          disks: info.disks,
          headPointId: info.headPointId,
          headReferencePointId: head?.metadata[PointMetadata.sourceReferencePoint] ?? null,
          restorePoints: info.points.filter((p) => p.sealed).map(summarizePoint),
          host: hostFactsOf(info),
          sealedProtectivePoint: sealedProtectivePointOf(info),
          proxies: job.proxies,
          declaredProxies: config.proxies.map((p) => ({ name: p.name, slots: p.slots, enabled: p.enabled })),
        };
      });
    },

    /** Refuses, from now on, every write to the VM's disks that does not carry this token. */
    async fenceWrites(input: { vm: VmRef; token: string }): Promise<void> {
      await withHypervisorFailures(() => port.fenceWrites(input.vm, input.token));
    },

    /** The production VM a failback writes to: a VM restored elsewhere is found by its name. */
    async locateProductionVm(input: { vm: string }): Promise<VmRef> {
      const found = await withHypervisorFailures(() => findOnProduction(input.vm));
      if (!found)
        throw ApplicationFailure.create({
          type: FailureTypes.hypervisor + ':not_found',
          message: `VM '${input.vm}' is on none of the production hosts`,
          nonRetryable: true,
        });
      return found;
    },

    /**
     * A new, empty VM on a production host with the replica's disk layout (failback to a new VM), made from the
     * definition the replica's host keeps for it, where it keeps one (a KVM host: the source's libvirt domain).
     */
    async createProductionVm(input: { vm: VmRef; disks: DiskInfo[]; replica?: ReplicaRef }): Promise<void> {
      const host = config.hosts.find((h) => h.name === input.vm.host);
      if (host?.role !== 'production')
        throw ApplicationFailure.create({
          type: FailureTypes.configuration,
          message: `'${input.vm.host}' is not a production host in the configuration`,
          nonRetryable: true,
        });
      await withHypervisorFailures(async () => {
        // Histories of 0.2.0 schedule this without the replica: no definition then, as before.
        const definition = input.replica
          ? await port.getVmDefinition({ host: input.replica.host, vm: input.replica.replica })
          : null;
        await port.createVm(input.vm, { disks: input.disks, ...(definition ? { definition } : {}) });
      });
    },

    /** Hard power-off; already off is success. */
    async powerOffVm(input: { vm: VmRef }): Promise<{ alreadyOff: boolean }> {
      return withHypervisorFailures(async () => ({ alreadyOff: (await port.powerOff(input.vm)).alreadyInState }));
    },

    async discardRunningLayer(input: { replica: ReplicaRef }): Promise<void> {
      await withHypervisorFailures(() => port.discardRunningLayer(input.replica));
    },

    async consolidateReplica(input: { replica: ReplicaRef }): Promise<void> {
      await withHypervisorFailures(() => heartbeatWhile(() => port.consolidateReplica(input.replica)));
    },

    /** Keeps the stopped replica's running state as a sealed point; a retry finds it sealed already. */
    async sealRunningLayer(input: {
      replica: ReplicaRef;
      pointId: string;
      kind: RestorePointKind;
      metadata: Record<string, string>;
    }): Promise<RestorePointSummary> {
      return withHypervisorFailures(async () => {
        const existing = (await port.listRestorePoints(input.replica)).find((p) => p.id === input.pointId);
        if (existing?.sealed) return summarizePoint(existing);
        return summarizePoint(
          await port.sealRunningLayer(input.replica, input.pointId, {
            kind: input.kind,
            crashConsistent: true,
            metadata: input.metadata,
          }),
        );
      });
    },

    /**
     * Failback's data move: writes to the powered-off production VM exactly the blocks that differ from the
     * replica's view. To the original VM, those are found through change tracking: the blocks the replica wrote
     * since failover, and those production itself changed since the replica's head point was copied. With nothing
     * tracked to go by (a VM restored elsewhere, a new VM, tracking lost), a digest comparison of the whole disk
     * finds them. With `onlyDiffering`, tracked blocks already equal on both sides are skipped (the second, short
     * phase).
     */
    async shipToProduction(input: {
      replica: ReplicaRef;
      view: ReplicaView;
      production: VmRef;
      disks: DiskInfo[];
      baseReferencePointId: string | null;
      onlyDiffering: boolean;
      checkpointId: string;
      /** The failback's write fence: a writer given up for dead is refused once the fence has moved on. */
      fence: string;
    }): Promise<ShipResult> {
      const ctx = Context.current();
      const signal = ctx.cancellationSignal;
      let progress: { disk?: string; bytesCopied: number; bytesTotal: number } = { bytesCopied: 0, bytesTotal: 0 };
      return withHypervisorFailures(() =>
        heartbeatWhile(
          async () => {
            let bytesShipped = 0;
            let productionChangedBytes: number | null = 0;
            const modes: ShipResult['modes'] = {};
            // The view is dropped however this ends, also when the request that makes it is cut off (cancelled):
            // the host may finish making it, and a paused start of production would stay behind.
            try {
              await port.createCheckpoint(input.production, input.checkpointId, { signal });
              for (const disk of input.disks) {
                const replicaDisk = { ...input.replica, disk: disk.id };
                const productionDisk = { ...input.production, disk: disk.id };
                const { view } = input;
                let toShip: Extent[];
                try {
                  if (!input.baseReferencePointId) throw new TrackingLostError('no reference point to track from');
                  const range = { referencePointId: input.baseReferencePointId, checkpointId: input.checkpointId };
                  const productionChanged = await allPages((page) =>
                    port.listChangedExtents(productionDisk, range, page, { signal }),
                  );
                  const replicaChanged =
                    'running' in view
                      ? await allPages((page) => port.listRunningLayerExtents(replicaDisk, page, { signal }))
                      : await allPages((page) =>
                          port.listRestorePointExtents(replicaDisk, view.pointId, page, { signal }),
                        );
                  if (productionChangedBytes !== null) productionChangedBytes += extentBytes(productionChanged);
                  toShip = unionExtents(replicaChanged, productionChanged);
                  if (input.onlyDiffering)
                    toShip = await differing(replicaDisk, view, productionDisk, input.checkpointId, toShip, signal);
                  modes[disk.id] = 'tracked';
                } catch (err) {
                  if (!(err instanceof TrackingLostError || err instanceof NotFoundError)) throw err;
                  // Nothing tracked to go by (a restored or new VM, or tracking lost): compare the whole disk; the
                  // blocks that differ are all there is to ship.
                  toShip = await differing(
                    replicaDisk,
                    view,
                    productionDisk,
                    input.checkpointId,
                    [whole(disk)],
                    signal,
                  );
                  modes[disk.id] = 'digest';
                  productionChangedBytes = null;
                }
                const total = extentBytes(toShip);
                let done = 0;
                for (const batch of batchExtents(toShip, BATCH_BYTES)) {
                  await port.writeExtents(
                    productionDisk,
                    port.readReplicaExtents(replicaDisk, input.view, batch, { signal }),
                    { signal, fence: input.fence },
                  );
                  done += extentBytes(batch);
                  progress = { disk: disk.id, bytesCopied: done, bytesTotal: total };
                }
                bytesShipped += total;
              }
            } finally {
              await port.deleteCheckpoint(input.production, input.checkpointId).catch(() => undefined);
            }
            return { bytesShipped, modes, productionChangedBytes };
          },
          () => progress,
        ),
      );
    },

    /** After failback: production equals the replica's protective point, block for block (digests). */
    async verifyProductionMatches(input: {
      replica: ReplicaRef;
      pointId: string;
      production: VmRef;
      disks: DiskInfo[];
      checkpointId: string;
    }): Promise<{ identical: boolean; mismatchedBlocks: number }> {
      const signal = Context.current().cancellationSignal;
      return withHypervisorFailures(() =>
        heartbeatWhile(async () => {
          try {
            await port.createCheckpoint(input.production, input.checkpointId, { signal });
            let mismatchedBlocks = 0;
            for (const disk of input.disks) {
              const diff = await differing(
                { ...input.replica, disk: disk.id },
                { pointId: input.pointId },
                { ...input.production, disk: disk.id },
                input.checkpointId,
                [whole(disk)],
                signal,
              );
              mismatchedBlocks += extentBytes(diff) / BLOCK_SIZE;
            }
            return { identical: mismatchedBlocks === 0, mismatchedBlocks };
          } finally {
            await port.deleteCheckpoint(input.production, input.checkpointId).catch(() => undefined);
          }
        }),
      );
    },
  };
}
