// What integration tests get from the run: the shared dev server, a namespace of their own (entity workflow
// ids like replica/<vm> and proxy-slots are fixed by the contract, so tests must not share a namespace),
// a lab site, and the orchestrator's real workers wired to both: in the test's process, or with
// PF_TEST_SPLIT_WORKERS=1 as an operator deploys them on machines of their own, the orchestration in a process of
// its own and each proxy in one of its own (test/worker-process.ts).
import assert from 'node:assert/strict';
import { execFile, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { promisify } from 'node:util';
import { Client, Connection } from '@temporalio/client';
import { Runtime } from '@temporalio/worker';
import type { EstateInput } from '../lab/estate';
import { parseConfiguration } from '../src/config/load';
import type { Configuration } from '../src/config/schema';
import type { HypervisorPort } from '../src/hypervisor/port';
import {
  replicaQueries,
  replicaWorkflowId,
  SearchAttributes,
  type OperationName,
  type ReplicaView,
  type SignedOperation,
} from '../src/contract';
import { createLogger } from '../src/logging';
import { createOrchestrator, type Orchestrator } from '../src/orchestrator';
import { ALL_ROLES, proxiesRunBy, type WorkerRoles } from '../src/worker-args';
import { startTestLab, type TestLab } from './lab/helpers';
import { startWorkerProcess, terminate } from './processes';
import { signingTestClient, TEST_USERS, testKey, testKeyFile, testPublicKey, unsignedClient } from './keys';
import { signRequest } from '../src/identity/keys';
import { testClientTls } from './tls';
import { connectionOptions, credentialsFor, temporalEnv, workerProcessEnv } from './server-access';

const run = promisify(execFile);

function required(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run integration tests through \`npm test -- <file>\`.`);
  return value;
}

export const temporalAddress = (): string => required('PF_TEST_TEMPORAL_ADDRESS');
export const temporalCli = (): string => required('PF_TEST_TEMPORAL_CLI');

/** How the Temporal CLI and the project CLI present themselves as an operator of `namespace` on `server`. */
const operatorCredentials = (namespace: string, server: string): Record<string, string> =>
  temporalEnv(credentialsFor(server, namespace, 'admin'));

/**
 * The environment in which the project CLI reaches `namespace` on the test server as an operator (on a secured
 * server: its CA and the admin's token).
 */
export const operatorEnv = (namespace: string): Record<string, string> => ({
  TEMPORAL_ADDRESS: temporalAddress(),
  TEMPORAL_NAMESPACE: namespace,
  ...operatorCredentials(namespace, temporalAddress()),
});

/** Runs the real `temporal` command against the test server, as an operator would type it. */
export async function temporal(namespace: string, ...args: string[]): Promise<{ stdout: string; stderr: string }> {
  return run(temporalCli(), [...args, '--address', temporalAddress(), '--namespace', namespace], {
    env: { ...process.env, ...operatorCredentials(namespace, temporalAddress()) },
  });
}

export async function createTestNamespace(server = temporalAddress()): Promise<string> {
  const namespace = `test-${randomUUID().slice(0, 8)}`;
  const cli = temporalCli();
  const target = ['--address', server, '--namespace', namespace];
  const env = { ...process.env, ...operatorCredentials(namespace, server) };
  await run(cli, ['operator', 'namespace', 'create', ...target, '--retention', '24h'], { env });
  const attributes = Object.values(SearchAttributes).flatMap((key) => ['--name', key.name, '--type', 'Keyword']);
  await run(cli, ['operator', 'search-attribute', 'create', ...target, ...attributes], { env });
  return namespace;
}

export interface TestOrchestrator extends Orchestrator {
  /** Signs every request with its requester's test key, as the project CLI does. */
  client: Client;
  /** Sends requests as the test gives them: unsigned, or signed by the test itself. */
  unsignedClient: Client;
  lab: TestLab;
  /**
   * Starts more workers on the same namespace and lab (a proxy's own worker, say), with the same configuration or
   * another one (as an operator's edit of the file would give the next worker).
   */
  startWorkersFor(
    roles: WorkerRoles,
    configure?: (labUrl: string) => Configuration,
  ): Promise<{ stop(): Promise<void> }>;
}

/** The test configuration's users with the run's keys; mallory has a key and no role. */
export const testUsers = (): Configuration['users'] =>
  (
    [
      ['alice', ['BackupAdministrator']],
      ['bob', ['BackupOperator', 'RestoreOperator']],
      ['carol', ['BackupOperator']],
      ['dave', ['RestoreOperator']],
      ['erin', ['BackupViewer']],
      ['mallory', ['BackupViewer']],
      ['scheduler', ['BackupOperator']],
    ] as const
  ).map(([name, roles]) => ({ name, roles: [...roles], keys: [testPublicKey(name)] }));

/**
 * The demo configuration's shape, pointed at a test lab: jobs and proxies as the test needs them; the workers present
 * the run's client certificate.
 */
export function testConfiguration(
  labUrl: string,
  overrides: Partial<Record<'hosts' | 'jobs' | 'proxies' | 'users' | 'requests' | 'scheduledRuns', unknown>>,
): Configuration {
  const adapter = { type: 'lab', url: labUrl };
  return parseConfiguration(
    JSON.stringify({
      hosts: [
        { name: 'prod-a', role: 'production', adapter },
        { name: 'dr-a', role: 'dr', adapter },
      ],
      backupRepository: { adapter },
      proxies: [{ name: 'proxy-a', slots: 4 }],
      tls: testClientTls(),
      users: testUsers(),
      scheduledRuns: { requestedBy: 'scheduler', key: testKeyFile('scheduler') },
      ...overrides,
    }),
    'test configuration',
  );
}

let runtimeInstalled = false;

/** A namespace of its own, a lab with the test's estate, and the orchestrator's workers, started. */
export async function startOrchestrator(options: {
  estate: EstateInput;
  configure: (labUrl: string) => Configuration;
  roles?: WorkerRoles;
  /** Another Temporal server than the run's (host:port), e.g. one with other dynamic configuration. */
  server?: string;
  /** How the workers reach the hosts, when not only through the test lab (an estate with KVM hosts). */
  connect?: (config: Configuration) => HypervisorPort;
  /** The configuration as it is now, for who may ask for what (a file the test edits), given the lab's URL. */
  currentConfig?: (config: Configuration) => () => Configuration;
}): Promise<TestOrchestrator> {
  if (!runtimeInstalled) {
    // The SDK core's own warnings (a poll retried while a test has the server down) are kept out too: core prints
    // only its errors. Not forwarded to the logger: forwarding holds the process open until a worker of this process
    // has run and shut down, and with PF_TEST_SPLIT_WORKERS=1 none does, so the test file would never exit.
    Runtime.install({
      logger: createLogger('ERROR'),
      telemetryOptions: { logging: { filter: { core: 'ERROR', other: 'ERROR' } } },
    });
    runtimeInstalled = true;
  }
  const server = options.server ?? temporalAddress();
  const namespace = await createTestNamespace(server);
  // The test's requests go as an operator's, with the admin's token on a secured server; the workers hold theirs.
  const operator = new Client({
    connection: await Connection.connect(connectionOptions(server, credentialsFor(server, namespace, 'admin'))),
    namespace,
  });
  const lab = await startTestLab(options.estate);
  const config = options.configure(lab.lab.url);
  const bundle = required('PF_TEST_WORKFLOW_BUNDLE');
  // A test's own `connect` (or `currentConfig`) hands the workers something of this process, which no other process
  // can share: its workers stay here also with PF_TEST_SPLIT_WORKERS=1.
  const split = process.env.PF_TEST_SPLIT_WORKERS === '1' && !options.connect && !options.currentConfig;
  const create = (roles: WorkerRoles | undefined, configuration = config): Promise<Orchestrator> =>
    split
      ? workerProcesses({ server, namespace, config: configuration, labUrl: lab.lab.url, bundle, roles, operator })
      : createOrchestrator({
          connectionOptions: connectionOptions(server, credentialsFor(server, namespace, 'workers')),
          namespace,
          config: configuration,
          currentConfig: options.currentConfig?.(configuration),
          port: options.connect?.(configuration) ?? lab.port,
          workflowBundle: { codePath: bundle },
          roles,
        });
  const orchestrator = await create(options.roles);
  const extra: Orchestrator[] = [];
  await orchestrator.startWorkers();
  return {
    ...orchestrator,
    client: signingTestClient(operator),
    unsignedClient: unsignedClient(operator),
    lab,
    async startWorkersFor(roles, configure) {
      const more = await create(roles, configure?.(lab.lab.url));
      extra.push(more);
      await more.startWorkers();
      return { stop: () => more.close() };
    },
    async close() {
      for (const more of extra) await more.close().catch(() => undefined);
      await orchestrator.close();
      await operator.connection.close();
      await lab.close();
    },
  };
}

/**
 * The workers of `roles` as processes of their own, as an operator deploys them: the orchestration in one and each
 * proxy in one, reaching the lab at `labUrl`; with the test's client (`operator`) in place of the workers' own.
 */
async function workerProcesses(options: {
  server: string;
  namespace: string;
  config: Configuration;
  labUrl: string;
  bundle: string;
  roles: WorkerRoles | undefined;
  operator: Client;
}): Promise<Orchestrator> {
  const { server, namespace, config } = options;
  const roles = options.roles ?? ALL_ROLES;
  const env = {
    ...workerProcessEnv(credentialsFor(server, namespace, 'workers')),
    PF_WORKER_ADDRESS: server,
    PF_WORKER_NAMESPACE: namespace,
    PF_WORKER_CONFIG: JSON.stringify(config),
    PF_WORKER_LAB_URL: options.labUrl,
    PF_WORKER_BUNDLE: options.bundle,
  };
  const perProcess: WorkerRoles[] = [
    ...(roles.orchestration ? [{ orchestration: true, proxies: [] }] : []),
    ...proxiesRunBy(roles, config).map((proxy) => ({ orchestration: false, proxies: [proxy.name] })),
  ];
  let running: ChildProcessWithoutNullStreams[] = [];
  const stopWorkers = async (): Promise<void> => {
    await Promise.all(running.map(terminate));
    running = [];
  };
  return {
    client: options.operator,
    config,
    namespace,
    async startWorkers() {
      const started = await Promise.allSettled(
        perProcess.map((own) => startWorkerProcess({ ...env, PF_WORKER_ROLES: JSON.stringify(own) })),
      );
      running = started.flatMap((s) => (s.status === 'fulfilled' ? [s.value] : []));
      const failed = started.find((s): s is PromiseRejectedResult => s.status === 'rejected');
      if (failed) {
        await stopWorkers();
        throw failed.reason;
      }
    },
    stopWorkers,
    close: stopWorkers,
  };
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Polls `probe` until it returns a value; fails naming `what` after `ms`. */
export async function within<T>(what: string, ms: number, probe: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const found = await probe();
    if (found !== undefined) return found;
    if (Date.now() > deadline) assert.fail(`timed out after ${ms / 1000} s waiting for ${what}`);
    await sleep(200);
  }
}

/** Awaits `promise`, failing the test naming `what` if it has not settled after `ms`. */
export async function settlesWithin<T>(what: string, ms: number, promise: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms / 1000} s waiting for ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Sends an operation to replica/<vm> through the real `temporal` command, as an operator would: a signal returns
 * once the server recorded it, an update once the operation finished (its output says how).
 */
export async function operationByCli(
  namespace: string,
  form: 'signal' | 'update',
  vm: string,
  operation: OperationName,
  payload: object,
): Promise<string> {
  const command = form === 'signal' ? ['signal'] : ['update', 'execute'];
  const signed = signedFor(operation, replicaWorkflowId(vm), payload);
  const target = ['--workflow-id', replicaWorkflowId(vm), '--name', operation, '--input', JSON.stringify(signed)];
  const { stdout } = await temporal(namespace, 'workflow', ...command, ...target);
  return stdout;
}

/**
 * A request as `failover sign` prints it, signed with its requester's test key; as given when it names no requester
 * or one without a key (the refusal is then what the test is about).
 */
export function signedFor(operation: SignedOperation, target: string, payload: object): object {
  const requestedBy = (payload as { requestedBy?: unknown }).requestedBy;
  if (typeof requestedBy !== 'string' || !(TEST_USERS as readonly string[]).includes(requestedBy)) return payload;
  return signRequest(operation, target, payload as Record<string, unknown>, testKey(requestedBy));
}

/** The replica's view once the operation requested with this reason has finished (or was refused). */
export const operationFinished = (
  client: Client,
  vm: string,
  operation: OperationName,
  reason: string,
  ms = 60_000,
): Promise<ReplicaView> =>
  within(`${operation} of ${vm} (${reason}) to finish`, ms, async () => {
    const view = await client.workflow.getHandle(replicaWorkflowId(vm)).query(replicaQueries.state);
    const run = view.lastRun;
    return run?.kind === operation && run.reason === reason && view.currentSession === null ? view : undefined;
  });
