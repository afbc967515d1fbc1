// What `npm run cluster` runs with, from its flags and the environment: pure, so that every refusal is tested.
import { readFileSync } from 'node:fs';
import { isAbsolute, join, resolve } from 'node:path';
import { z } from 'zod';

/** Every port the cluster listens on, derived from the frontend's so that one variable moves them all. */
export interface ClusterPorts {
  frontend: number;
  frontendHttp: number;
  history: number;
  matching: number;
  worker: number;
  /** Ringpop membership, one per service. */
  membership: { frontend: number; history: number; matching: number; worker: number };
  /** Prometheus, one per server process: the frontend one (or the only one), then the history one when split. */
  metrics: [number, number];
  ui: number;
  /** With --secure: the internal frontend the server's own worker service calls, and the JWT keys' HTTP server. */
  internalFrontend: { grpc: number; membership: number };
  jwks: number;
}

export type ClusterDatabase =
  { kind: 'private'; port: number } | { kind: 'external'; host: string; port: number; user: string; password: string };

export interface ClusterSettings {
  /** PostgreSQL's data (a private one), the rendered configuration, logs and what the first start fixed. */
  stateDir: string;
  namespace: string;
  /** Asked for by PF_CLUSTER_HISTORY_SHARDS; fixed by the first start of a database (Temporal cannot change it). */
  historyShards?: number;
  /** The history service in a process of its own, apart from frontend, matching and the worker service. */
  split: boolean;
  ui: boolean;
  /** TLS on the frontend (and between the server's services), Temporal's authorization on: see security.ts. */
  secure: boolean;
  ports: ClusterPorts;
  database: ClusterDatabase;
}

export class ClusterSettingsError extends Error {}

const port = z.coerce.number().int().min(1).max(65535);
const whole = (min: number, max: number) => z.coerce.number().int().min(min).max(max);

const envSchema = z.object({
  // The membership ports sit 300 below, the UI 1000 above, as in Temporal's own defaults (7233, 6933, 8233); the
  // server keeps membership ports in a smallint column, so they must stay below 32768.
  PF_CLUSTER_PORT: whole(1825, 33067).default(7233),
  PF_CLUSTER_UI_PORT: port.optional(),
  PF_CLUSTER_DIR: z.string().min(1).optional(),
  PF_CLUSTER_NAMESPACE: z
    .string()
    .regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$/, 'a Temporal namespace name (letters, digits, . _ -)')
    .default('default'),
  PF_CLUSTER_HISTORY_SHARDS: whole(1, 16384).optional(),
  PF_CLUSTER_PG_HOST: z.string().min(1).optional(),
  PF_CLUSTER_PG_PORT: port.optional(),
  PF_CLUSTER_PG_USER: z.string().min(1).default('temporal'),
  PF_CLUSTER_PG_PASSWORD: z.string().min(1).optional(),
  PF_CLUSTER_PG_PASSWORD_FILE: z.string().min(1).optional(),
});

const usage = 'usage: npm run cluster [-- --split] [--no-ui] [--secure]';

/** The flags `npm run cluster --` takes. */
function parseFlags(argv: string[]): { split: boolean; ui: boolean; secure: boolean } {
  const flags = { split: false, ui: true, secure: false };
  for (const arg of argv) {
    if (arg === '--split') flags.split = true;
    else if (arg === '--no-ui') flags.ui = false;
    else if (arg === '--secure') flags.secure = true;
    else throw new ClusterSettingsError(`unknown argument '${arg}'\n${usage}`);
  }
  // The Web UI server presents a caller's token only after an OIDC login, which this cluster has no provider for:
  // without one it would be refused everything, or would have to hold a token that lets anyone who reaches it in.
  if (flags.secure) flags.ui = false;
  return flags;
}

export function derivePorts(frontend: number, ui = frontend + 1000): ClusterPorts {
  return {
    frontend,
    frontendHttp: frontend + 10,
    history: frontend + 1,
    matching: frontend + 2,
    worker: frontend + 6,
    membership: { frontend: frontend - 300, history: frontend - 299, matching: frontend - 298, worker: frontend - 294 },
    metrics: [frontend + 767, frontend + 768],
    ui,
    // Temporal's own defaults for the internal frontend: 7236 and 6936.
    internalFrontend: { grpc: frontend + 3, membership: frontend - 297 },
    jwks: frontend + 5,
  };
}

export function clusterSettings(
  argv: string[],
  env: NodeJS.ProcessEnv,
  projectRoot: string,
  readSecret: (file: string) => string = (file) => readFileSync(file, 'utf8'),
): ClusterSettings {
  const flags = parseFlags(argv);
  const parsed = envSchema.safeParse(env);
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    const name = String(issue.path[0]);
    throw new ClusterSettingsError(`${name}: ${issue.message} (it is '${env[name]}')`);
  }
  const e = parsed.data;
  const stateDir = e.PF_CLUSTER_DIR
    ? isAbsolute(e.PF_CLUSTER_DIR)
      ? e.PF_CLUSTER_DIR
      : resolve(projectRoot, e.PF_CLUSTER_DIR)
    : join(projectRoot, '.data', 'cluster');
  return {
    stateDir,
    namespace: e.PF_CLUSTER_NAMESPACE,
    historyShards: e.PF_CLUSTER_HISTORY_SHARDS,
    ...flags,
    ports: derivePorts(e.PF_CLUSTER_PORT, e.PF_CLUSTER_UI_PORT),
    database: e.PF_CLUSTER_PG_HOST
      ? {
          kind: 'external',
          host: e.PF_CLUSTER_PG_HOST,
          port: e.PF_CLUSTER_PG_PORT ?? 5432,
          user: e.PF_CLUSTER_PG_USER,
          password: externalPassword(e.PF_CLUSTER_PG_PASSWORD, e.PF_CLUSTER_PG_PASSWORD_FILE, readSecret),
        }
      : privateDatabase(e),
  };
}

function privateDatabase(e: z.infer<typeof envSchema>): ClusterDatabase {
  for (const name of ['PF_CLUSTER_PG_PASSWORD', 'PF_CLUSTER_PG_PASSWORD_FILE'] as const) {
    if (e[name] !== undefined)
      throw new ClusterSettingsError(
        `${name} is set but PF_CLUSTER_PG_HOST is not: a private PostgreSQL makes its own password; ` +
          'set PF_CLUSTER_PG_HOST to use a PostgreSQL of yours',
      );
  }
  // 5433 with the default frontend port: beside, not on, a system PostgreSQL's 5432.
  return { kind: 'private', port: e.PF_CLUSTER_PG_PORT ?? e.PF_CLUSTER_PORT - 1800 };
}

function externalPassword(
  password: string | undefined,
  file: string | undefined,
  readSecret: (file: string) => string,
): string {
  if (password !== undefined && file !== undefined)
    throw new ClusterSettingsError('PF_CLUSTER_PG_PASSWORD and PF_CLUSTER_PG_PASSWORD_FILE are both set: set one');
  if (password !== undefined) return password;
  if (file === undefined)
    throw new ClusterSettingsError(
      'PF_CLUSTER_PG_HOST is set without a password: set PF_CLUSTER_PG_PASSWORD_FILE (a file that holds it) or ' +
        'PF_CLUSTER_PG_PASSWORD',
    );
  let text: string;
  try {
    text = readSecret(file);
  } catch (err) {
    throw new ClusterSettingsError(`PF_CLUSTER_PG_PASSWORD_FILE: cannot read ${file}: ${(err as Error).message}`);
  }
  // One line, as `echo secret > file` writes it.
  const secret = text.replace(/\r?\n$/, '');
  if (secret === '') throw new ClusterSettingsError(`PF_CLUSTER_PG_PASSWORD_FILE: ${file} is empty`);
  return secret;
}

/** Each port once, named, for the check that they are free and for what the start prints. */
export function listeningPorts(settings: ClusterSettings): [string, number][] {
  const { ports, database } = settings;
  return [
    ['frontend (gRPC)', ports.frontend],
    ['frontend (HTTP)', ports.frontendHttp],
    ['history', ports.history],
    ['matching', ports.matching],
    ['worker service', ports.worker],
    ...Object.entries(ports.membership).map(([service, p]): [string, number] => [`${service} membership`, p]),
    ['server metrics', ports.metrics[0]],
    ...(settings.split ? [['history metrics', ports.metrics[1]] as [string, number]] : []),
    ...(settings.secure
      ? ([
          ['internal frontend', ports.internalFrontend.grpc],
          ['internal frontend membership', ports.internalFrontend.membership],
          ['JWT keys (JWKS)', ports.jwks],
        ] as [string, number][])
      : []),
    ...(settings.ui ? [['Web UI', ports.ui] as [string, number]] : []),
    ...(database.kind === 'private' ? [['PostgreSQL', database.port] as [string, number]] : []),
  ];
}
