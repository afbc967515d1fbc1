import { ApplicationFailure } from '@temporalio/activity';
import type { Configuration, JobConfig } from '../config/schema';
import { FailureTypes, type ProxyDeclaration, type RestorePointSummary, type VmLocation } from '../contract';
import type { HostReplicaFacts } from '../domain/replica-state';
import { dataInstantOf, newestBackupAfter, PointMetadata, sourceOf } from '../domain/restore-points';
import { NotFoundError } from '../hypervisor/errors';
import type { DiskInfo, HypervisorPort, ReplicaInfo, ReplicaRef, RestorePointInfo, VmRef } from '../hypervisor/port';
import { withHypervisorFailures } from './failures';

export const replicaNameOf = (vm: string): string => `${vm}_replica`;

export function summarizePoint(p: RestorePointInfo): RestorePointSummary {
  return {
    id: p.id,
    createdAt: p.createdAt,
    kind: p.kind,
    bytesWritten: p.bytesWritten,
    crashConsistent: p.crashConsistent,
    source: sourceOf(p.metadata),
  };
}

/** What the DR host says about a replica, as the state rules read it. */
export function hostFactsOf(info: ReplicaInfo | null): HostReplicaFacts {
  if (!info)
    return {
      exists: false,
      sealedPoints: 0,
      consolidated: false,
      hasRunningLayer: false,
      powerState: 'Off',
      headKind: null,
    };
  return {
    exists: true,
    sealedPoints: info.points.filter((p) => p.sealed).length,
    consolidated: info.consolidated,
    hasRunningLayer: info.hasRunningLayer,
    powerState: info.powerState,
    headKind: info.points.find((p) => p.id === info.headPointId)?.kind ?? null,
  };
}

export function findJob(config: Configuration, jobName: string): JobConfig {
  const job = config.jobs.find((j) => j.name === jobName);
  if (!job)
    throw ApplicationFailure.create({
      type: FailureTypes.configuration,
      message: `No replication job '${jobName}' in the configuration (jobs: ${config.jobs.map((j) => j.name).join(', ') || 'none'})`,
      nonRetryable: true,
    });
  return job;
}

export interface JobPlan {
  job: string;
  vms: string[];
  proxies: string[] | 'auto';
  declaredProxies: ProxyDeclaration[];
}

export interface ReplicationTarget {
  source: VmRef;
  replica: ReplicaRef;
  disks: DiskInfo[];
  dataSource: 'production' | 'backup';
  restorePointsToKeep: number;
  /** Sealed points, oldest first, as the DR host lists them now. */
  restorePoints: RestorePointSummary[];
  /** The point the next one is layered over (null before the first run). */
  headPointId: string | null;
  /** Where change tracking can start from; null means compare digests (or copy everything on a first run). */
  baseReferencePointId: string | null;
  /** For a backup-sourced job: the newest backup point, or null when none is newer than the replica's head. */
  backup: { id: string; createdAt: string } | null;
  proxies: string[] | 'auto';
  declaredProxies: ProxyDeclaration[];
  /** What the DR host shows: a session refuses to write into a replica that runs or became production. */
  host: HostReplicaFacts;
}

export function createInventoryActivities(port: HypervisorPort, config: Configuration) {
  const declaredProxies = (): ProxyDeclaration[] =>
    config.proxies.map((p) => ({ name: p.name, slots: p.slots, enabled: p.enabled }));

  /** The job's VM on a production host, or the VM that runs production for the replica instead. */
  async function locateVm(vm: string, productionVm: VmLocation | null = null): Promise<VmRef> {
    if (productionVm) return productionVm;
    for (const host of config.hosts.filter((h) => h.role === 'production')) {
      const vms = await port.listVms(host.name);
      if (vms.some((v) => v.name === vm)) return { host: host.name, vm };
    }
    throw ApplicationFailure.create({
      type: FailureTypes.hypervisor + ':not_found',
      message: `VM '${vm}' is on none of the production hosts (${config.hosts
        .filter((h) => h.role === 'production')
        .map((h) => h.name)
        .join(', ')})`,
      nonRetryable: true,
    });
  }

  return {
    /** The job as configured now; a run reads it once, so a mid-run edit cannot mix two versions. */
    async planJob(jobName: string): Promise<JobPlan> {
      const job = findJob(config, jobName);
      return { job: job.name, vms: job.vms, proxies: job.proxies, declaredProxies: declaredProxies() };
    },

    /** Finds the source VM and makes sure its replica exists on the job's DR host (idempotent). */
    async prepareReplication(input: {
      vm: string;
      job: string;
      /** Planned failover always reads the live VM, whatever the job's data source. */
      fromProduction?: boolean;
      /** The VM that runs production for this replica, when it is not the job's VM (from its entity). */
      productionVm?: VmLocation | null;
    }): Promise<ReplicationTarget> {
      const job = findJob(config, input.job);
      if (!job.vms.includes(input.vm))
        throw ApplicationFailure.create({
          type: FailureTypes.configuration,
          message: `VM '${input.vm}' is not in job '${job.name}'`,
          nonRetryable: true,
        });
      return withHypervisorFailures(async () => {
        const source = await locateVm(input.vm, input.productionVm);
        const vmInfo = await port.getVm(source);
        const replica: ReplicaRef = { host: job.targetHost, replica: replicaNameOf(input.vm) };
        // The source's definition travels with every cycle, so the replica boots as the machine the source is now.
        const definition = await port.getVmDefinition(source);
        const info = await port.createReplica(replica, {
          sourceVm: input.vm,
          disks: vmInfo.disks,
          ...(definition ? { definition } : {}),
        });
        const sealed = info.points.filter((p) => p.sealed);
        const head = sealed.find((p) => p.id === info.headPointId) ?? sealed.at(-1);

        let baseReferencePointId: string | null = null;
        const wanted = head?.metadata[PointMetadata.sourceReferencePoint];
        if (wanted) {
          const known = await port.listReferencePoints(source);
          if (known.some((r) => r.id === wanted)) baseReferencePointId = wanted;
        }

        const dataSource = input.fromProduction ? 'production' : job.dataSource;
        let backup: ReplicationTarget['backup'] = null;
        if (dataSource === 'backup') {
          // Never older than the head: after a planned failover or a failback the head holds newer data than any
          // backup, and copying an older one over it would mix two instants.
          const newest = newestBackupAfter(await port.listBackups(input.vm), head ? dataInstantOf(head) : null);
          if (newest) backup = { id: newest.id, createdAt: newest.createdAt };
        }

        return {
          source,
          replica,
          disks: vmInfo.disks,
          dataSource,
          restorePointsToKeep: job.restorePoints,
          restorePoints: sealed.map(summarizePoint),
          headPointId: head?.id ?? null,
          baseReferencePointId,
          backup,
          proxies: job.proxies,
          declaredProxies: declaredProxies(),
          host: hostFactsOf(info),
        };
      });
    },

    /** The replica's sealed points as the DR host lists them now. */
    async listRestorePoints(replica: ReplicaRef): Promise<RestorePointSummary[]> {
      return withHypervisorFailures(async () => {
        try {
          return (await port.listRestorePoints(replica)).filter((p) => p.sealed).map(summarizePoint);
        } catch (err) {
          if (err instanceof NotFoundError) return [];
          throw err;
        }
      });
    },
  };
}
