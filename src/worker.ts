import { NativeConnection, Runtime, Worker, type WorkerOptions } from '@temporalio/worker';
import { TASK_QUEUE } from './contract';
import { connectionSettings } from './client';
import { createLogger } from './logging';

export type OrchestratorWorkerOptions = Pick<WorkerOptions, 'connection' | 'namespace'> &
  Partial<Pick<WorkerOptions, 'workflowBundle' | 'taskQueue' | 'identity'>>;

/** The orchestrator worker: every workflow of the contract on the planned-failover task queue. */
export async function createWorker(options: OrchestratorWorkerOptions): Promise<Worker> {
  return Worker.create({
    taskQueue: TASK_QUEUE,
    ...(options.workflowBundle ? {} : { workflowsPath: require.resolve('./workflows') }),
    ...options,
    // Give running activities time to finish or heartbeat before a stop is forced.
    shutdownGraceTime: '10s',
    shutdownForceTime: '30s',
  });
}

async function main(): Promise<void> {
  Runtime.install({ logger: createLogger() });
  const settings = connectionSettings();
  const connection = await NativeConnection.connect(settings.connectionOptions);
  try {
    const worker = await createWorker({ connection, namespace: settings.namespace });
    Runtime.instance().logger.info('Worker polling', {
      address: settings.address,
      namespace: settings.namespace,
      taskQueue: TASK_QUEUE,
    });
    // The SDK stops polling on SIGINT/SIGTERM and lets in-flight work finish within shutdownForceTime.
    await worker.run();
  } finally {
    await connection.close();
  }
}

if (require.main === module) {
  main().catch((err: unknown) => {
    console.error(err);
    process.exit(1);
  });
}
