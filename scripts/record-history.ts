// `npm run record-history`: re-records the stored workflow histories that test/replay.test.ts replays.
// Run it after an intended, versioned change to workflow code; commit the new files with that change.
import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Client, Connection } from '@temporalio/client';
import { historyToJSON } from '@temporalio/common/lib/proto-utils';
import { NativeConnection } from '@temporalio/worker';
import { WorkflowTypes } from '../src/contract';
import { createWorker } from '../src/worker';
import { ensureTemporalCli, freePort, projectRoot, startDevServer } from './lib/dev-server';

/** Each recording: a file name and the workflow run that produces it. */
const recordings: { file: string; type: string; input: unknown }[] = [
  {
    file: 'planned-failover-invalid-input.json',
    type: WorkflowTypes.plannedFailover,
    input: { vms: [], requestedBy: 'alice' },
  },
  {
    file: 'planned-failover-valid-input.json',
    type: WorkflowTypes.plannedFailover,
    input: { vms: ['sql01'], reason: 'recorded for replay', requestedBy: 'alice' },
  },
];

async function main(): Promise<void> {
  const workDir = mkdtempSync(join(tmpdir(), 'pf-record-'));
  const server = await startDevServer({
    cli: ensureTemporalCli(),
    port: await freePort(),
    dbFile: join(workDir, 'temporal.db'),
    logFile: join(workDir, 'server.log'),
  });
  try {
    const taskQueue = `record-${randomUUID()}`;
    const nativeConnection = await NativeConnection.connect({ address: server.address });
    const worker = await createWorker({ connection: nativeConnection, namespace: 'default', taskQueue });
    const client = new Client({ connection: await Connection.connect({ address: server.address }) });
    await worker.runUntil(async () => {
      for (const { file, type, input } of recordings) {
        const handle = await client.workflow.start(type, {
          taskQueue,
          workflowId: `record-${randomUUID()}`,
          args: [input],
        });
        await handle.result().catch(() => undefined); // failed runs are recorded too
        writeFileSync(join(projectRoot, 'test', 'histories', file), historyToJSON(await handle.fetchHistory()) + '\n');
        console.log(`Recorded test/histories/${file}`);
      }
    });
    await client.connection.close();
    await nativeConnection.close();
  } finally {
    await server.stop();
    rmSync(workDir, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
