// Which of the orchestrator's workers a worker process runs, and how the operator says so on its command line:
// everything in one process, or the orchestration and each proxy as processes of their own, on machines of their own.
// Pure: nothing here reads files or connects, so a refused command line changes nothing.
import { Command, CommanderError } from 'commander';
import { z } from 'zod';
import type { Configuration, ProxyConfig } from './config/schema';
import { formatProblems, proxyTaskQueue, TASK_QUEUE, validate } from './contract';

/** The demo's configuration with this machine's keys, written from config/planned-failover.yaml (src/config/demo.ts). */
export const DEFAULT_CONFIG_PATH = '.data/planned-failover.yaml';
export const DEFAULT_CONFIG_TEMPLATE = 'config/planned-failover.yaml';

/** Which workers a process runs: the orchestration (workflows and control activities) and which proxies. */
export interface WorkerRoles {
  orchestration: boolean;
  proxies: 'all' | string[];
}

export const ALL_ROLES: WorkerRoles = { orchestration: true, proxies: 'all' };

/** The configured proxies whose workers a process with these roles runs. */
export function proxiesRunBy(roles: WorkerRoles, config: Configuration): ProxyConfig[] {
  return config.proxies.filter((proxy) => roles.proxies === 'all' || roles.proxies.includes(proxy.name));
}

/** The task queues a process with these roles polls. */
export function taskQueuesPolledBy(roles: WorkerRoles, config: Configuration): string[] {
  return [
    ...(roles.orchestration ? [TASK_QUEUE] : []),
    ...proxiesRunBy(roles, config).map((proxy) => proxyTaskQueue(proxy.name)),
  ];
}

/** What `--only` asks for: the orchestration alone, or these proxies alone. */
export type WorkerSelection = { role: 'orchestration' } | { role: 'proxy'; proxies: string[] };

export interface WorkerArgs {
  configPath: string;
  /** Where to serve Prometheus metrics (host:port); unset: nowhere. */
  metricsAddress?: string;
  /** Unset: every worker. */
  only?: WorkerSelection;
}

/** A command line the worker refuses to start with (exit code 2); the message names the flag. */
export class WorkerArgsError extends Error {
  override name = 'WorkerArgsError';
}

const ONLY = '--only';
const WHAT = 'The worker command line';

const quoted = (names: readonly string[]): string => names.map((n) => `'${n}'`).join(', ');

const onlySchema = z
  .array(z.string())
  .superRefine(([role, ...names], ctx) => {
    const problem = (message: string) => ctx.addIssue({ code: 'custom', message });
    if (role === 'orchestration') {
      if (names.length > 0) problem(`orchestration takes no names, not ${quoted(names)}`);
    } else if (role === 'proxy') {
      if (names.length === 0)
        problem('proxy needs the names of the proxies to run, as in --only proxy proxy01 proxy02');
      const twice = names.filter((name, i) => names.indexOf(name) !== i);
      if (twice.length > 0) problem(`names ${quoted([...new Set(twice)])} more than once`);
    } else problem(`must be orchestration or proxy <name...>, not '${role}'`);
  })
  .transform(([role, ...names]): WorkerSelection =>
    role === 'proxy' ? { role, proxies: names } : { role: 'orchestration' },
  );

const METRICS = '--metrics';

const argsSchema = z.strictObject({
  [ONLY]: onlySchema.optional(),
  '--config': z.string().min(1, { error: 'must name a file' }),
  [METRICS]: z
    .string()
    .regex(/^[A-Za-z0-9.-]+:\d{1,5}$/, { error: 'must be host:port, as in 127.0.0.1:9464' })
    .refine((address) => Number(address.split(':')[1]) <= 65535, { error: 'has a port above 65535' })
    .optional(),
});

/**
 * Reads the worker's command line (`npm run worker -- [--only orchestration | --only proxy <name...>] [--config
 * <file>]`): what it asks for, or the help text for --help. Throws WorkerArgsError for anything else.
 */
export function parseWorkerArgs(
  argv: readonly string[],
  env: NodeJS.ProcessEnv = process.env,
): WorkerArgs | { help: string } {
  let help = '';
  const program = new Command('npm run worker --')
    .description(
      "The orchestrator's workers: the orchestration (workflows and control activities) and every configured proxy's " +
        "worker, all in this process unless --only says otherwise. Connection settings are the Temporal CLI's: " +
        'TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TEMPORAL_API_KEY, temporal.toml profiles.',
    )
    .option(
      '--only <role...>',
      'run only the orchestration (`orchestration`) or only these proxies (`proxy <name...>`)',
    )
    .option('--config <file>', 'the configuration file (PF_CONFIG)', env.PF_CONFIG ?? DEFAULT_CONFIG_PATH)
    .option(
      '--metrics <host:port>',
      "serve Prometheus metrics there: the SDK's and, with the orchestration, the orchestrator's (PF_METRICS_ADDRESS)",
      env.PF_METRICS_ADDRESS || undefined,
    )
    .addHelpText(
      'after',
      '\nExamples, each on a machine of its own:\n' +
        '  npm run worker -- --only orchestration --metrics 0.0.0.0:9464\n' +
        '  npm run worker -- --only proxy proxy01\n' +
        '  npm run worker -- --only proxy proxy02 proxy03',
    )
    // Refusals become WorkerArgsError; help is returned; nothing is printed here.
    .exitOverride()
    .configureOutput({ writeOut: (text) => (help += text), writeErr: () => undefined });
  try {
    program.parse([...argv], { from: 'user' });
  } catch (err) {
    if (!(err instanceof CommanderError)) throw err;
    if (err.exitCode === 0) return { help };
    throw new WorkerArgsError(`${err.message}; see npm run worker -- --help`);
  }
  const options = program.opts<{ only?: string[]; config: string; metrics?: string }>();
  const checked = validate(argsSchema, {
    [ONLY]: options.only,
    '--config': options.config,
    [METRICS]: options.metrics,
  });
  if (!checked.ok) throw new WorkerArgsError(formatProblems(WHAT, checked.problems));
  const { [ONLY]: only, [METRICS]: metricsAddress } = checked.value;
  return {
    configPath: checked.value['--config'],
    ...(only ? { only } : {}),
    ...(metricsAddress ? { metricsAddress } : {}),
  };
}

/** The workers to run for these arguments; every proxy `--only` names must be in the configuration. */
export function workerRolesFor(args: WorkerArgs, config: Configuration): WorkerRoles {
  const { only } = args;
  if (!only) return ALL_ROLES;
  if (only.role === 'orchestration') return { orchestration: true, proxies: [] };
  const configured = config.proxies.map((proxy) => proxy.name);
  const unknown = only.proxies.filter((name) => !configured.includes(name));
  if (unknown.length > 0) {
    const message = `${args.configPath} has no proxy ${quoted(unknown)}; its proxies are ${quoted(configured)}`;
    throw new WorkerArgsError(formatProblems(WHAT, [{ path: ONLY, message }]));
  }
  return { orchestration: false, proxies: only.proxies };
}
