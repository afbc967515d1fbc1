// The orchestrator's workers as a process of their own, so that a test can kill them for real (SIGKILL) and
// start them again. Everything comes from the environment:
//   PF_WORKER_ADDRESS    the Temporal server (host:port)
//   PF_WORKER_NAMESPACE  the test's namespace
//   PF_WORKER_CONFIG     the configuration, as JSON (or YAML) text (its tls block: the client certificate to present)
//   PF_WORKER_LAB_URL    optional, where the hypervisor port reaches the lab (a test proxy); unset: the hosts'
//                        adapters of the configuration (KVM host processes)
//   PF_WORKER_BUNDLE     the pre-built workflow bundle
//   PF_WORKER_ROLES      optional, JSON WorkerRoles: which workers this process runs (all of them when unset)
//   PF_WORKER_TLS_CA, PF_WORKER_TLS_SERVER_NAME, PF_WORKER_API_KEY
//                        optional, for a secured server: its CA, the name its certificate is checked against, and the
//                        workers' token (test/server-access.ts)
// Prints "ready" on stdout once every worker polls, then runs until it is killed (or stops on SIGINT/SIGTERM).
import { Runtime } from '@temporalio/worker';
import { parseConfiguration } from '../src/config/load';
import { connectHypervisor } from '../src/config/hypervisor';
import { HostApiHypervisor } from '../src/hypervisor/host-api-adapter';
import { createLogger } from '../src/logging';
import { createOrchestrator } from '../src/orchestrator';
import type { WorkerRoles } from '../src/worker';
import { connectionOptions, workerProcessCredentials } from './server-access';

function required(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

async function main(): Promise<void> {
  Runtime.install({ logger: createLogger('WARN') });
  const config = parseConfiguration(required('PF_WORKER_CONFIG'), 'PF_WORKER_CONFIG');
  const labUrl = process.env.PF_WORKER_LAB_URL;
  const port = labUrl
    ? new HostApiHypervisor({ url: labUrl, serverName: 'lab', ...(config.tls ? { tls: config.tls } : {}) })
    : connectHypervisor(config);
  const orchestrator = await createOrchestrator({
    connectionOptions: connectionOptions(required('PF_WORKER_ADDRESS'), workerProcessCredentials(process.env)),
    namespace: required('PF_WORKER_NAMESPACE'),
    config,
    port,
    workflowBundle: { codePath: required('PF_WORKER_BUNDLE') },
    roles: process.env.PF_WORKER_ROLES ? (JSON.parse(process.env.PF_WORKER_ROLES) as WorkerRoles) : undefined,
  });
  try {
    await orchestrator.startWorkers();
    process.stdout.write('ready\n');
    await new Promise<void>((resolveStop) => {
      for (const signal of ['SIGINT', 'SIGTERM'] as const) process.once(signal, () => resolveStop());
    });
  } finally {
    await orchestrator.close();
    port.close();
  }
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    console.error(err);
    process.exit(1);
  },
);
