// A Temporal cluster on PostgreSQL, started and stopped as a whole: what `npm run cluster` runs, and what the tests
// that kill the server mid-failover start for themselves. Everything it starts is recorded in <stateDir>/cluster.pid,
// so that what a killed run left behind is found and stopped by the next one.
import { execFile, spawnSync } from 'node:child_process';
import { mkdirSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { promisify } from 'node:util';
import { SearchAttributes } from '../../../src/contract';
import { exists, readJson, writeFileAtomic } from '../../../src/host-api/persist';
import { portInUse, projectRoot, serverHealthy } from '../dev-server';
import { commandOutput } from '../errors';
import { runs, stopOrphanGroup } from '../pid-file';
import { spawnProcessGroup, type ProcessGroup } from '../process-group';
import { StopRequested } from '../stop';
import {
  databaseAddress,
  databaseEndpoint,
  databaseUser,
  METRICS_ADDRESS_ENV,
  PASSWORD_ENV,
  renderDynamicConfig,
  renderServerConfig,
  renderUiConfig,
  type ServerSecurity,
} from './config';
import { privatePassword, setUpSchemas, startPrivatePostgres } from './postgres';
import { authDirOf, ensureClusterTls, ensureTokens, serveJwks, signingKey, type TokenHolder } from './security';
import { ClusterSettingsError, listeningPorts, type ClusterSettings } from './settings';

const run = promisify(execFile);
const DEFAULT_SHARDS = 4;
/** Namespace retention: a failover session's history is its audit record. */
const RETENTION = '720h';

/** The programs install-cluster.sh built or found. */
export interface ClusterPrograms {
  server: string;
  sql: string;
  ui: string;
  schema: string;
  pgbin: string;
}

/** Runs scripts/install-cluster.sh: builds the server, its SQL tool and the UI server once, installs PostgreSQL. */
export function installClusterPrograms(): ClusterPrograms {
  const script = join(projectRoot, 'scripts', 'install-cluster.sh');
  const result = spawnSync('bash', [script], { stdio: ['ignore', 'pipe', 'inherit'], encoding: 'utf8' });
  if (result.status !== 0)
    throw new Error(`Installing the cluster's programs failed (exit ${result.status}); see above.`);
  const values = new Map(
    result.stdout
      .trim()
      .split('\n')
      .map((line) => [line.slice(0, line.indexOf('=')), line.slice(line.indexOf('=') + 1)]),
  );
  const value = (key: keyof ClusterPrograms): string => {
    const found = values.get(key);
    if (found === undefined) throw new Error(`install-cluster.sh printed no ${key}=`);
    return found;
  };
  return {
    server: value('server'),
    sql: value('sql'),
    ui: value('ui'),
    schema: value('schema'),
    pgbin: value('pgbin'),
  };
}

/** What the first start fixed, kept in <stateDir>/cluster.json. */
interface ClusterRecord {
  historyShards: number;
  database: string;
  createdAt: string;
}

/** The history shard count: fixed by a database's first start, so a different one asked for later is refused. */
async function historyShards(settings: ClusterSettings): Promise<number> {
  const file = join(settings.stateDir, 'cluster.json');
  const database = databaseAddress(settings);
  const record = await readJson<ClusterRecord>(file);
  if (record && record.database === database) {
    if (settings.historyShards !== undefined && settings.historyShards !== record.historyShards)
      throw new ClusterSettingsError(
        `PF_CLUSTER_HISTORY_SHARDS: this cluster was created with ${record.historyShards} history shards (` +
          `${file}), and Temporal cannot change that; unset it, or use a new PF_CLUSTER_DIR and database`,
      );
    return record.historyShards;
  }
  const shards = settings.historyShards ?? DEFAULT_SHARDS;
  const created: ClusterRecord = { historyShards: shards, database, createdAt: new Date().toISOString() };
  await writeFileAtomic(file, `${JSON.stringify(created, null, 2)}\n`);
  return shards;
}

/** <stateDir>/cluster.pid: the running cluster and what it started. */
interface PidRecord {
  pid: number;
  startedAt: string;
  children: { what: string; pid: number; marker: string }[];
}

class ClusterPidFile {
  private readonly record: PidRecord = { pid: process.pid, startedAt: new Date().toISOString(), children: [] };
  constructor(
    private readonly file: string,
    private readonly print: (line: string) => void,
  ) {}

  /** Refuses while another process runs this cluster; stops what a killed one left, last started first. */
  async claim(): Promise<void> {
    let earlier: PidRecord | undefined;
    try {
      earlier = JSON.parse(readFileSync(this.file, 'utf8')) as PidRecord;
    } catch {
      earlier = undefined;
    }
    if (earlier && earlier.pid !== process.pid && runs(earlier.pid, 'node'))
      throw new Error(
        `The cluster of ${this.file.replace(/\/cluster\.pid$/, '')} runs already (pid ${earlier.pid}, since ` +
          `${earlier.startedAt}). Stop it with Ctrl-C in its terminal, or: kill -TERM ${earlier.pid}`,
      );
    for (const child of [...(earlier?.children ?? [])].reverse()) {
      if (!runs(child.pid, child.marker)) continue;
      this.print(`Stopping ${child.what} (pid ${child.pid}) that a killed run of the cluster left running...`);
      await stopOrphanGroup(child.pid, child.marker, child.what, 30_000);
    }
    this.write();
  }

  add(what: string, group: ProcessGroup, marker: string): void {
    this.record.children.push({ what, pid: group.pid, marker });
    this.write();
  }

  release(): void {
    rmSync(this.file, { force: true });
  }

  private write(): void {
    writeFileSync(this.file, `${JSON.stringify(this.record)}\n`);
  }
}

async function refuseTakenPorts(settings: ClusterSettings): Promise<void> {
  const taken: string[] = [];
  for (const [what, port] of listeningPorts(settings)) if (await portInUse(port)) taken.push(`${port} (${what})`);
  if (taken.length > 0)
    throw new Error(
      `Port${taken.length > 1 ? 's' : ''} ${taken.join(', ')} ${taken.length > 1 ? 'are' : 'is'} in use. ` +
        'Stop what holds them (a dev server of npm run server or of the demo uses 7233 and 8233), or move the ' +
        'cluster: PF_CLUSTER_PORT=27233 npm run cluster (every port follows the frontend port).',
    );
}

/**
 * The environment of the cluster command's own `temporal` calls: the operator's TEMPORAL_* variables (an API key, a
 * profile for another server) left out, and a secured cluster's CA and admin token in.
 */
function cliEnvironment(extra: Record<string, string>): NodeJS.ProcessEnv {
  const env = Object.fromEntries(Object.entries(process.env).filter(([name]) => !name.startsWith('TEMPORAL_')));
  return { ...env, ...extra };
}

/** Creates the namespace and the contract's search attributes, retrying while the services are still joining. */
async function createNamespace(
  cli: string,
  address: string,
  namespace: string,
  env: NodeJS.ProcessEnv,
  signal: AbortSignal,
): Promise<void> {
  const temporal = (...args: string[]) =>
    run(cli, [...args, '--address', address, '--namespace', namespace, '--disable-config-file'], { env });
  const attributes = Object.values(SearchAttributes).flatMap((key) => ['--name', key.name, '--type', 'Keyword']);
  const deadline = Date.now() + 90_000;
  for (;;) {
    try {
      const described = await temporal('operator', 'namespace', 'describe').then(
        () => true,
        () => false,
      );
      if (!described) await temporal('operator', 'namespace', 'create', '--retention', RETENTION);
      await temporal('operator', 'search-attribute', 'create', ...attributes);
      return;
    } catch (err) {
      if (signal.aborted) throw new StopRequested('stopping');
      if (Date.now() > deadline)
        throw new Error(`Creating the namespace ${namespace} failed: ${commandOutput(err)}`, { cause: err });
      await delay(1_000);
    }
  }
}

/** One server process: all four services, or (split) the history service or the other three. */
export interface ServerProcess {
  name: 'server' | 'history' | 'frontend';
  services: string[];
  group: ProcessGroup;
  metricsUrl: string;
  log: string;
}

/** How callers reach a secured cluster: its CA, and the token files of its callers (mode 0600). */
export interface ClusterAccess {
  ca: string;
  tokens: Record<TokenHolder, string>;
  /** When the first token expires; the next start issues it again. */
  tokensNotAfter: Date;
  jwksUrl: string;
}

export interface RunningCluster {
  address: string;
  namespace: string;
  /** With --secure. */
  access?: ClusterAccess;
  /** A private PostgreSQL's data directory. */
  databaseDir?: string;
  historyShards: number;
  servers: ServerProcess[];
  ui?: ProcessGroup;
  uiUrl?: string;
  logDir: string;
  /** Starts a server process again with the same services (after it was killed, say). */
  restartServer(name: ServerProcess['name']): Promise<ServerProcess>;
  /** Resolves with the first process of the cluster that exits while it is not being stopped. */
  firstExit(): Promise<{ what: string; code: number | null; log: string }>;
  /** The Web UI, the server processes (the frontend first) and PostgreSQL, in that order. */
  stop(): Promise<void>;
}

export interface StartClusterOptions {
  settings: ClusterSettings;
  programs: ClusterPrograms;
  /** The Temporal CLI, for the health check and the namespace. */
  cli: string;
  print: (line: string) => void;
  /** Stops the start: what it started so far is stopped, and it rejects with StopRequested. */
  signal: AbortSignal;
}

/** Why a server process exited, as the last error in its log says, and where the rest is. */
function exitedWhy(server: ServerProcess): string {
  let last = '';
  try {
    const lines = readFileSync(server.log, 'utf8').trimEnd().split('\n').reverse();
    last =
      lines.find((line) => line.startsWith('Unable to ')) ??
      lines.find((line) => line.includes('"level":"error"')) ??
      '';
  } catch {
    // No log: the message names where it should have been.
  }
  const said = last.length > 400 ? `${last.slice(0, 400)}...` : last;
  return `The Temporal ${server.name} process exited${said ? `: ${said}` : ''}; see ${server.log}`;
}

/** The order the server processes start in; they stop in the reverse one. A secured one runs the internal frontend. */
function serverLayout(split: boolean, secure: boolean): Pick<ServerProcess, 'name' | 'services'>[] {
  const frontends = secure ? ['frontend', 'internal-frontend'] : ['frontend'];
  return split
    ? [
        { name: 'history', services: ['history'] },
        { name: 'frontend', services: [...frontends, 'matching', 'worker'] },
      ]
    : [{ name: 'server', services: [...frontends, 'history', 'matching', 'worker'] }];
}

export async function startCluster(options: StartClusterOptions): Promise<RunningCluster> {
  const { settings, programs, cli, print, signal } = options;
  const { stateDir, ports, namespace } = settings;
  // A secured cluster started again without --secure would answer anyone: that takes removing its keys on purpose.
  if (!settings.secure && (await exists(authDirOf(stateDir))))
    throw new ClusterSettingsError(
      `the cluster of ${stateDir} runs secured: start it with --secure (npm run cluster -- --secure); to run it ` +
        `without TLS and authorization, remove ${authDirOf(stateDir)} first (its JWT key and tokens)`,
    );
  const logDir = join(stateDir, 'logs');
  mkdirSync(logDir, { recursive: true });
  const logOf = (name: string): string => join(logDir, `${name}.log`);
  const pidFile = new ClusterPidFile(join(stateDir, 'cluster.pid'), print);
  await pidFile.claim();

  // Last started first. Each stop has its own budget: PostgreSQL checkpoints, the server drains its shards.
  const stoppers: (() => Promise<void>)[] = [async () => pidFile.release()];
  let stopping = false;
  const stopAll = async (): Promise<void> => {
    stopping = true;
    for (const stop of stoppers.splice(0).reverse()) await stop();
  };
  const checkStop = (): void => {
    if (signal.aborted) throw new StopRequested('stopping');
  };
  try {
    await refuseTakenPorts(settings);
    const shards = await historyShards(settings);

    let password: string;
    let databaseDir: string | undefined;
    if (settings.database.kind === 'private') {
      const pg = await startPrivatePostgres({
        pgbin: programs.pgbin,
        stateDir,
        port: settings.database.port,
        logFile: logOf('postgres'),
        print,
        signal,
      });
      pidFile.add('PostgreSQL', pg.group, pg.dataDir);
      stoppers.push(pg.stop);
      databaseDir = pg.dataDir;
      password = await privatePassword(stateDir);
    } else {
      password = settings.database.password;
    }
    checkStop();
    print(`PostgreSQL at ${databaseAddress(settings)}: setting up or upgrading the Temporal schemas...`);
    await setUpSchemas({
      sqlTool: programs.sql,
      schemaDir: programs.schema,
      ...databaseEndpoint(settings),
      user: databaseUser(settings),
      password,
    });

    // Secured: the server reads its JWT keys from us at start, so they are served before it starts.
    let access: ClusterAccess | undefined;
    let security: ServerSecurity | undefined;
    let cliEnv = cliEnvironment({});
    if (settings.secure) {
      const tls = await ensureClusterTls(stateDir);
      const key = await signingKey(stateDir);
      const tokens = await ensureTokens(stateDir, key, namespace);
      const jwks = await serveJwks(ports.jwks, key);
      stoppers.push(() => jwks.close());
      security = { tls, jwksUrl: jwks.url };
      access = { ca: tls.ca, tokens: tokens.files, tokensNotAfter: tokens.notAfter, jwksUrl: jwks.url };
      cliEnv = cliEnvironment({ TEMPORAL_TLS_SERVER_CA_CERT_PATH: tls.ca, TEMPORAL_API_KEY: tokens.admin });
    }

    // The server's configuration is rendered anew on every start; the dynamic one is the operator's once written.
    const configDir = join(stateDir, 'config');
    const dynamicConfig = join(configDir, 'dynamicconfig.yaml');
    if (!(await exists(dynamicConfig))) await writeFileAtomic(dynamicConfig, renderDynamicConfig());
    await writeFileAtomic(
      join(configDir, 'cluster.yaml'),
      renderServerConfig(settings, dynamicConfig, shards, security),
    );

    const servers: ServerProcess[] = [];
    const startServer = (layout: Pick<ServerProcess, 'name' | 'services'>): ServerProcess => {
      const metricsPort = layout.name === 'history' ? ports.metrics[1] : ports.metrics[0];
      const metrics = `127.0.0.1:${metricsPort}`;
      const log = logOf(layout.name);
      // Without --secure there is no authorizer, which the server refuses unless told that it is meant.
      const args = ['-r', stateDir, '-c', 'config', '-e', 'cluster', ...(security ? [] : ['--allow-no-auth']), 'start'];
      const group = spawnProcessGroup(programs.server, [...args, ...layout.services.flatMap((s) => ['--service', s])], {
        stdio: ['ignore', openSync(log, 'a'), openSync(log, 'a')],
        env: { ...process.env, [PASSWORD_ENV]: password, [METRICS_ADDRESS_ENV]: metrics },
      });
      pidFile.add(`the Temporal ${layout.name} process`, group, stateDir);
      const server = { ...layout, group, metricsUrl: `http://${metrics}/metrics`, log };
      print(
        `Started the Temporal ${layout.services.join(', ')} service${layout.services.length > 1 ? 's' : ''} (pid ${group.pid}).`,
      );
      return server;
    };
    // One stopper for all of them, so that a restarted process is stopped too, the frontend first.
    stoppers.push(async () => {
      for (const server of [...servers].reverse()) await server.group.stop(10_000);
    });
    const grpcPort = { server: ports.frontend, frontend: ports.frontend, history: ports.history };
    const layouts = serverLayout(settings.split, settings.secure);
    for (const layout of layouts) {
      const server = startServer(layout);
      servers.push(server);
      // On an empty database each process would write the cluster's metadata, and the loser of that race exits
      // (a duplicate key): the next process starts once this one serves, its metadata written.
      if (servers.length < layouts.length) {
        const started = Date.now();
        while (!(await portInUse(grpcPort[server.name]))) {
          checkStop();
          if (server.group.done) throw new Error(exitedWhy(server));
          if (Date.now() - started > 120_000)
            throw new Error(`The Temporal ${server.name} process did not serve in 120 s`);
          await delay(100);
        }
      }
    }

    const address = `127.0.0.1:${ports.frontend}`;
    const deadline = Date.now() + 120_000;
    while (!(await serverHealthy(cli, address, cliEnv))) {
      checkStop();
      const dead = servers.find((s) => s.group.done);
      if (dead) throw new Error(exitedWhy(dead));
      if (Date.now() > deadline) throw new Error(`The Temporal frontend at ${address} was not ready in 120 s`);
      await delay(250);
    }
    await createNamespace(cli, address, namespace, cliEnv, signal);

    let ui: ProcessGroup | undefined;
    if (settings.ui) {
      const uiRoot = join(stateDir, 'ui');
      await writeFileAtomic(join(uiRoot, 'config', 'cluster.yaml'), renderUiConfig(settings));
      const log = logOf('ui');
      const uiGroup = spawnProcessGroup(
        programs.ui,
        ['--root', uiRoot, '--config', 'config', '--env', 'cluster', 'start'],
        {
          stdio: ['ignore', openSync(log, 'a'), openSync(log, 'a')],
        },
      );
      ui = uiGroup;
      pidFile.add('the Temporal Web UI', uiGroup, uiRoot);
      stoppers.push(() => uiGroup.stop(5_000));
      const uiDeadline = Date.now() + 30_000;
      while (!(await portInUse(ports.ui))) {
        checkStop();
        if (uiGroup.done) throw new Error(`The Temporal Web UI exited; see ${log}`);
        if (Date.now() > uiDeadline) throw new Error(`The Temporal Web UI was not listening in 30 s; see ${log}`);
        await delay(200);
      }
    }

    return {
      address,
      namespace,
      access,
      databaseDir,
      historyShards: shards,
      servers,
      ui,
      uiUrl: settings.ui ? `http://127.0.0.1:${ports.ui}` : undefined,
      logDir,
      async restartServer(name) {
        const index = servers.findIndex((s) => s.name === name);
        if (index < 0) throw new Error(`This cluster has no ${name} process`);
        const old = servers[index]!;
        if (!old.group.done) throw new Error(`The Temporal ${name} process still runs (pid ${old.group.pid})`);
        const restarted = startServer(old);
        servers[index] = restarted;
        return restarted;
      },
      async firstExit() {
        // A process replaced by restartServer is not the cluster's any more: each round watches the current ones.
        for (;;) {
          const watched = [
            ...servers.map((s) => ({ what: `the Temporal ${s.name} process`, group: s.group, log: s.log })),
            ...(ui ? [{ what: 'the Temporal Web UI', group: ui, log: logOf('ui') }] : []),
          ];
          const first = await Promise.race(
            watched.map((w) => w.group.exited.then((code) => ({ what: w.what, code, log: w.log, group: w.group }))),
          );
          if (stopping) return new Promise<never>(() => undefined);
          if (servers.some((s) => s.group === first.group) || first.group === ui)
            return { what: first.what, code: first.code, log: first.log };
        }
      },
      stop: stopAll,
    };
  } catch (err) {
    await stopAll();
    throw err;
  }
}
