import { ApplicationFailure, Context } from '@temporalio/activity';
import { WorkflowNotFoundError, type Client } from '@temporalio/client';
import type { Configuration } from '../config/schema';
import {
  FailureTypes,
  replicaQueries,
  replicaWorkflowId,
  type FullVerification,
  type InputProblem,
  type VerificationResult,
} from '../contract';
import { checkTransition, type ReplicaOperation } from '../domain/replica-state';
import { checkAccess, type Permission } from '../domain/roles';
import { TrackingLostError } from '../hypervisor/errors';
import {
  BLOCK_SIZE,
  type CanaryReading,
  type Extent,
  type HypervisorPort,
  type PowerState,
  type ReplicaRef,
  type VmRef,
} from '../hypervisor/port';
import { extentBytes, unionExtents } from './copy-plan';
import { allPages, differingBlocks } from './extents';
import { withHypervisorFailures } from './failures';
import { earlierAttemptStart, heartbeatWhile } from './heartbeat';
import type { CopyVerification } from './replication';

/** How many replica entities a planned failover's check asks at once. */
const QUERY_CONCURRENCY = 16;

/** Runs `task` for every item, at most `limit` at a time; results in the items' order. */
async function inBatches<T, R>(
  items: readonly T[],
  limit: number,
  task: (item: T, index: number) => Promise<R>,
): Promise<R[]> {
  const out = new Array<R>(items.length);
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(limit, items.length) }, async () => {
      while (next < items.length) {
        const i = next++;
        out[i] = await task(items[i]!, i);
      }
    }),
  );
  return out;
}

/** The VMs of one job in one request: processed one after another, in the order they were named. */
export interface Lane {
  job: string;
  vms: string[];
}

export function createFailoverActivities(port: HypervisorPort, config: Configuration, client: Client) {
  const rolesOf = (user: string) => config.users.find((u) => u.name === user)?.roles;

  /** Every problem with a request to run `operation` on these VMs, before anything is touched. */
  async function problemsWith(
    vms: string[],
    requestedBy: string,
    operation: ReplicaOperation,
  ): Promise<InputProblem[]> {
    const access = checkAccess(requestedBy, rolesOf(requestedBy), 'failover');
    const production = config.hosts.filter((h) => h.role === 'production');
    const onHosts = new Set((await Promise.all(production.map((h) => port.listVms(h.name)))).flat().map((v) => v.name));
    // Entities are asked side by side: a query of an entity no worker has cached replays its history first.
    const perVm = await inBatches(vms, QUERY_CONCURRENCY, async (vm, i): Promise<InputProblem[]> => {
      const path = `vms[${i}]`;
      const problems: InputProblem[] = [];
      const job = config.jobs.find((j) => j.vms.includes(vm));
      if (!job) problems.push({ path, message: `'${vm}' is in no replication job` });
      let view;
      try {
        view = await client.workflow.getHandle(replicaWorkflowId(vm)).query(replicaQueries.state);
      } catch (err) {
        if (!(err instanceof WorkflowNotFoundError)) throw err;
      }
      const productionVm = view?.productionVm?.vm ?? vm;
      if (!onHosts.has(productionVm))
        problems.push({ path, message: `'${productionVm}' is on none of the production hosts` });
      if (!job) return problems;
      if (!view) return [...problems, { path, message: `'${vm}' has no replica yet: run job '${job.name}' first` }];
      const check = checkTransition(view.restorePoints.length === 0 ? 'Unseeded' : view.state, operation);
      if (!check.allowed) problems.push({ path, message: `'${vm}': ${check.reason}` });
      return problems;
    });
    return [...(access.allowed ? [] : [{ path: 'requestedBy', message: access.reason }]), ...perVm.flat()];
  }

  return {
    /** Checks a planned failover request and plans its lanes; returns every problem instead of failing on the first. */
    async planPlannedFailover(input: {
      vms: string[];
      requestedBy: string;
    }): Promise<{ problems: InputProblem[]; lanes: Lane[] }> {
      const problems = await withHypervisorFailures(() =>
        problemsWith(input.vms, input.requestedBy, 'plannedFailover'),
      );
      const lanes: Lane[] = [];
      for (const vm of input.vms) {
        const job = config.jobs.find((j) => j.vms.includes(vm));
        if (!job) continue;
        const lane = lanes.find((l) => l.job === job.name);
        if (lane) lane.vms.push(vm);
        else lanes.push({ job: job.name, vms: [vm] });
      }
      return { problems, lanes };
    },

    /** Refuses, with the reason, a user whose roles do not allow the operation. */
    async checkOperator(input: { user: string; permission: Permission }): Promise<void> {
      const access = checkAccess(input.user, rolesOf(input.user), input.permission);
      if (!access.allowed)
        throw ApplicationFailure.create({
          type: FailureTypes.accessDenied,
          message: access.reason,
          nonRetryable: true,
        });
    },

    /**
     * Guest shutdown, then a hard power-off when the guest does not finish in time. Already off is success,
     * and the result says so; the times are measured here, where the power calls happen.
     */
    async shutDownSource(input: { vm: VmRef; timeoutMs: number }): Promise<{
      outcome: 'shut-down' | 'forced-off' | 'already-off';
      startedAt: number;
      finishedAt: number;
    }> {
      // A retry after a worker crash keeps the first attempt's start: the downtime began then.
      const earlier = earlierAttemptStart();
      const startedAt = earlier ?? Date.now();
      const signal = Context.current().cancellationSignal;
      return withHypervisorFailures(() =>
        heartbeatWhile(
          async () => {
            const result = await port.shutdownGuest(input.vm, input.timeoutMs, { signal });
            let outcome: 'shut-down' | 'forced-off' | 'already-off' = 'shut-down';
            if (result.outcome === 'already-off' && earlier === undefined) outcome = 'already-off';
            else if (result.outcome === 'already-off') {
              // Off already after an earlier attempt of ours: the host recorded whether that was a clean guest
              // shutdown or the forced power-off after it, which matters for the data's crash consistency.
              const vm = await port.getVm(input.vm, { signal });
              outcome = vm.lastStop === 'forced-off' ? 'forced-off' : 'shut-down';
            } else if (result.outcome === 'timed-out') {
              Context.current().log.warn('Guest shutdown timed out; powering off', {
                vm: input.vm.vm,
                timeoutMs: input.timeoutMs,
              });
              await port.powerOff(input.vm, { signal });
              outcome = 'forced-off';
            }
            return { outcome, startedAt, finishedAt: Date.now() };
          },
          () => ({ startedAt }),
        ),
      );
    },

    /**
     * Powers a VM (source or replica) on and waits for its boot; already running is success. `sourceOff`: the
     * replica's source is off, so the replica takes its MAC addresses (see PowerOnOptions); absent, it gets its own.
     */
    async powerOnVm(input: {
      vm: VmRef;
      sourceOff?: boolean;
    }): Promise<{ alreadyOn: boolean; startedAt: number; finishedAt: number }> {
      const earlier = earlierAttemptStart();
      const startedAt = earlier ?? Date.now();
      const signal = Context.current().cancellationSignal;
      return withHypervisorFailures(() =>
        heartbeatWhile(
          async () => {
            const result = await port.powerOn(input.vm, { signal, sourceOff: input.sourceOff === true });
            return { alreadyOn: result.alreadyInState && earlier === undefined, startedAt, finishedAt: Date.now() };
          },
          () => ({ startedAt }),
        ),
      );
    },

    /** The VM's power state now, as its host reports it. */
    async powerStateOf(input: { vm: VmRef }): Promise<PowerState> {
      return withHypervisorFailures(async () => (await port.getVm(input.vm)).powerState);
    },

    async revertReplica(input: { replica: ReplicaRef; pointId: string }): Promise<void> {
      await withHypervisorFailures(() => port.revertReplica(input.replica, input.pointId));
    },

    /**
     * Zero data loss, verified: the blocks the final sync copied (every block when tracking is gone) have the
     * same digests on the replica's new point as on the powered-off source, and so has the guest canary. A copy
     * that the DR host verified as it stored the blocks (`copied`) needs only the canaries here.
     */
    async verifyFinalSync(input: {
      source: VmRef;
      checkpointId: string;
      baseReferencePointId: string | null;
      replica: ReplicaRef;
      pointId: string;
      disks: { id: string; sizeBytes: number }[];
      copied?: CopyVerification & { method: VerificationResult['method'] };
    }): Promise<VerificationResult> {
      return withHypervisorFailures(async () => {
        const signal = Context.current().cancellationSignal;
        const canaries = () =>
          Promise.all([
            port.readCanary(input.source, input.checkpointId, { signal }),
            port.readReplicaCanary(input.replica, { pointId: input.pointId }, { signal }),
          ]);
        /** The blocks' proof and the canaries, as the session's verification. */
        const outcome = (
          proof: CopyVerification & { method: VerificationResult['method'] },
          [source, replica]: [CanaryReading, CanaryReading],
          covered: string,
        ): VerificationResult => ({
          identical: proof.mismatchedBlocks === 0 && source.sequence === replica.sequence,
          blocksCompared: proof.blocksCompared,
          mismatchedBlocks: proof.mismatchedBlocks,
          sourceCanary: source.sequence,
          replicaCanary: replica.sequence,
          method: proof.method,
          covered,
        });
        if (input.copied) {
          const { blocksCompared, method } = input.copied;
          return outcome(
            input.copied,
            await canaries(),
            `the ${blocksCompared} block(s) the final sync copied (${method === 'tracked-blocks' ? 'change tracking since helper point 1' : 'the blocks whose digests differed: change tracking was lost'}), ` +
              `each read back on the DR host as it was stored and compared with the source's digest of it, and the guest canary`,
          );
        }
        let method: VerificationResult['method'] = input.baseReferencePointId ? 'tracked-blocks' : 'all-blocks';
        // Disks are verified side by side, and with the canary: this runs while the workload is down.
        const perDisk = input.disks.map(async (disk) => {
          const sourceDisk = { ...input.source, disk: disk.id };
          const whole = [{ offset: 0, length: disk.sizeBytes }];
          let extents: Extent[] = whole;
          if (input.baseReferencePointId) {
            const range = { referencePointId: input.baseReferencePointId, checkpointId: input.checkpointId };
            try {
              extents = await allPages((page) => port.listChangedExtents(sourceDisk, range, page, { signal }));
            } catch (err) {
              if (!(err instanceof TrackingLostError)) throw err;
              extents = whole;
              method = 'all-blocks';
            }
          }
          return differingBlocks(
            (range) => port.blockDigests(sourceDisk, input.checkpointId, range, { signal }),
            (range) =>
              port.replicaBlockDigests({ ...input.replica, disk: disk.id }, { pointId: input.pointId }, range, {
                signal,
              }),
            extents,
          );
        });
        const [compared, readings] = await heartbeatWhile(() => Promise.all([Promise.all(perDisk), canaries()]));
        const blocksCompared = compared.reduce((n, c) => n + c.blocksCompared, 0);
        const mismatchedBlocks = compared.reduce((n, c) => n + extentBytes(c.extents) / BLOCK_SIZE, 0);
        return outcome(
          { blocksCompared, mismatchedBlocks, method },
          readings,
          method === 'tracked-blocks'
            ? `the ${blocksCompared} block(s) the final sync copied (change tracking since helper point 1), and the guest canary`
            : `every block of ${input.disks.length} disk(s) (change tracking was lost), and the guest canary`,
        );
      });
    },

    /**
     * Every block of every disk of a restore point against the source at a checkpoint, and the canary: what
     * proves that a replica is the source, whatever change tracking did or missed. A block that neither host
     * shows allocated (in the source at the checkpoint, or in any layer of the point's chain) is zero on both,
     * so digests are asked for the blocks allocated on either side: a sparse 1 TiB disk costs what it holds.
     */
    async verifyWholeDisks(input: {
      source: VmRef;
      checkpointId: string;
      replica: ReplicaRef;
      pointId: string;
      disks: { id: string; sizeBytes: number }[];
    }): Promise<FullVerification> {
      const signal = Context.current().cancellationSignal;
      let compared = 0;
      return withHypervisorFailures(() =>
        heartbeatWhile(
          async () => {
            let mismatchedBlocks = 0;
            let diskBlocks = 0;
            for (const disk of input.disks) {
              const sourceDisk = { ...input.source, disk: disk.id };
              const replicaDisk = { ...input.replica, disk: disk.id };
              const view = { pointId: input.pointId };
              const allocated = unionExtents(
                await allPages((page) => port.listAllocatedExtents(sourceDisk, input.checkpointId, page, { signal })),
                await allPages((page) => port.listReplicaAllocatedExtents(replicaDisk, view, page, { signal })),
              );
              const result = await differingBlocks(
                (range) => port.blockDigests(sourceDisk, input.checkpointId, range, { signal }),
                (range) => port.replicaBlockDigests(replicaDisk, view, range, { signal }),
                allocated,
                (blocks) => (compared += blocks),
              );
              mismatchedBlocks += extentBytes(result.extents) / BLOCK_SIZE;
              diskBlocks += Math.ceil(disk.sizeBytes / BLOCK_SIZE);
            }
            const [sourceCanary, replicaCanary] = await Promise.all([
              port.readCanary(input.source, input.checkpointId, { signal }),
              port.readReplicaCanary(input.replica, { pointId: input.pointId }, { signal }),
            ]);
            const canaryMatches = sourceCanary.sequence === replicaCanary.sequence;
            return {
              identical: mismatchedBlocks === 0 && canaryMatches,
              blocksCompared: compared,
              mismatchedBlocks,
              covered: `every block of ${input.disks.length} disk(s) of ${input.pointId} against ${input.source.vm} at ${input.checkpointId}: ${compared} compared by digest (allocated on either side, with their close neighbours), the other ${Math.max(0, diskBlocks - compared)} unallocated on both; and the guest canary (${replicaCanary.sequence} vs ${sourceCanary.sequence})`,
            };
          },
          () => ({ blocksCompared: compared }),
        ),
      );
    },
  };
}
