// `npm run cluster -- --secure --split` as an operator runs it, from a clone in a directory only its owner can
// enter: a caller without a token (or with one the cluster did not sign) can neither list, start nor signal; the
// internal frontend answers only the cluster's internode certificate; the admin token works; the workers' token is
// enough for the real workers (src/worker.ts, connected through the Temporal CLI's environment variables) to run a
// planned failover of a small lab estate, and no more than that; the server's own worker service runs the job's
// schedule.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Client, Connection } from '@temporalio/client';
import { NativeConnection } from '@temporalio/worker';
import { removeOutsideDatabase } from '../../scripts/lib/cluster/postgres';
import { INTERNODE_NAME, signingKey, signToken } from '../../scripts/lib/cluster/security';
import { connectionSettings, startReplicationJob } from '../../src/client';
import { SearchAttributes, type PlannedFailoverResult } from '../../src/contract';
import { jobScheduleId } from '../../src/schedules';
import { entityState, startFailover } from '../failover-helpers';
import { temporalCli, testConfiguration, within } from '../harness';
import { testSigner } from '../keys';
import { DR, estateOf, MiB, startTestLab, type TestLab } from '../lab/helpers';
import { runScript, startScript, terminate, type ServingProcess } from '../processes';
import { testClusterSettings } from './helpers';

const VM = 'sec-web';
const JOB = `job-${VM}`;
/** The last line the cluster prints once it is up. */
const READY = /^Press Ctrl-C to stop the cluster/;
/** The orchestration's process bundles the workflows at start: seconds, more on a busy machine. */
const WORKER_READY_MS = 180_000;
const DENIED = 'Request unauthorized.';

interface CliRun {
  code: number;
  stdout: string;
  stderr: string;
}

/** The Temporal CLI with only these TEMPORAL_* variables (none of the test's environment), never throwing. */
function temporal(env: Record<string, string>, ...args: string[]): Promise<CliRun> {
  const clean = Object.fromEntries(Object.entries(process.env).filter(([name]) => !name.startsWith('TEMPORAL_')));
  return new Promise((resolveRun) =>
    execFile(
      temporalCli(),
      [...args, '--disable-config-file', '--command-timeout', '20s'],
      { env: { ...clean, ...env } },
      (err, stdout, stderr) =>
        resolveRun({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr }),
    ),
  );
}

describe('npm run cluster -- --secure', () => {
  let home: string;
  let stateDir: string;
  let cluster: ServingProcess | undefined;
  let address: string;
  let internalFrontend: string;
  /** What the cluster printed: its CA and the token files. */
  let ca: string;
  let tokenFiles: { admin: string; workers: string };
  let tokens: { admin: string; workers: string };
  /** The Temporal CLI's variables for the cluster, with this API key (or none). */
  let envWith: (apiKey?: string) => Record<string, string>;
  const started = Date.now();

  before(async () => {
    // A clone in a home directory only its owner can enter (mkdtemp makes it 0700), as under /root.
    home = await mkdtemp(join(tmpdir(), 'pf-secure-'));
    // Split: the history service in a process of its own, reached over internode mutual TLS.
    const settings = await testClusterSettings(['--secure', '--split'], join(home, 'clone', '.data', 'cluster'));
    stateDir = settings.stateDir;
    address = `127.0.0.1:${settings.ports.frontend}`;
    internalFrontend = `127.0.0.1:${settings.ports.internalFrontend.grpc}`;
    cluster = await startScript(
      'scripts/cluster.ts',
      ['--secure', '--split'],
      { PF_CLUSTER_PORT: String(settings.ports.frontend), PF_CLUSTER_DIR: stateDir },
      READY,
      300_000,
    );
    const output = cluster.output();
    // The variables exactly as it prints them for the workers and clients.
    const printed = Object.fromEntries(
      /^ {2}export (.+)$/m
        .exec(output)![1]!
        .split(' ')
        .map((pair) => [pair.slice(0, pair.indexOf('=')), pair.slice(pair.indexOf('=') + 1)]),
    ) as Record<string, string>;
    ca = printed.TEMPORAL_TLS_SERVER_CA_CERT_PATH!;
    tokenFiles = {
      admin: /^ {2}(\S+): default:admin, /m.exec(output)![1]!,
      workers: /^ {2}(\S+): default:write, /m.exec(output)![1]!,
    };
    tokens = {
      admin: (await readFile(tokenFiles.admin, 'utf8')).trim(),
      workers: (await readFile(tokenFiles.workers, 'utf8')).trim(),
    };
    assert.equal(printed.TEMPORAL_ADDRESS, address);
    envWith = (apiKey) => ({ ...printed, ...(apiKey ? { TEMPORAL_API_KEY: apiKey } : {}) });
  });

  after(async () => {
    if (cluster) await terminate(cluster.child);
    await removeOutsideDatabase(stateDir);
    await rm(home, { recursive: true, force: true });
  });

  it('prints how to connect: the CA and the token files under its state, mode 0600, no token itself', async () => {
    const output = cluster!.output();
    assert.ok(ca.startsWith(`${stateDir}/`), ca);
    for (const file of [tokenFiles.admin, tokenFiles.workers]) {
      assert.ok(file.startsWith(`${stateDir}/`), file);
      assert.equal((await stat(file)).mode & 0o777, 0o600, file);
    }
    assert.ok(!output.includes(tokens.admin) && !output.includes(tokens.workers), 'no token is printed');
    assert.deepEqual(Object.keys(envWith()).sort(), [
      'TEMPORAL_ADDRESS',
      'TEMPORAL_NAMESPACE',
      'TEMPORAL_TLS_SERVER_CA_CERT_PATH',
      'TEMPORAL_TLS_SERVER_NAME',
    ]);
    assert.match(output, /^Secured: the frontend serves TLS/m);
    assert.match(output, new RegExp(`^ {2}TEMPORAL_API_KEY="\\$\\(cat ${tokenFiles.workers}\\)" npm run worker`, 'm'));
    assert.match(
      output,
      new RegExp(`^ {2}TEMPORAL_API_KEY="\\$\\(cat ${tokenFiles.admin}\\)" temporal workflow list`, 'm'),
    );
  });

  it('refuses to start the same cluster without --secure, which would answer anyone', async () => {
    const env = { PF_CLUSTER_PORT: address.split(':')[1]!, PF_CLUSTER_DIR: stateDir };
    const insecure = await runScript('scripts/cluster.ts', ['--no-ui'], env);
    assert.equal(insecure.code, 2, insecure.stdout);
    assert.match(insecure.stderr, /runs secured: start it with --secure .*remove .*\/auth first/);
    assert.ok(!cluster!.child.killed && cluster!.child.exitCode === null, 'the running cluster is left alone');
  });

  it('refuses a caller without a token, or with a token it did not sign: no list, no start, no signal', async () => {
    const list = await temporal(envWith(), 'workflow', 'list');
    assert.equal(list.code, 1, list.stdout);
    assert.match(list.stderr, /msg="failed listing workflows: Request unauthorized\."/);
    const start = await temporal(
      envWith(),
      'workflow',
      'start',
      ...['--task-queue', 'planned-failover', '--type', 'plannedFailover', '--workflow-id', 'secure-unsigned'],
      ...['--input', JSON.stringify({ vms: [VM], reason: 'no token', requestedBy: 'alice' })],
    );
    assert.equal(start.code, 1, start.stdout);
    assert.match(start.stderr, /msg="failed starting workflow: Request unauthorized\."/);
    const signal = await temporal(
      envWith(),
      'workflow',
      'signal',
      ...['--workflow-id', 'proxy-slots', '--name', 'setProxyOnline'],
      ...['--input', JSON.stringify({ proxy: 'proxy-a', online: false })],
    );
    assert.equal(signal.code, 1, signal.stdout);
    assert.match(signal.stderr, /msg="failed signalling workflow: Request unauthorized\."/);

    // Admin in every namespace, but signed by a key of another cluster.
    const elsewhere = await mkdtemp(join(tmpdir(), 'pf-secure-other-'));
    try {
      const forged = signToken(await signingKey(elsewhere), 'cluster-admin', ['temporal-system:admin']);
      const denied = await temporal(envWith(forged), 'workflow', 'list');
      assert.equal(denied.code, 1);
      assert.ok(denied.stderr.includes(DENIED), denied.stderr);
    } finally {
      await rm(elsewhere, { recursive: true, force: true });
    }
    // Plain gRPC gets no answer at all from a TLS frontend.
    const plain = await temporal({ ...envWith(tokens.admin), TEMPORAL_TLS: 'false' }, 'workflow', 'list');
    assert.equal(plain.code, 1);
    assert.match(plain.stderr, /failed reaching server/);
  });

  it("its internal frontend, which no authorizer guards, answers only the cluster's internode certificate", async () => {
    const internode: Record<string, string> = {
      ...envWith(tokens.admin),
      TEMPORAL_ADDRESS: internalFrontend,
      TEMPORAL_TLS_SERVER_NAME: INTERNODE_NAME,
    };
    const without = await temporal(internode, 'workflow', 'list');
    assert.equal(without.code, 1, without.stdout);
    assert.match(without.stderr, /failed reaching server: .*(certificate required|broken pipe|connection reset)/);
    const certified = await temporal(
      {
        ...internode,
        TEMPORAL_TLS_CLIENT_CERT_PATH: join(stateDir, 'tls', 'internode.crt'),
        TEMPORAL_TLS_CLIENT_KEY_PATH: join(stateDir, 'tls', 'internode.key'),
      },
      'workflow',
      'list',
    );
    assert.equal(certified.code, 0, `the certificate is what it asks for: ${certified.stderr}`);
  });

  it("the workers' token: no admin operation, and a <namespace>:worker permission alone could not even poll", async () => {
    const attribute = await temporal(
      envWith(tokens.workers),
      ...['operator', 'search-attribute', 'create', '--name', 'SecureProbe', '--type', 'Keyword'],
    );
    assert.equal(attribute.code, 1, attribute.stdout);
    assert.ok(attribute.stderr.includes(DENIED), attribute.stderr);
    assert.equal((await temporal(envWith(tokens.admin), 'operator', 'search-attribute', 'list')).code, 0);

    // The default authorizer compares role bits as numbers: worker (1) is below the write (4) that polling needs.
    const workerOnly = signToken(await signingKey(stateDir), 'worker-only', ['default:worker'], 1);
    const connection = await Connection.connect({
      address,
      tls: { serverRootCACertificate: await readFile(ca), serverNameOverride: 'localhost' },
      apiKey: workerOnly,
    });
    try {
      await assert.rejects(
        connection.workflowService.pollActivityTaskQueue({ namespace: 'default', taskQueue: { name: 'probe' } }),
        (err: { code?: number; details?: string }) => err.code === 7 && err.details === DENIED,
      );
    } finally {
      await connection.close();
    }
  });

  describe("with the workers' token, the workers run a planned failover", () => {
    let lab: TestLab;
    let worker: ServingProcess;
    let admin: Client;

    before(async () => {
      lab = await startTestLab(
        estateOf([VM], [{ id: 'os', size: 2 * MiB }], { writeRate: 20, shutdownMs: 100, bootMs: 100 }),
      );
      const configPath = join(home, 'planned-failover.json');
      const config = testConfiguration(lab.lab.url, {
        jobs: [{ name: JOB, vms: [VM], targetHost: DR, schedule: { every: '1d' } }],
      });
      await writeFile(configPath, JSON.stringify(config));
      // As the cluster printed it: the workers' token and the CA through the Temporal CLI's variables.
      worker = await startScript(
        'src/worker.ts',
        ['--config', configPath],
        { ...envWith(tokens.workers), PF_LOG_LEVEL: 'INFO' },
        /"msg":"Workers polling"/,
        WORKER_READY_MS,
      );
      const connection = await Connection.connect({
        address,
        tls: { serverRootCACertificate: await readFile(ca), serverNameOverride: 'localhost' },
        apiKey: tokens.admin,
      });
      admin = new Client({ connection, namespace: 'default', interceptors: { workflow: [testSigner()] } });
    });

    after(async () => {
      if (worker) await terminate(worker.child);
      await admin?.connection.close();
      await lab?.close();
    });

    it('replicates and fails over, verified; the operator reads it with the project CLI and the Temporal CLI', async (t) => {
      const run = await (await startReplicationJob(admin, { job: JOB, requestedBy: 'alice' })).result();
      assert.equal(run.sessions[0]!.outcome, 'replicated', run.sessions[0]!.detail);
      const handle = await startFailover(admin, { vms: [VM], reason: 'on the secure cluster', requestedBy: 'alice' });
      const session = ((await handle.result()) as PlannedFailoverResult).sessions[0]!;
      assert.equal(session.outcome, 'failedOver', session.detail);
      assert.equal(session.fullVerification?.identical, true);
      assert.equal((await entityState(admin, VM)).state, 'Failover');

      const state = await runScript('src/cli/main.ts', ['state', '--vm', VM, '--json'], envWith(tokens.admin));
      assert.equal(state.code, 0, state.stderr);
      assert.equal((JSON.parse(state.stdout) as { state: string }).state, 'Failover');
      const refused = await runScript('src/cli/main.ts', ['state', '--vm', VM], envWith());
      assert.notEqual(refused.code, 0, 'the project CLI without a token is refused too');

      const listed = await temporal(
        envWith(tokens.admin),
        ...['workflow', 'list', '--query', `${SearchAttributes.FailoverVm.name}="${VM}"`, '-o', 'json'],
      );
      assert.equal(listed.code, 0, listed.stderr);
      assert.ok(listed.stdout.includes('"plannedFailoverSession"'), listed.stdout);
      t.diagnostic(
        `cluster up, refusals checked and a failover run in ${((Date.now() - started) / 1000).toFixed(0)} s`,
      );
    });

    it('the project CLI and the Temporal CLI connect through a temporal.toml profile too', async () => {
      const configFile = join(home, 'temporal.toml');
      await writeFile(
        configFile,
        [
          '[profile.dr-admin]',
          `address = "${address}"`,
          'namespace = "default"',
          `api_key = "${tokens.admin}"`,
          '[profile.dr-admin.tls]',
          `server_ca_cert_path = "${ca}"`,
          '',
        ].join('\n'),
        { mode: 0o600 },
      );
      const profile = { TEMPORAL_CONFIG_FILE: configFile, TEMPORAL_PROFILE: 'dr-admin' };
      const state = await runScript('src/cli/main.ts', ['state', '--vm', VM, '--json'], profile);
      assert.equal(state.code, 0, state.stderr);
      assert.equal((JSON.parse(state.stdout) as { state: string }).state, 'Failover');
      // Here the file alone says where and how: --disable-config-file is not given.
      const clean = Object.fromEntries(Object.entries(process.env).filter(([name]) => !name.startsWith('TEMPORAL_')));
      const listed = await new Promise<number>((resolveRun) =>
        execFile(temporalCli(), ['workflow', 'list'], { env: { ...clean, ...profile } }, (err) =>
          resolveRun(err ? 1 : 0),
        ),
      );
      assert.equal(listed, 0);
    });

    it('the project CLI and the native connection present a client certificate (mutual TLS) through the variables', async () => {
      // The internal frontend is the cluster's one endpoint that asks for a client certificate (and refuses a caller
      // without one: tested above).
      const mutual = {
        TEMPORAL_ADDRESS: internalFrontend,
        TEMPORAL_NAMESPACE: 'default',
        TEMPORAL_TLS_SERVER_CA_CERT_PATH: ca,
        TEMPORAL_TLS_SERVER_NAME: INTERNODE_NAME,
        TEMPORAL_TLS_CLIENT_CERT_PATH: join(stateDir, 'tls', 'internode.crt'),
        TEMPORAL_TLS_CLIENT_KEY_PATH: join(stateDir, 'tls', 'internode.key'),
      };
      const state = await runScript('src/cli/main.ts', ['state', '--vm', VM, '--json'], mutual);
      assert.equal(state.code, 0, state.stderr);
      // What src/worker.ts hands the worker's native connection, from the same variables.
      const saved = { ...process.env };
      Object.assign(process.env, mutual);
      let settings: ReturnType<typeof connectionSettings>;
      try {
        settings = connectionSettings();
      } finally {
        for (const name of Object.keys(mutual)) if (saved[name] === undefined) delete process.env[name];
        Object.assign(process.env, saved);
      }
      const native = await NativeConnection.connect(settings.connectionOptions);
      try {
        const described = await native.workflowService.describeNamespace({ namespace: 'default' });
        assert.equal(described.namespaceInfo?.name, 'default');
      } finally {
        await native.close();
      }
    });

    it("the server's own worker service (through the internal frontend) runs the schedule the workers created", async () => {
      const scheduleId = jobScheduleId(JOB);
      const trigger = await temporal(envWith(tokens.admin), 'schedule', 'trigger', '--schedule-id', scheduleId);
      assert.equal(trigger.code, 0, trigger.stderr);
      const workflowId = await within(`a run started by the schedule ${scheduleId}`, 60_000, async () => {
        const { info } = await admin.schedule.getHandle(scheduleId).describe();
        return info.recentActions[0]?.action.workflow.workflowId;
      });
      const described = await admin.workflow.getHandle(workflowId).describe();
      assert.equal(described.type, 'replicationJob');
    });
  });
});
