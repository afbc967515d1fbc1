// `npm run cluster` from a directory only its owner can enter (a clone in a mode-0700 home directory): run as root,
// PostgreSQL runs as the postgres user, which cannot reach a data directory there. The cluster keeps its private
// database in a directory of its own that the postgres user owns, records where, and touches no mode of the
// operator's directories; the next start finds the same database; removing the cluster removes it.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { installClusterPrograms, startCluster, type RunningCluster } from '../../scripts/lib/cluster/cluster';
import { OUTSIDE_DATABASES_DIR, removeOutsideDatabase } from '../../scripts/lib/cluster/postgres';
import type { ClusterSettings } from '../../scripts/lib/cluster/settings';
import { temporalCli } from '../harness';
import { testClusterSettings } from './helpers';

const run = promisify(execFile);
const asRoot = process.getuid?.() === 0;
const MARKER = 'owner-only-dir-marker';
const temporal = (cluster: RunningCluster, ...args: string[]) =>
  run(temporalCli(), [...args, '--address', cluster.address, '--namespace', cluster.namespace]);

describe('npm run cluster from a directory only its owner can enter', { skip: !asRoot && 'needs root' }, () => {
  let home: string;
  let settings: ClusterSettings;
  let cluster: RunningCluster | undefined;
  const start = async (): Promise<RunningCluster> =>
    (cluster = await startCluster({
      settings,
      programs: installClusterPrograms(),
      cli: temporalCli(),
      print: () => undefined,
      signal: new AbortController().signal,
    }));

  before(async () => {
    // As a clone in /root (mode 0700) would be: mkdtemp makes the directory 0700.
    home = await mkdtemp(join(tmpdir(), 'pf-owner-only-'));
    settings = await testClusterSettings(['--no-ui'], join(home, 'clone', '.data', 'cluster'));
  });

  after(async () => {
    await cluster?.stop();
    await removeOutsideDatabase(settings.stateDir);
    await rm(home, { recursive: true, force: true });
  });

  let dataDir: string;
  it("comes up, its database in a directory the postgres user owns, the operator's modes untouched", async () => {
    const started = await start();
    dataDir = started.databaseDir!;
    assert.ok(dataDir.startsWith(`${OUTSIDE_DATABASES_DIR}/`), dataDir);
    const location = JSON.parse(await readFile(join(settings.stateDir, 'postgres-location.json'), 'utf8')) as {
      dir: string;
    };
    assert.equal(join(location.dir, 'postgres'), dataDir);
    assert.equal((await readFile(join(location.dir, 'cluster-state-dir'), 'utf8')).trim(), settings.stateDir);
    const { stdout: postgresUid } = await run('id', ['-u', 'postgres']);
    for (const dir of [location.dir, dataDir]) {
      const { uid, mode } = await stat(dir);
      assert.equal(uid, Number(postgresUid.trim()), `${dir} is the postgres user's`);
      assert.equal(mode & 0o777, 0o700, `${dir} is the postgres user's alone`);
    }
    assert.equal((await stat(home)).mode & 0o777, 0o700, 'the owner-only directory keeps its mode');
    // Something only this database holds: a workflow that stays open (no worker polls its queue).
    await temporal(
      started,
      'workflow',
      'start',
      '--task-queue',
      'nobody-polls',
      '--type',
      'marker',
      '--workflow-id',
      MARKER,
    );
  });

  it('the next start finds the same database and what it holds', async () => {
    await cluster!.stop();
    cluster = undefined;
    const again = await start();
    assert.equal(again.databaseDir, dataDir);
    const { stdout } = await temporal(again, 'workflow', 'describe', '--workflow-id', MARKER, '-o', 'json');
    assert.equal(
      (JSON.parse(stdout) as { workflowExecutionInfo: { status: string } }).workflowExecutionInfo.status,
      'WORKFLOW_EXECUTION_STATUS_RUNNING',
    );
  });

  it('removing the cluster removes its database', async () => {
    await cluster!.stop();
    cluster = undefined;
    await removeOutsideDatabase(settings.stateDir);
    await assert.rejects(stat(dataDir), { code: 'ENOENT' });
  });
});
