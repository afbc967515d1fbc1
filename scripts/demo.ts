// `npm run demo`: sets up what is missing, starts the Temporal server with its Web UI and a worker, and shows
// the orchestrator at work. It keeps running so you can try the Temporal CLI against it; Ctrl-C stops everything.
import { randomUUID } from 'node:crypto';
import { join } from 'node:path';
import { Client, Connection, WorkflowFailedError } from '@temporalio/client';
import { NativeConnection, Runtime } from '@temporalio/worker';
import { TASK_QUEUE, WorkflowTypes } from '../src/contract';
import { createLogger } from '../src/logging';
import { createWorker } from '../src/worker';
import {
  ensureTemporalCli,
  portInUse,
  projectRoot,
  serverHealthy,
  startDevServer,
  type DevServer,
} from './lib/dev-server';

const port = 7233;
const uiUrl = 'http://127.0.0.1:8233';

async function main(): Promise<void> {
  const cli = ensureTemporalCli();
  const address = `127.0.0.1:${port}`;
  let server: DevServer | undefined;
  if (await portInUse(port)) {
    if (!serverHealthy(cli, address)) throw new Error(`Port ${port} is taken by a program that is not Temporal.`);
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

  Runtime.install({ logger: createLogger('WARN') });
  const workerConnection = await NativeConnection.connect({ address });
  const worker = await createWorker({ connection: workerConnection, namespace: 'default' });
  const client = new Client({ connection: await Connection.connect({ address }) });
  const running = worker.run();
  console.log(`Worker polling task queue '${TASK_QUEUE}'.`);

  const requests = [
    { title: 'A request with no VMs', input: { vms: [], reason: 'demo', requestedBy: 'alice' } },
    { title: 'A request naming a VM twice', input: { vms: ['sql01', 'sql01'], reason: 'demo', requestedBy: '' } },
  ];
  for (const { title, input } of requests) {
    const workflowId = `demo-${randomUUID().slice(0, 8)}`;
    const outcome = await client.workflow
      .execute(WorkflowTypes.plannedFailover, { taskQueue: TASK_QUEUE, workflowId, args: [input] })
      .then(
        () => 'completed',
        (err: unknown) => (err instanceof WorkflowFailedError ? `failed: ${err.cause?.message}` : String(err)),
      );
    console.log(
      `\n${title}: ${JSON.stringify(input)}\n  -> ${outcome}\n  ${uiUrl}/namespaces/default/workflows/${workflowId}`,
    );
  }

  console.log(`\nWeb UI: ${uiUrl}. Try the Temporal CLI from another terminal, for example:`);
  console.log(`  ${cli} workflow start --task-queue ${TASK_QUEUE} --type plannedFailover --input '{"vms":[]}'`);
  console.log('Press Ctrl-C to stop the worker and the server.');

  await new Promise<void>((resolveStop) => {
    for (const signal of ['SIGINT', 'SIGTERM'] as const) process.once(signal, () => resolveStop());
  });
  console.log('\nStopping...');
  // The SDK's own signal handler may already be draining the worker.
  if (worker.getState() === 'RUNNING') worker.shutdown();
  await running;
  await client.connection.close();
  await workerConnection.close();
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
