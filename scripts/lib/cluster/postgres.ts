// The cluster's database: a private PostgreSQL of its own under the state directory (made once, started and stopped
// with the cluster), or one given by connection settings; and the Temporal schemas on it, set up or upgraded.
import { execFile, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, chownSync, mkdirSync, openSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { promisify } from 'node:util';
import { exists, writeFileAtomic } from '../../../src/host-api/persist';
import { commandOutput } from '../errors';
import { spawnProcessGroup, type ProcessGroup } from '../process-group';
import { DATABASES } from './config';

const run = promisify(execFile);

/** Whom PostgreSQL runs as: initdb and postgres refuse root, so as root it is Debian's postgres user. */
function databaseOwner(): { uid: number; gid: number; name: string } | undefined {
  if (process.getuid?.() !== 0) return undefined;
  const id = (flag: string): number => {
    const result = spawnSync('id', [flag, 'postgres'], { encoding: 'utf8' });
    if (result.status !== 0)
      throw new Error("PostgreSQL cannot run as root, and there is no 'postgres' user to run it");
    return Number(result.stdout.trim());
  };
  return { uid: id('-u'), gid: id('-g'), name: 'postgres' };
}

export interface PrivatePostgres {
  group: ProcessGroup;
  /** SIGINT is PostgreSQL's fast shutdown: sessions end, the data is checkpointed. */
  stop: () => Promise<void>;
}

export interface PrivatePostgresOptions {
  pgbin: string;
  stateDir: string;
  port: number;
  logFile: string;
  print: (line: string) => void;
  signal: AbortSignal;
}

/** The password of the private database: made at its creation, kept beside it, readable by its owner only. */
export async function privatePassword(stateDir: string): Promise<string> {
  const file = join(stateDir, 'postgres-password');
  if (await exists(file)) return readFileSync(file, 'utf8').trim();
  const password = randomBytes(18).toString('base64url');
  await writeFileAtomic(file, `${password}\n`, 0o600);
  return password;
}

/**
 * Creates the private database once (initdb into a scratch directory renamed into place when complete, so a crash
 * mid-way leaves nothing half made), then starts it and waits until it accepts connections.
 */
export async function startPrivatePostgres(options: PrivatePostgresOptions): Promise<PrivatePostgres> {
  const { pgbin, stateDir, port, print } = options;
  if (!pgbin) throw new Error('PostgreSQL is not installed (no initdb under /usr/lib/postgresql)');
  const owner = databaseOwner();
  const as = owner ? { uid: owner.uid, gid: owner.gid } : {};
  const dataDir = join(stateDir, 'postgres');
  const socketDir = join(stateDir, 'postgres-run');
  const password = await privatePassword(stateDir);
  const handOver = (dir: string): void => {
    if (owner) chownSync(dir, owner.uid, owner.gid);
  };

  if (!(await exists(join(dataDir, 'PG_VERSION')))) {
    print(`Creating the cluster's PostgreSQL database in ${dataDir}...`);
    const scratch = `${dataDir}.init`;
    rmSync(scratch, { recursive: true, force: true });
    mkdirSync(scratch, { recursive: true, mode: 0o700 });
    handOver(scratch);
    const passwordFile = `${dataDir}.password`; // initdb wants its directory empty
    writeFileSync(passwordFile, `${password}\n`, { mode: 0o600 });
    handOver(passwordFile);
    const initdb = spawnSync(
      join(pgbin, 'initdb'),
      [
        '-D',
        scratch,
        '-U',
        'temporal',
        `--pwfile=${passwordFile}`,
        '--auth-host=scram-sha-256',
        '--auth-local=scram-sha-256',
        '-E',
        'UTF8',
        '--locale=C',
      ],
      { ...as, encoding: 'utf8', cwd: '/' },
    );
    rmSync(passwordFile, { force: true });
    if (initdb.status !== 0) {
      const reason = `${initdb.error?.message ?? ''}${initdb.stderr}`.trim();
      const hint =
        owner && /permission denied/i.test(reason)
          ? ` (it runs as the user ${owner.name}, which must be able to reach ${stateDir}: set PF_CLUSTER_DIR to a ` +
            'directory outside a private home)'
          : '';
      throw new Error(`initdb failed${hint}: ${reason}`);
    }
    renameSync(scratch, dataDir);
  }

  mkdirSync(socketDir, { recursive: true, mode: 0o700 });
  handOver(socketDir);
  chmodSync(socketDir, 0o700);
  const log = openSync(options.logFile, 'a');
  const group = spawnProcessGroup(
    join(pgbin, 'postgres'),
    [
      '-D',
      dataDir,
      '-p',
      String(port),
      '-k',
      socketDir,
      '-c',
      'listen_addresses=127.0.0.1',
      // Each server process holds up to 30 (see CONNECTIONS) and the schema tool a few: room for a split cluster.
      '-c',
      'max_connections=200',
    ],
    { ...as, cwd: '/', stdio: ['ignore', log, log] },
  );
  const stop = (): Promise<void> => group.stop(30_000, 'SIGINT');
  const deadline = Date.now() + 60_000;
  for (;;) {
    const ready = spawnSync(join(pgbin, 'pg_isready'), ['-q', '-h', '127.0.0.1', '-p', String(port)]);
    if (ready.status === 0) break;
    if (group.done) throw new Error(`PostgreSQL exited with code ${await group.exited}; see ${options.logFile}`);
    if (options.signal.aborted || Date.now() > deadline) {
      await stop();
      throw new Error(
        options.signal.aborted ? 'Stopped while PostgreSQL was starting.' : `PostgreSQL was not ready in 60 s`,
      );
    }
    await delay(200);
  }
  return { group, stop };
}

export interface SchemaOptions {
  sqlTool: string;
  schemaDir: string;
  host: string;
  port: number;
  user: string;
  password: string;
}

/**
 * Creates the two databases and their schemas, or upgrades them to this server version's: each step is a no-op when
 * done already, so it runs on every start.
 */
export async function setUpSchemas(options: SchemaOptions): Promise<void> {
  const env = {
    ...process.env,
    SQL_PLUGIN: 'postgres12',
    SQL_HOST: options.host,
    SQL_PORT: String(options.port),
    SQL_USER: options.user,
    SQL_PASSWORD: options.password,
  };
  const tool = async (database: string, ...args: string[]): Promise<void> => {
    try {
      await run(options.sqlTool, ['--db', database, ...args], { env });
    } catch (err) {
      throw new Error(`temporal-sql-tool ${args[0]} of ${database} failed: ${commandOutput(err)}`, { cause: err });
    }
  };
  for (const [schema, database] of [
    ['temporal', DATABASES.default],
    ['visibility', DATABASES.visibility],
  ] as const) {
    await tool(database, 'create-database');
    await tool(database, 'setup-schema', '-v', '0.0');
    await tool(database, 'update-schema', '-d', join(options.schemaDir, schema, 'versioned'));
  }
}
