// What integration tests get from the run: the shared dev server's client, and workers on task queues of their own.
import { randomUUID } from 'node:crypto';
import { Client, Connection } from '@temporalio/client';
import { NativeConnection, Runtime, type Worker } from '@temporalio/worker';
import { createWorker } from '../src/worker';
import { createLogger } from '../src/logging';

function required(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run integration tests through \`npm test -- <file>\`.`);
  return value;
}

export const temporalAddress = (): string => required('PF_TEST_TEMPORAL_ADDRESS');
export const temporalCli = (): string => required('PF_TEST_TEMPORAL_CLI');

let clientPromise: Promise<Client> | undefined;
let nativeConnectionPromise: Promise<NativeConnection> | undefined;

export function testClient(): Promise<Client> {
  clientPromise ??= Connection.connect({ address: temporalAddress() }).then(
    (connection) => new Client({ connection, namespace: 'default' }),
  );
  return clientPromise;
}

/** A task queue no other test polls, so tests cannot steal each other's tasks. */
export const uniqueTaskQueue = (prefix = 'test'): string => `${prefix}-${randomUUID()}`;

export async function testWorker(taskQueue: string): Promise<Worker> {
  if (!nativeConnectionPromise) {
    Runtime.install({ logger: createLogger('WARN') });
    nativeConnectionPromise = NativeConnection.connect({ address: temporalAddress() });
  }
  return createWorker({
    connection: await nativeConnectionPromise,
    namespace: 'default',
    taskQueue,
    workflowBundle: { codePath: required('PF_TEST_WORKFLOW_BUNDLE') },
  });
}

/** Closes the connections so the test file's process can exit. */
export async function closeHarness(): Promise<void> {
  await (await clientPromise)?.connection.close();
  await (await nativeConnectionPromise)?.close();
  clientPromise = undefined;
  nativeConnectionPromise = undefined;
}
