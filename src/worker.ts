import { NativeConnection, Runtime, Worker, type WorkerOptions } from '@temporalio/worker';
import { createOrchestrator } from './orchestrator';
import { syncJobSchedules } from './schedules';
import { proxyActivities, type Activities } from './activities';
import { connectionSettings } from './client';
import { connectHypervisor } from './config/hypervisor';
import { loadConfiguration } from './config/load';
import type { Configuration } from './config/schema';
import { proxyTaskQueue, TASK_QUEUE } from './contract';
import { createLogger } from './logging';

export const DEFAULT_CONFIG_PATH = 'config/planned-failover.yaml';

/** Which workers a process runs: the orchestration (workflows and control activities) and which proxies. */
export interface WorkerRoles {
  orchestration: boolean;
  proxies: 'all' | string[];
}

export const ALL_ROLES: WorkerRoles = { orchestration: true, proxies: 'all' };

export interface OrchestratorWorkerOptions {
  connection: NativeConnection;
  namespace: string;
  config: Configuration;
  activities: Activities;
  /** A pre-built bundle (tests build it once); otherwise the workflows are bundled at start. */
  workflowBundle?: WorkerOptions['workflowBundle'];
  roles?: WorkerRoles;
}

const shutdown = { shutdownGraceTime: '10s', shutdownForceTime: '30s' } as const;

/**
 * The orchestrator's workers: workflows and control activities on the planned-failover task queue, and one
 * worker per proxy on the proxy's own task queue, running as many copies at once as the proxy has slots.
 */
export async function createWorkers(options: OrchestratorWorkerOptions): Promise<Worker[]> {
  const { connection, namespace, config, activities } = options;
  const roles = options.roles ?? ALL_ROLES;
  const orchestrator = roles.orchestration
    ? await Worker.create({
        connection,
        namespace,
        taskQueue: TASK_QUEUE,
        ...(options.workflowBundle
          ? { workflowBundle: options.workflowBundle }
          : { workflowsPath: require.resolve('./workflows') }),
        activities,
        // Give running activities time to finish or heartbeat before a stop is forced.
        ...shutdown,
      })
    : undefined;
  const proxies = await Promise.all(
    config.proxies
      .filter((proxy) => roles.proxies === 'all' || roles.proxies.includes(proxy.name))
      .map((proxy) =>
        Worker.create({
          connection,
          namespace,
          taskQueue: proxyTaskQueue(proxy.name),
          activities: proxyActivities(activities, proxy.transport),
          maxConcurrentActivityTaskExecutions: proxy.slots,
          ...shutdown,
        }),
      ),
  );
  return [...(orchestrator ? [orchestrator] : []), ...proxies];
}

async function main(): Promise<void> {
  Runtime.install({ logger: createLogger() });
  const configPath = process.env.PF_CONFIG ?? DEFAULT_CONFIG_PATH;
  const config = loadConfiguration(configPath);
  const settings = connectionSettings();
  const port = connectHypervisor(config);
  const orchestrator = await createOrchestrator({
    connectionOptions: settings.connectionOptions,
    namespace: settings.namespace,
    config,
    port,
  });
  try {
    // A worker creates the schedules its configuration names and nobody created yet; `failover schedules` makes
    // them match the configuration (a worker started with an older one must not undo newer schedules).
    const schedules = await syncJobSchedules(orchestrator.client, config, 'createOnly');
    Runtime.instance().logger.info('Missing job schedules created', { ...schedules });
    await orchestrator.startWorkers();
    Runtime.instance().logger.info('Workers polling', {
      address: settings.address,
      namespace: settings.namespace,
      taskQueues: [TASK_QUEUE, ...config.proxies.map((p) => proxyTaskQueue(p.name))],
      config: configPath,
    });
    // The SDK stops polling on SIGINT/SIGTERM and lets in-flight work finish within shutdownForceTime.
    await new Promise<void>((resolveStop) => {
      for (const signal of ['SIGINT', 'SIGTERM'] as const) process.once(signal, () => resolveStop());
    });
  } finally {
    await orchestrator.close();
    port.close();
  }
}

if (require.main === module) {
  main().then(
    () => process.exit(0),
    (err: unknown) => {
      console.error(err);
      process.exit(1);
    },
  );
}
