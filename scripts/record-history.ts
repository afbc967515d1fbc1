// `npm run record-history`: records this release's workflow histories into test/histories/<version>/ (the
// version from package.json), from real runs on a temporary Temporal server and lab. test/replay.test.ts replays
// every release's histories against today's code, so that a change which would break workflows already running
// (entities live for months, halted sessions for days) fails there. Histories are added per release and never
// re-recorded: this refuses a release that test/histories/RELEASED names or whose directory exists, and adds the
// new release's digests to RELEASED. An incompatible change goes behind patched() instead.
import { generateKeyPairSync, randomUUID, type KeyObject } from 'node:crypto';
import { appendFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Client, WorkflowHandle } from '@temporalio/client';
import { historyToJSON } from '@temporalio/common/lib/proto-utils';
import { Runtime } from '@temporalio/worker';
import { labServerNames } from '../lab/estate';
import { startLab } from '../lab/server';
import { parseConfiguration } from '../src/config/load';
import {
  haltedSessionUpdates,
  operationUpdates,
  PROXY_REGISTRY_WORKFLOW_ID,
  replicaWorkflowId,
  sessionQueries,
  sessionWorkflowId,
  TASK_QUEUE,
  WorkflowTypes,
  type OperationName,
  type PlannedFailoverResult,
  type ReplicationJobResult,
} from '../src/contract';
import { clientTlsFiles, ensureSite, serverTlsFiles, type ClientTlsFiles } from '../src/host-api/certificates';
import { LabControl, HostApiHypervisor } from '../src/hypervisor/host-api-adapter';
import { createLogger } from '../src/logging';
import { publicKeyLine } from '../src/identity/keys';
import { signingClient } from '../src/identity/signing';
import { createOrchestrator } from '../src/orchestrator';
import { ensureTemporalCli, freePort, projectRoot, startDevServer } from './lib/dev-server';
import { MANIFEST, manifestLinesOf, readManifest } from './lib/released-histories';

const VMS = ['vm1', 'vm2', 'vm3', 'vm4'];
const estate = {
  sites: [
    {
      name: 'production',
      role: 'production' as const,
      hosts: [
        {
          name: 'prod-a',
          vms: VMS.map((name) => ({
            name,
            disks: [{ id: 'os', size: '4MiB' }],
            writeRate: 20,
            shutdownMs: 200,
            bootMs: 200,
          })),
        },
      ],
    },
    { name: 'dr', role: 'dr' as const, hosts: [{ name: 'dr-a' }] },
  ],
};

const configuration = (url: string, tls: ClientTlsFiles, alice: KeyObject) =>
  parseConfiguration(
    JSON.stringify({
      tls,
      hosts: [
        { name: 'prod-a', role: 'production', adapter: { type: 'lab', url } },
        { name: 'dr-a', role: 'dr', adapter: { type: 'lab', url } },
      ],
      proxies: [{ name: 'proxy-a', slots: 2 }],
      jobs: VMS.map((vm) => ({ name: `job-${vm}`, vms: [vm], targetHost: 'dr-a', restorePoints: 3 })),
      users: [{ name: 'alice', roles: ['BackupAdministrator'], keys: [publicKeyLine(alice)] }],
    }),
  );

const version = (JSON.parse(readFileSync(join(projectRoot, 'package.json'), 'utf8')) as { version: string }).version;
const root = join(projectRoot, 'test', 'histories');
const dir = join(root, version);

async function save(file: string, handle: WorkflowHandle): Promise<void> {
  writeFileSync(join(dir, file), historyToJSON(await handle.fetchHistory()) + '\n');
  console.log(`Recorded test/histories/${version}/${file}`);
}

const request = (reason: string) => ({ requestedBy: 'alice', reason });

async function waitFor<T>(what: string, probe: () => Promise<T | undefined>): Promise<T> {
  for (let i = 0; i < 600; i++) {
    const found = await probe().catch(() => undefined);
    if (found !== undefined) return found;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`gave up waiting for ${what}`);
}

/** A planned failover of `vm` whose copy into helper point 2 fails until `decide` has been sent. */
async function haltedFailover(
  client: Client,
  control: LabControl,
  vm: string,
  decide: (session: WorkflowHandle) => Promise<unknown>,
): Promise<WorkflowHandle> {
  await control.setFault('dr-a', {
    kind: 'fail',
    path: `^/v1/hosts/dr-a/replicas/${vm}_replica/points/[^/]*-helper2/disks/[^/]+/write$`,
  });
  const parent = await client.workflow.start(WorkflowTypes.plannedFailover, {
    taskQueue: TASK_QUEUE,
    workflowId: `record-${randomUUID()}`,
    args: [{ vms: [vm], reason: 'recorded halt', requestedBy: 'alice' }],
  });
  const session = await waitFor('the halted session', async () => {
    for await (const wf of client.workflow.list({
      query: `FailoverVm="${vm}" AND WorkflowType="${WorkflowTypes.plannedFailoverSession}" AND ExecutionStatus="Running"`,
    })) {
      const handle = client.workflow.getHandle(wf.workflowId);
      if ((await handle.query(sessionQueries.progress)).halted) return handle;
    }
    return undefined;
  });
  await control.clearFaults('dr-a');
  await decide(session);
  await parent.result().catch(() => undefined);
  return session;
}

async function main(): Promise<void> {
  if (readManifest(root).has(version) || existsSync(dir)) {
    throw new Error(
      `test/histories/${version}/ exists or is listed in test/histories/${MANIFEST}: a release's histories are recorded once and never again. Bump the version in package.json for a new release.`,
    );
  }
  mkdirSync(dir, { recursive: true });
  Runtime.install({ logger: createLogger('ERROR') });
  const workDir = mkdtempSync(join(tmpdir(), 'pf-record-'));
  const server = await startDevServer({
    cli: ensureTemporalCli(),
    port: await freePort(),
    dbFile: join(workDir, 'temporal.db'),
    logFile: join(workDir, 'server.log'),
  });
  // The lab over mutual TLS, as everywhere: a site of the recording's own.
  const site = join(workDir, 'certs');
  await ensureSite(site, { lab: labServerNames(estate) }, ['recorder']);
  const tls = clientTlsFiles(site, 'recorder');
  const lab = await startLab({ estate, dataDir: join(workDir, 'lab'), port: 0, tls: serverTlsFiles(site, 'lab') });
  const port = new HostApiHypervisor({ url: lab.url, tls, serverName: 'lab' });
  const control = new LabControl({ url: lab.url, tls, serverName: 'lab' });
  // The recording's requests are signed, as every request is, by a key of the recording's own.
  const alice = generateKeyPairSync('ed25519').privateKey;
  const orchestrator = await createOrchestrator({
    connectionOptions: { address: server.address },
    namespace: 'default',
    config: configuration(lab.url, tls, alice),
    port,
  });
  try {
    await orchestrator.startWorkers();
    const client = signingClient(orchestrator.client, () => alice);
    const start = (type: string, input: unknown) =>
      client.workflow.start(type, { taskQueue: TASK_QUEUE, workflowId: `record-${randomUUID()}`, args: [input] });

    const invalid = await start(WorkflowTypes.plannedFailover, { vms: [], requestedBy: 'alice' });
    await invalid.result().catch(() => undefined); // failed runs are recorded too
    await save('planned-failover-invalid-input.json', invalid);

    for (const run of ['seed', 'incremental']) {
      for (const vm of VMS) {
        const job = await start(WorkflowTypes.replicationJob, { job: `job-${vm}`, requestedBy: 'alice' });
        const result = (await job.result()) as ReplicationJobResult;
        if (vm !== 'vm1') continue;
        await save(`replication-job-${run}.json`, job);
        const session = result.sessions[0]!;
        await save(
          `replication-session-${run}.json`,
          client.workflow.getHandle(sessionWorkflowId(vm, session.sessionId)),
        );
      }
    }

    const failover = await start(WorkflowTypes.plannedFailover, {
      vms: ['vm1'],
      reason: 'recorded',
      requestedBy: 'alice',
    });
    const outcome = (await failover.result()) as PlannedFailoverResult;
    await save('planned-failover.json', failover);
    const session = outcome.sessions[0]!;
    await save('planned-failover-session.json', client.workflow.getHandle(sessionWorkflowId('vm1', session.sessionId)));

    // Halted sessions, each decided: retry, abort, force.
    const decision = (name: 'retry' | 'abort' | 'forceFailover') => (s: WorkflowHandle) =>
      s.executeUpdate(haltedSessionUpdates[name], { args: [request(`recorded ${name}`)] });
    await save(
      'planned-failover-session-halted-retry.json',
      await haltedFailover(client, control, 'vm2', decision('retry')),
    );
    await save(
      'planned-failover-session-halted-abort.json',
      await haltedFailover(client, control, 'vm3', decision('abort')),
    );
    await save(
      'planned-failover-session-halted-force.json',
      await haltedFailover(client, control, 'vm4', decision('forceFailover')),
    );

    // Every operation that finishes a failover, as updates of the replica's entity.
    const operation = async (vm: string, name: OperationName, payload: object, file: string) => {
      const result = await client.workflow
        .getHandle(replicaWorkflowId(vm))
        .executeUpdate(operationUpdates[name], { args: [{ ...request(`recorded ${name}`), ...payload }] });
      await save(file, client.workflow.getHandle(result.workflowId));
    };
    await operation('vm1', 'failback', {}, 'replica-operation-failback.json');
    await operation('vm1', 'undoFailback', {}, 'replica-operation-undo-failback.json');
    await operation('vm1', 'failback', {}, 'replica-operation-failback-again.json');
    await operation('vm1', 'commitFailback', {}, 'replica-operation-commit-failback.json');
    await operation('vm2', 'undoFailover', {}, 'replica-operation-undo-failover.json');
    const points = (await port.listRestorePoints({ host: 'dr-a', replica: 'vm2_replica' })).filter((p) => p.sealed);
    await operation('vm2', 'failover', { restorePointId: points[0]!.id }, 'replica-operation-failover.json');
    await operation('vm4', 'permanentFailover', { confirm: true }, 'replica-operation-permanent-failover.json');

    await save('replica-entity-after-failback.json', client.workflow.getHandle(replicaWorkflowId('vm1')));
    await save('replica-entity-after-failover.json', client.workflow.getHandle(replicaWorkflowId('vm2')));
    await save('replica-entity-after-abort.json', client.workflow.getHandle(replicaWorkflowId('vm3')));
    await save('replica-entity-permanent.json', client.workflow.getHandle(replicaWorkflowId('vm4')));
    await save('proxy-slots.json', client.workflow.getHandle(PROXY_REGISTRY_WORKFLOW_ID));
    appendFileSync(join(root, MANIFEST), manifestLinesOf(root, version).join('\n') + '\n');
    console.log(`Listed test/histories/${version}/ in test/histories/${MANIFEST}`);
  } catch (err) {
    rmSync(dir, { recursive: true, force: true }); // a release's histories are recorded whole, or not at all
    throw err;
  } finally {
    await orchestrator.close();
    port.close();
    control.close();
    await lab.stop();
    await server.stop();
    rmSync(workDir, { recursive: true, force: true });
  }
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    console.error(err);
    process.exit(1);
  },
);
