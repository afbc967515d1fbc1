import { Client, Connection } from '@temporalio/client';
import { NativeConnection, type NativeConnectionOptions, type Worker, type WorkerOptions } from '@temporalio/worker';
import { createActivities } from './activities';
import type { Configuration } from './config/schema';
import type { HypervisorPort } from './hypervisor/port';
import { createWorkers } from './worker';
import { ALL_ROLES, type WorkerRoles } from './worker-args';

export interface OrchestratorOptions {
  /** As envconfig gives them: usable by the worker's native connection and the client alike. */
  connectionOptions: NativeConnectionOptions;
  namespace: string;
  config: Configuration;
  /** The configuration as it is now, for who may ask for what (see ActivityDependencies); `config` by default. */
  currentConfig?: () => Configuration;
  port: HypervisorPort;
  workflowBundle?: WorkerOptions['workflowBundle'];
  /** Which workers this process runs; all of them by default. */
  roles?: WorkerRoles;
}

/** A client and the orchestrator's workers, wired to one hypervisor port: what the demo, scripts and tests run. */
export interface Orchestrator {
  client: Client;
  config: Configuration;
  namespace: string;
  /** Starts the workers (again, after stopWorkers, as a restarted worker process would). */
  startWorkers(): Promise<void>;
  stopWorkers(): Promise<void>;
  close(): Promise<void>;
}

export async function createOrchestrator(options: OrchestratorOptions): Promise<Orchestrator> {
  const { namespace, config, port } = options;
  const roles = options.roles ?? ALL_ROLES;
  const connection = await NativeConnection.connect(options.connectionOptions);
  // Only the orchestration's activities and its schedules use the client: a process that runs proxies alone (on a
  // proxy's machine) copies with the worker's connection and never opens the client's.
  const clientConnection = roles.orchestration
    ? await Connection.connect(options.connectionOptions)
    : Connection.lazy(options.connectionOptions);
  const client = new Client({ connection: clientConnection, namespace });
  let workers: Worker[] = [];
  let running: Promise<unknown> = Promise.resolve();
  const orchestrator: Orchestrator = {
    client,
    config,
    namespace,
    async startWorkers() {
      workers = await createWorkers({
        connection,
        namespace,
        config,
        activities: createActivities({ port, config, client, currentConfig: options.currentConfig }),
        workflowBundle: options.workflowBundle,
        roles,
      });
      running = Promise.all(workers.map((w) => w.run()));
    },
    async stopWorkers() {
      // The SDK's own signal handler may already be draining them.
      for (const w of workers) if (w.getState() === 'RUNNING') w.shutdown();
      await running;
      workers = [];
    },
    async close() {
      await orchestrator.stopWorkers();
      await client.connection.close();
      await connection.close();
    },
  };
  return orchestrator;
}
