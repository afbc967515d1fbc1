import { Context } from '@temporalio/activity';
import type { Client } from '@temporalio/client';
import {
  PROXY_REGISTRY_WORKFLOW_ID,
  proxySignals,
  replicaSignals,
  replicaWorkflowId,
  WorkflowTypes,
  type ProxyRegistryInput,
  type ReplicaEntityInput,
  type SessionRef,
  type SlotRequest,
} from '../contract';

/**
 * Long-lived entities are started on first use. Signal-with-start needs a client, so it is an activity;
 * it is idempotent: an entity that exists just receives the signal, and a repeated request is recognised.
 */
export function createCoordinationActivities(client: Client) {
  const taskQueue = () => Context.current().info.taskQueue;
  return {
    async requestReplicaSession(input: { vm: string; job: string; session: SessionRef }): Promise<void> {
      const args: [ReplicaEntityInput] = [{ vm: input.vm, job: input.job }];
      await client.workflow.signalWithStart(WorkflowTypes.replica, {
        workflowId: replicaWorkflowId(input.vm),
        taskQueue: taskQueue(),
        args,
        signal: replicaSignals.requestSession,
        signalArgs: [input.session],
        staticSummary: `Replica of ${input.vm} (job ${input.job}): state, restore points, one session at a time`,
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
  };
}
