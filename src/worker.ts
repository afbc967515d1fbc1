import { basename, dirname, resolve } from 'node:path';
import { bundleWorkflowCode, NativeConnection, Runtime, Worker, type WorkerOptions } from '@temporalio/worker';
import { createOrchestrator } from './orchestrator';
import { syncJobSchedules } from './schedules';
import { proxyActivities, type Activities } from './activities';
import { connectionSettings } from './client';
import { connectHypervisor } from './config/hypervisor';
import { ensureDemoConfiguration } from './config/demo';
import { currentConfiguration } from './config/live';
import { loadConfiguration } from './config/load';
import { DEMO_SITE_DIR, ensureClientCertificate } from './host-api/certificates';
import type { Configuration } from './config/schema';
import { proxyTaskQueue, TASK_QUEUE } from './contract';
import { createLogger } from './logging';
import { prometheusTelemetry, publishHaltedSessions, publishProxySlots } from './metrics';
import {
  ALL_ROLES,
  DEFAULT_CONFIG_PATH,
  DEFAULT_CONFIG_TEMPLATE,
  parseWorkerArgs,
  proxiesRunBy,
  taskQueuesPolledBy,
  workerRolesFor,
  WorkerArgsError,
  type WorkerRoles,
} from './worker-args';

export { ALL_ROLES, DEFAULT_CONFIG_PATH, type WorkerRoles } from './worker-args';

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

/** The workflows, bundled for a worker. Webpack's build report (dozens of lines) is kept out of the logs. */
export async function bundleWorkflows(): Promise<{ code: string }> {
  return bundleWorkflowCode({ workflowsPath: require.resolve('./workflows'), logger: createLogger('WARN') });
}

/**
 * The orchestrator's workers: workflows and control activities on the planned-failover task queue, and one
 * worker per proxy on the proxy's own task queue, running as many copies at once as the proxy has slots; `roles`
 * says which of them this process runs (all of them by default).
 */
export async function createWorkers(options: OrchestratorWorkerOptions): Promise<Worker[]> {
  const { connection, namespace, config, activities } = options;
  const roles = options.roles ?? ALL_ROLES;
  const orchestrator = roles.orchestration
    ? await Worker.create({
        connection,
        namespace,
        taskQueue: TASK_QUEUE,
        workflowBundle: options.workflowBundle ?? (await bundleWorkflows()),
        activities,
        // Give running activities time to finish or heartbeat before a stop is forced.
        ...shutdown,
      })
    : undefined;
  const proxies = await Promise.all(
    proxiesRunBy(roles, config).map((proxy) =>
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

/** The configuration file; one that cannot be read at all is a mistake of the command line (or of PF_CONFIG). */
function readConfiguration(path: string): Configuration {
  try {
    return loadConfiguration(path);
  } catch (err) {
    if (err instanceof Error && 'syscall' in err) throw new WorkerArgsError(`--config ${path}: ${err.message}`);
    throw err;
  }
}

/** The hosts' clients; TLS files that cannot be used (missing, a key others may read) are the configuration's fault. */
function connectTo(configPath: string, config: Configuration): ReturnType<typeof connectHypervisor> {
  try {
    return connectHypervisor(config);
  } catch (err) {
    throw new WorkerArgsError(`${configPath}: ${err instanceof Error ? err.message : String(err)}`);
  }
}

/**
 * By hand with the demo's configuration (README's steps; its users' keys are made with it), the workers' client certificate of the demo's site is made
 * when missing, as `npm run lab` makes the lab's; any other configuration's certificates are the operator's to make.
 */
async function ensureDemoClientCertificate(configPath: string, config: Configuration): Promise<void> {
  if (configPath !== DEFAULT_CONFIG_PATH || !config.tls) return;
  if (dirname(config.tls.cert) !== resolve(DEMO_SITE_DIR)) return;
  const made = await ensureClientCertificate(DEMO_SITE_DIR, basename(config.tls.cert, '.crt'));
  if (made.made)
    Runtime.instance().logger.info("Made the demo site's client certificate", {
      cert: made.cert,
      fingerprint: made.fingerprint,
    });
}

/**
 * `npm run worker -- [--only orchestration | --only proxy <name...>] [--config <file>] [--metrics <host:port>]` (see
 * worker-args.ts).
 */
async function main(argv: readonly string[]): Promise<void> {
  // The command line and the configuration are checked before anything connects: a refusal changes nothing.
  const args = parseWorkerArgs(argv);
  if ('help' in args) {
    process.stdout.write(args.help);
    return;
  }
  if (args.configPath === DEFAULT_CONFIG_PATH) await ensureDemoConfiguration(DEFAULT_CONFIG_TEMPLATE);
  const config = readConfiguration(args.configPath);
  const roles = workerRolesFor(args, config);
  Runtime.install({
    logger: createLogger(),
    ...(args.metricsAddress ? { telemetryOptions: prometheusTelemetry(args.metricsAddress) } : {}),
  });
  await ensureDemoClientCertificate(args.configPath, config);
  const settings = connectionSettings();
  const port = connectTo(args.configPath, config);
  const orchestrator = await createOrchestrator({
    connectionOptions: settings.connectionOptions,
    namespace: settings.namespace,
    config,
    currentConfig: currentConfiguration(args.configPath, config),
    port,
    roles,
  });
  const stopSampling: (() => void)[] = [];
  try {
    // The orchestration's process creates the schedules its configuration names and nobody created yet (a proxy's
    // process, maybe on another machine with another copy of the file, leaves them alone); `failover schedules`
    // makes them match the configuration (a worker started with an older one must not undo newer schedules).
    if (roles.orchestration) {
      const schedules = await syncJobSchedules(orchestrator.client, config, 'createOnly');
      Runtime.instance().logger.info('Missing job schedules created', { ...schedules });
    }
    await orchestrator.startWorkers();
    if (roles.orchestration && args.metricsAddress) {
      const meter = Runtime.instance().metricMeter;
      stopSampling.push(
        publishHaltedSessions(orchestrator.client, meter),
        publishProxySlots(orchestrator.client, meter),
      );
    }
    Runtime.instance().logger.info('Workers polling', {
      address: settings.address,
      namespace: settings.namespace,
      taskQueues: taskQueuesPolledBy(roles, config),
      config: args.configPath,
      ...(args.metricsAddress ? { metrics: `http://${args.metricsAddress}/metrics` } : {}),
    });
    // The SDK stops polling on SIGINT/SIGTERM and lets in-flight work finish within shutdownForceTime.
    await new Promise<void>((resolveStop) => {
      for (const signal of ['SIGINT', 'SIGTERM'] as const) process.once(signal, () => resolveStop());
    });
  } finally {
    for (const stop of stopSampling) stop();
    await orchestrator.close();
    port.close();
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).then(
    () => process.exit(0),
    (err: unknown) => {
      // A refused command line is bad input, like the CLI's: exit code 2 and only the message.
      const refused = err instanceof WorkerArgsError;
      console.error(refused ? err.message : err);
      process.exit(refused ? 2 : 1);
    },
  );
}
