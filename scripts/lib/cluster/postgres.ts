// The cluster's database: a private PostgreSQL of its own under the state directory (made once, started and stopped
// with the cluster), or one given by connection settings; and the Temporal schemas on it, set up or upgraded.
import { execFile, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, chownSync, mkdirSync, openSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { promisify } from 'node:util';
import { exists, readJson, writeFileAtomic } from '../../../src/host-api/persist';
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

/**
 * Where a private database goes when PostgreSQL's user cannot enter the state directory (the cluster run as root from
 * a home directory only its owner may enter): a directory of its own here, owned by that user, never a change to the
 * modes of the operator's directories.
 */
export const OUTSIDE_DATABASES_DIR = '/var/lib/planned-failover/postgres';

/** <stateDir>/postgres-location: where the private database's files are, when not in the state directory. */
interface DatabaseLocation {
  dir: string;
  why: string;
}

const locationFile = (stateDir: string): string => join(stateDir, 'postgres-location.json');

/** Whether `user` may enter `dir` (search permission on it and every directory above it), as PostgreSQL would run. */
function reaches(user: { uid: number; gid: number }, dir: string): boolean {
  return spawnSync('test', ['-x', dir], { uid: user.uid, gid: user.gid }).status === 0;
}

/**
 * The directory that holds the private database's data, socket and scratch files: the state directory, or the one
 * recorded for it (decided when the database is first made, kept for its life).
 */
async function databaseHome(
  stateDir: string,
  owner: ReturnType<typeof databaseOwner>,
): Promise<{ dir: string; made?: DatabaseLocation }> {
  const recorded = await readJson<DatabaseLocation>(locationFile(stateDir));
  if (recorded) return { dir: recorded.dir };
  // A database already made in the state directory stays there.
  if (!owner || (await exists(join(stateDir, 'postgres', 'PG_VERSION'))) || reaches(owner, stateDir))
    return { dir: stateDir };
  const name = basename(stateDir).replace(/[^A-Za-z0-9._-]/g, '_');
  const location = {
    dir: join(OUTSIDE_DATABASES_DIR, `${name}-${randomBytes(4).toString('hex')}`),
    why: `PostgreSQL runs as the user ${owner.name}, which cannot enter ${stateDir}`,
  };
  mkdirSync(OUTSIDE_DATABASES_DIR, { recursive: true, mode: 0o755 });
  mkdirSync(location.dir, { mode: 0o700 });
  // Which cluster it belongs to, for whoever finds it there.
  writeFileSync(join(location.dir, 'cluster-state-dir'), `${stateDir}\n`);
  chownSync(location.dir, owner.uid, owner.gid);
  // Recorded before anything is made there: a start cut short finds it again instead of making another.
  await writeFileAtomic(locationFile(stateDir), `${JSON.stringify(location, null, 2)}\n`);
  return { dir: location.dir, made: location };
}

/** Removes a private database kept outside its state directory (the state directory itself is the caller's). */
export async function removeOutsideDatabase(stateDir: string): Promise<void> {
  const recorded = await readJson<DatabaseLocation>(locationFile(stateDir));
  if (recorded) await rm(recorded.dir, { recursive: true, force: true });
}

export interface PrivatePostgres {
  group: ProcessGroup;
  /** Its data directory: in the state directory, or outside it (OUTSIDE_DATABASES_DIR). */
  dataDir: string;
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
  const home = await databaseHome(stateDir, owner);
  if (home.made) print(`${home.made.why}: its files go to ${home.made.dir} (recorded in ${locationFile(stateDir)}).`);
  const dataDir = join(home.dir, 'postgres');
  const socketDir = join(home.dir, 'postgres-run');
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
    if (initdb.status !== 0)
      throw new Error(`initdb failed: ${`${initdb.error?.message ?? ''}${initdb.stderr}`.trim()}`);
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
  return { group, dataDir, stop };
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
