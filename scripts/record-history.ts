// `npm run record-history`: re-records the workflow histories that test/replay.test.ts replays, from real runs
// on a temporary Temporal server and lab. Run it after an intended, versioned change to workflow code, and
// commit the new files with that change.
import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { WorkflowHandle } from '@temporalio/client';
import { historyToJSON } from '@temporalio/common/lib/proto-utils';
import { Runtime } from '@temporalio/worker';
import { startLab } from '../lab/server';
import { parseConfiguration } from '../src/config/load';
import {
  operationUpdates,
  replicaWorkflowId,
  sessionWorkflowId,
  TASK_QUEUE,
  WorkflowTypes,
  type PlannedFailoverResult,
  type ReplicationJobResult,
} from '../src/contract';
import { LabHypervisor } from '../src/hypervisor/lab-adapter';
import { createLogger } from '../src/logging';
import { createOrchestrator } from '../src/orchestrator';
import { ensureTemporalCli, freePort, projectRoot, startDevServer } from './lib/dev-server';

const estate = {
  sites: [
    {
      name: 'production',
      role: 'production' as const,
      hosts: [
        {
          name: 'prod-a',
          vms: [{ name: 'vm1', disks: [{ id: 'os', size: '4MiB' }], writeRate: 20, shutdownMs: 200, bootMs: 200 }],
        },
      ],
    },
    { name: 'dr', role: 'dr' as const, hosts: [{ name: 'dr-a' }] },
  ],
};

const configuration = (url: string) =>
  parseConfiguration(
    JSON.stringify({
      hosts: [
        { name: 'prod-a', role: 'production', adapter: { type: 'lab', url } },
        { name: 'dr-a', role: 'dr', adapter: { type: 'lab', url } },
      ],
      proxies: [{ name: 'proxy-a', slots: 2 }],
      jobs: [{ name: 'job1', vms: ['vm1'], targetHost: 'dr-a', restorePoints: 2 }],
      users: [{ name: 'alice', roles: ['BackupAdministrator'] }],
    }),
  );

async function save(file: string, handle: WorkflowHandle): Promise<void> {
  writeFileSync(join(projectRoot, 'test', 'histories', file), historyToJSON(await handle.fetchHistory()) + '\n');
  console.log(`Recorded test/histories/${file}`);
}

async function main(): Promise<void> {
  Runtime.install({ logger: createLogger('WARN') });
  const workDir = mkdtempSync(join(tmpdir(), 'pf-record-'));
  const server = await startDevServer({
    cli: ensureTemporalCli(),
    port: await freePort(),
    dbFile: join(workDir, 'temporal.db'),
    logFile: join(workDir, 'server.log'),
  });
  const lab = await startLab({ estate, dataDir: join(workDir, 'lab'), port: 0 });
  const port = new LabHypervisor({ url: lab.url });
  const orchestrator = await createOrchestrator({
    connectionOptions: { address: server.address },
    namespace: 'default',
    config: configuration(lab.url),
    port,
  });
  try {
    await orchestrator.startWorkers();
    const { client } = orchestrator;
    const start = (type: string, input: unknown) =>
      client.workflow.start(type, { taskQueue: TASK_QUEUE, workflowId: `record-${randomUUID()}`, args: [input] });

    const invalid = await start(WorkflowTypes.plannedFailover, { vms: [], requestedBy: 'alice' });
    await invalid.result().catch(() => undefined); // failed runs are recorded too
    await save('planned-failover-invalid-input.json', invalid);

    for (const run of ['seed', 'incremental']) {
      const job = await start(WorkflowTypes.replicationJob, { job: 'job1', requestedBy: 'alice' });
      const result = (await job.result()) as ReplicationJobResult;
      await save(`replication-job-${run}.json`, job);
      const session = result.sessions[0]!;
      await save(
        `replication-session-${run}.json`,
        client.workflow.getHandle(sessionWorkflowId(session.vm, session.sessionId)),
      );
    }

    const failover = await start(WorkflowTypes.plannedFailover, {
      vms: ['vm1'],
      reason: 'recorded',
      requestedBy: 'alice',
    });
    const outcome = (await failover.result()) as PlannedFailoverResult;
    await save('planned-failover.json', failover);
    const session = outcome.sessions[0]!;
    await save(
      'planned-failover-session.json',
      client.workflow.getHandle(sessionWorkflowId(session.vm, session.sessionId)),
    );

    // Finishing the failover: a failback and its commit, as updates of the replica's entity.
    const entity = client.workflow.getHandle(replicaWorkflowId('vm1'));
    const request = { requestedBy: 'alice', reason: 'recorded' };
    const failback = await entity.executeUpdate(operationUpdates.failback, { args: [request] });
    await save('replica-operation-failback.json', client.workflow.getHandle(failback.workflowId));
    await entity.executeUpdate(operationUpdates.commitFailback, { args: [request] });
    await save('replica-entity.json', entity);
  } finally {
    await orchestrator.close();
    port.close();
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
