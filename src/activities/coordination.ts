import { Context } from '@temporalio/activity';
import { WorkflowNotFoundError, type Client } from '@temporalio/client';
import type { Configuration } from '../config/schema';
import {
  PROXY_REGISTRY_WORKFLOW_ID,
  proxySignals,
  replicaSignals,
  replicaWorkflowId,
  SearchAttributes,
  WorkflowTypes,
  type OperationName,
  type ProxyRegistryInput,
  type RebuiltReplicaState,
  type ReplicaEntityInput,
  type SessionRef,
  type SessionRequest,
  type SlotRequest,
  type VmLocation,
} from '../contract';
import { ReplicaStates, stateFromHost, type ReplicaState } from '../domain/replica-state';
import { PointMetadata } from '../domain/restore-points';
import { NotFoundError } from '../hypervisor/errors';
import type { HypervisorPort, ReplicaInfo } from '../hypervisor/port';
import { withHypervisorFailures } from './failures';
import { findJob, hostFactsOf, replicaNameOf, summarizePoint } from './inventory';

/**
 * Long-lived entities are started on first use, and what they own is checked against what still runs. Both need
 * a client, so they are activities. Signal-with-start is idempotent: an entity that exists just receives the
 * signal, and a repeated request is recognised.
 */
export function createCoordinationActivities(client: Client, port: HypervisorPort, config: Configuration) {
  const taskQueue = () => Context.current().info.taskQueue;

  /** Workflows of this VM matching `query`, newest first by close (or start) time. */
  async function workflowsOf(vm: string, query: string) {
    const found = [];
    for await (const wf of client.workflow.list({ query: `FailoverVm="${vm}" AND ${query}` })) found.push(wf);
    return found.sort((a, b) => (b.closeTime ?? b.startTime).getTime() - (a.closeTime ?? a.startTime).getTime());
  }

  return {
    async requestReplicaSession(input: { vm: string; job: string; session: SessionRequest }): Promise<void> {
      const args: [ReplicaEntityInput] = [{ vm: input.vm, job: input.job }];
      await client.workflow.signalWithStart(WorkflowTypes.replica, {
        workflowId: replicaWorkflowId(input.vm),
        taskQueue: taskQueue(),
        args,
        signal: replicaSignals.requestSession,
        signalArgs: [input.session],
        staticSummary: `Replica of ${input.vm}: state, restore points, one session at a time`,
      });
    },

    async requestProxySlots(request: SlotRequest): Promise<void> {
      const args: [ProxyRegistryInput] = [{}];
      await client.workflow.signalWithStart(WorkflowTypes.proxySlots, {
        workflowId: PROXY_REGISTRY_WORKFLOW_ID,
        taskQueue: taskQueue(),
        args,
        signal: proxySignals.requestSlots,
        signalArgs: [request],
        staticSummary: 'Proxy task slots: who holds which, who waits',
      });
    },

    /** The workflows among these that are no longer running (closed, or unknown to the server). */
    async workflowsNotRunning(input: { workflowIds: string[] }): Promise<string[]> {
      const gone: string[] = [];
      for (const workflowId of input.workflowIds) {
        try {
          const { status } = await client.workflow.getHandle(workflowId).describe();
          if (status.name !== 'RUNNING') gone.push(workflowId);
        } catch (err) {
          if (!(err instanceof WorkflowNotFoundError)) throw err;
          gone.push(workflowId);
        }
      }
      return gone;
    },

    /**
     * A replica's state as the DR host and Temporal's histories show it, for an entity that has none (started
     * for the first time, or again after it was terminated) or whose holder vanished. The host says whether the
     * replica exists, has points, runs, or became production; the last completed operation tells Failback from
     * Ready; a session or operation of the VM still running past its wait holds the replica.
     */
    async rebuildReplicaState(input: { vm: string; job: string }): Promise<RebuiltReplicaState> {
      const { vm } = input;
      const job = config.jobs.find((j) => j.vms.includes(vm)) ?? findJob(config, input.job);
      const ref = { host: job.targetHost, replica: replicaNameOf(vm) };
      const info = await withHypervisorFailures(async (): Promise<ReplicaInfo | null> => {
        try {
          return await port.getReplica(ref);
        } catch (err) {
          if (err instanceof NotFoundError) return null;
          throw err;
        }
      });
      const facts = hostFactsOf(info);

      const [lastOperation] = await workflowsOf(
        vm,
        `WorkflowType="${WorkflowTypes.replicaOperation}" AND ExecutionStatus="Completed"`,
      );
      const left = lastOperation?.typedSearchAttributes.get(SearchAttributes.ReplicaState);
      const lastOperationState = (ReplicaStates as readonly string[]).includes(left ?? '')
        ? (left as ReplicaState)
        : null;
      const state = stateFromHost(facts, lastOperationState);

      const running = await workflowsOf(
        vm,
        `ExecutionStatus="Running" AND WorkflowType IN ("${WorkflowTypes.plannedFailoverSession}", "${WorkflowTypes.replicationSession}", "${WorkflowTypes.replicaOperation}")`,
      );
      // A session that still waits asks again by itself; one past its wait, or an operation, holds the replica.
      const holders = running
        .filter((wf) => {
          const stepShown = wf.typedSearchAttributes.get(SearchAttributes.FailoverStep);
          return (
            wf.type === WorkflowTypes.replicaOperation || (stepShown !== undefined && stepShown !== 'WaitingForReplica')
          );
        })
        .map((wf): SessionRef => {
          const parts = wf.workflowId.split('/');
          const kind =
            wf.type === WorkflowTypes.replicaOperation
              ? (parts[2] as OperationName)
              : wf.type === WorkflowTypes.plannedFailoverSession
                ? 'plannedFailover'
                : 'jobRun';
          return {
            sessionId: parts.at(-1)!,
            workflowId: wf.workflowId,
            kind,
            requestedBy: '(found running)',
            reason: 'found running when the state was rebuilt',
          };
        });

      const points = info?.points.filter((p) => p.sealed) ?? [];
      const head = info?.points.find((p) => p.id === info.headPointId);
      const productionOf = (metadata: Record<string, string>): VmLocation | null => {
        const host = metadata[PointMetadata.productionHost];
        const name = metadata[PointMetadata.productionVm];
        return host && name ? { host, vm: name } : null;
      };
      const failbackTo = state === 'Failback' && head ? productionOf(head.metadata) : null;
      // Production runs where the newest copy from a VM came from, or where a committed failback went.
      let productionVm: VmLocation | null = null;
      if (head?.kind === 'failback-protective' && state !== 'Failback') productionVm = productionOf(head.metadata);
      else {
        const newest = [...points].reverse().find((p) => p.metadata[PointMetadata.sourceKind] === 'checkpoint');
        const host = newest?.metadata[PointMetadata.sourceHost];
        const name = newest?.metadata[PointMetadata.sourceVm];
        if (host && name) productionVm = { host, vm: name };
      }
      if (productionVm?.vm === vm) productionVm = null;

      let attention: string | null = null;
      if (state === 'Ready' || state === 'Unseeded') {
        const production = productionVm ?? (await locate(vm));
        if (production) {
          const power = await withHypervisorFailures(async () => (await port.getVm(production)).powerState);
          if (power === 'Off')
            attention = `${production.vm} on ${production.host} is off and its replica does not run: no workflow says why`;
        }
      }
      // A permanent failover cut off part-way on the DR host: only finishing it is safe (the host refuses undo).
      if (info?.consolidating)
        attention = `a permanent failover of ${vm} is half done on ${ref.host}: send permanentFailover again to finish it`;
      const evidence =
        `${ref.host}: ${info ? `${points.length} sealed point(s), head ${head?.kind ?? 'none'}, ${info.powerState}, ${info.hasRunningLayer ? 'a' : 'no'} running layer${info.consolidated ? ', consolidated' : info.consolidating ? ', consolidation half done' : ''}` : 'no replica'}` +
        `; last operation: ${lastOperation ? `${lastOperation.workflowId} left ${lastOperationState ?? 'no state'}` : 'none'}` +
        `; running: ${holders.map((h) => h.workflowId).join(', ') || 'none'}`;
      return {
        state,
        restorePoints: points.map(summarizePoint),
        failbackTo,
        productionVm,
        holder: holders[0] ?? null,
        attention,
        evidence,
      };
    },
  };

  async function locate(vm: string): Promise<VmLocation | null> {
    return withHypervisorFailures(async () => {
      for (const host of config.hosts.filter((h) => h.role === 'production'))
        if ((await port.listVms(host.name)).some((v) => v.name === vm)) return { host: host.name, vm };
      return null;
    });
  }
}
