import { randomUUID } from 'node:crypto';
import { Client, Connection, type WorkflowClientInterceptor, type WorkflowHandle } from '@temporalio/client';
import { loadClientConnectConfig } from '@temporalio/envconfig';
import {
  TASK_QUEUE,
  WorkflowTypes,
  type PlannedFailoverInput,
  type PlannedFailoverResult,
  type ReplicationJobInput,
  type ReplicationJobResult,
} from './contract';

/** Where a local dev server listens when neither the environment nor a temporal.toml profile says otherwise. */
export const LOCAL_ADDRESS = '127.0.0.1:7233';
export const DEFAULT_NAMESPACE = 'default';

export interface ConnectionSettings {
  address: string;
  namespace: string;
  connectionOptions: ReturnType<typeof loadClientConnectConfig>['connectionOptions'];
}

/**
 * Reads the same settings as the Temporal CLI: TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TEMPORAL_API_KEY, TLS
 * variables and temporal.toml profiles (TEMPORAL_PROFILE), with a local dev server as the default.
 */
export function connectionSettings(): ConnectionSettings {
  const { connectionOptions, namespace } = loadClientConnectConfig();
  const address = connectionOptions.address ?? LOCAL_ADDRESS;
  return { address, namespace: namespace ?? DEFAULT_NAMESPACE, connectionOptions: { ...connectionOptions, address } };
}

export async function connectClient(
  settings: ConnectionSettings = connectionSettings(),
  interceptors: WorkflowClientInterceptor[] = [],
): Promise<Client> {
  const connection = await Connection.connect(settings.connectionOptions);
  return new Client({ connection, namespace: settings.namespace, interceptors: { workflow: interceptors } });
}

/** Typed starters for the contract's workflows, shared by the CLI, the demo and tests. */
export type ReplicationJobWorkflow = (input: ReplicationJobInput) => Promise<ReplicationJobResult>;
export type PlannedFailoverWorkflow = (input: PlannedFailoverInput) => Promise<PlannedFailoverResult>;

export function startReplicationJob(
  client: Client,
  input: ReplicationJobInput,
  workflowId = `job/${input.job}/${randomUUID()}`,
): Promise<WorkflowHandle<ReplicationJobWorkflow>> {
  return client.workflow.start<ReplicationJobWorkflow>(WorkflowTypes.replicationJob, {
    taskQueue: TASK_QUEUE,
    workflowId,
    args: [input],
    staticSummary: `Replication job ${input.job}, requested by ${input.requestedBy}${input.reason ? `: ${input.reason}` : ''}`,
  });
}

export function startPlannedFailover(
  client: Client,
  input: PlannedFailoverInput,
  workflowId = `planned-failover/${randomUUID()}`,
): Promise<WorkflowHandle<PlannedFailoverWorkflow>> {
  return client.workflow.start<PlannedFailoverWorkflow>(WorkflowTypes.plannedFailover, {
    taskQueue: TASK_QUEUE,
    workflowId,
    args: [input],
    staticSummary: `Planned failover of ${input.vms.join(', ')}, requested by ${input.requestedBy}: ${input.reason}`,
  });
}
