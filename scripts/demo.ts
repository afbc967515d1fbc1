// `npm run demo`: sets up what is missing, starts the Temporal server with its Web UI, the lab with the demo
// estate and the orchestrator's workers, and shows the main job. It keeps running so you can try the Temporal
// CLI against it; Ctrl-C stops everything cleanly.
import { join } from 'node:path';
import { Runtime } from '@temporalio/worker';
import { followSessions } from '../src/cli/progress';
import { plannedFailoverTable, replicationJobTable } from '../src/cli/report';
import { startPlannedFailover, startReplicationJob } from '../src/client';
import { loadConfiguration } from '../src/config/load';
import { TASK_QUEUE } from '../src/contract';
import { LabControl, LabHypervisor } from '../src/hypervisor/lab-adapter';
import { createLogger } from '../src/logging';
import { createOrchestrator } from '../src/orchestrator';
import { syncJobSchedules } from '../src/schedules';
import { DEFAULT_CONFIG_PATH } from '../src/worker';
import {
  ensureTemporalCli,
  portInUse,
  projectRoot,
  serverHealthy,
  startDevServer,
  type DevServer,
} from './lib/dev-server';
import { finishEarlierDemo } from './lib/earlier-demo';
import { ensureDemoLab } from './lib/lab';

const port = 7233;
const uiUrl = 'http://127.0.0.1:8233';

async function main(): Promise<void> {
  const cli = ensureTemporalCli();
  const address = `127.0.0.1:${port}`;
  let server: DevServer | undefined;
  if (await portInUse(port)) {
    if (!(await serverHealthy(cli, address)))
      throw new Error(`Port ${port} is taken by a program that is not Temporal.`);
    console.log(`Using the Temporal server already running at ${address}.`);
  } else {
    const dataDir = join(projectRoot, '.data', 'temporal');
    console.log(`Starting the Temporal server at ${address} (state in ${dataDir})...`);
    server = await startDevServer({
      cli,
      port,
      uiPort: 8233,
      dbFile: join(dataDir, 'temporal.db'),
      logFile: join(dataDir, 'server.log'),
    });
  }

  const { url: labUrl, lab } = await ensureDemoLab();
  console.log(
    lab ? `Lab site started at ${labUrl} (data in .data/lab).` : `Using the lab already running at ${labUrl}.`,
  );
  const labControl = new LabControl({ url: labUrl });
  const hypervisor = new LabHypervisor({ url: labUrl });

  Runtime.install({ logger: createLogger('WARN') });
  const config = loadConfiguration(join(projectRoot, DEFAULT_CONFIG_PATH));
  const orchestrator = await createOrchestrator({
    connectionOptions: { address },
    namespace: 'default',
    config,
    port: hypervisor,
  });
  await orchestrator.startWorkers();
  console.log(`Workers polling '${TASK_QUEUE}' and one task queue per proxy.`);
  const schedules = await syncJobSchedules(orchestrator.client, config);
  console.log(
    `Job schedules from the configuration: ${[...schedules.created, ...schedules.updated].join(', ') || 'none'}.`,
  );

  console.log('\nFinishing what earlier runs of the demo left...');
  const dataDir = join(projectRoot, '.data');
  await finishEarlierDemo({
    client: orchestrator.client,
    hypervisor,
    vms: config.jobs.flatMap((j) => j.vms),
    print: (line) => console.log(line),
    freshStart: `rm -rf '${join(dataDir, 'temporal')}' '${join(dataDir, 'lab')}' && npm run demo`,
    temporalCommand: (args) => `${cli} ${args}`,
  });

  // The backup repository is filled by a backup job in real life; the demo plays that job.
  for (const job of config.jobs.filter((j) => j.dataSource === 'backup')) {
    for (const vm of job.vms) await labControl.takeBackup(vm);
  }

  for (const pass of ['Seeding the replicas', 'An incremental run while the guests write']) {
    console.log(`\n${pass}...`);
    const handles = await Promise.all(
      config.jobs.map((job) =>
        startReplicationJob(orchestrator.client, { job: job.name, requestedBy: 'alice', reason: `demo: ${pass}` }),
      ),
    );
    console.log(replicationJobTable(await Promise.all(handles.map((h) => h.result()))));
  }

  const job = config.jobs[0]!;
  console.log(`\nPlanned failover of job ${job.name} (${job.vms.join(', ')}) while the guests keep writing...`);
  const failover = await startPlannedFailover(orchestrator.client, {
    vms: job.vms,
    reason: 'demo: datacenter maintenance',
    requestedBy: 'alice',
  });
  const stopFollowing = followSessions(orchestrator.client, failover.workflowId, (line) => console.log(`  ${line}`));
  const outcome = await failover.result().finally(stopFollowing);
  console.log(`\n${plannedFailoverTable(outcome)}`);
  console.log(`${uiUrl}/namespaces/default/workflows/${encodeURIComponent(failover.workflowId)}`);

  console.log(`\nWeb UI: ${uiUrl}/namespaces/default/workflows`);
  console.log('Try the Temporal CLI from another terminal, for example:');
  const other = config.jobs[1]?.vms[0] ?? job.vms[0];
  for (const line of [
    `workflow list --query 'FailoverJob="${job.name}"'`,
    `workflow query --workflow-id replica/${job.vms[0]} --type state`,
    `workflow update execute --workflow-id replica/${job.vms[0]} --name failback --input '{"requestedBy":"alice","reason":"back home"}'`,
    `workflow update execute --workflow-id replica/${job.vms[0]} --name commitFailback --input '{"requestedBy":"alice","reason":"done"}'`,
    `workflow update execute --workflow-id replica/${job.vms[1] ?? job.vms[0]} --name undoFailover --input '{"requestedBy":"alice","reason":"undo"}'`,
    `workflow start --task-queue ${TASK_QUEUE} --type plannedFailover --input '{"vms":["${other}"],"reason":"try it","requestedBy":"bob"}'`,
  ])
    console.log(`  ${cli} ${line}`);
  console.log(`or the project CLI: npm run failover -- planned --vm ${other} --reason "try it" --user bob`);
  console.log('Press Ctrl-C to stop the workers, the lab and the server.');

  await new Promise<void>((resolveStop) => {
    for (const signal of ['SIGINT', 'SIGTERM'] as const) process.once(signal, () => resolveStop());
  });
  console.log('\nStopping...');
  await orchestrator.close();
  hypervisor.close();
  labControl.close();
  await lab?.stop();
  await server?.stop();
  console.log('Stopped.');
}

main().then(
  // The SDK's native runtime keeps the event loop alive after everything is closed.
  () => process.exit(0),
  (err: unknown) => {
    console.error(`error: ${err instanceof Error ? err.message : String(err)}`);
    process.exit(1);
  },
);
