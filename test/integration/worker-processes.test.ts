// `npm run worker` as an operator deploys it on machines of its own: src/worker.ts with `--only orchestration` in one
// process and `--only proxy <name>` in another, each reading the configuration file and connecting through the
// Temporal CLI's environment (TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE). Together they must do what one process does;
// apart, each must poll only its own task queues, only the orchestration's may create schedules, and a command line
// the worker refuses must start nothing.
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { Client, Connection, ScheduleNotFoundError } from '@temporalio/client';
import { temporal as proto } from '@temporalio/proto';
import { startReplicationJob } from '../../src/client';
import { haltedSessionUpdates, proxyTaskQueue, TASK_QUEUE, type PlannedFailoverResult } from '../../src/contract';
import { jobScheduleId } from '../../src/schedules';
import { freePort } from '../../scripts/lib/dev-server';
import { haltedSession } from '../failover-helpers';
import { createTestNamespace, temporalAddress, testConfiguration, within } from '../harness';
import { testSigner } from '../keys';
import { DR, smallEstate, startTestLab, type TestLab } from '../lab/helpers';
import { runScript, startScript, terminate, type ServingProcess } from '../processes';

const WORKER = 'src/worker.ts';
/** The orchestration's process bundles the workflows at start: seconds, more on a busy machine. */
const READY_MS = 180_000;
const JOB = 'apart';
const PROXY = 'proxy-b';
const { TASK_QUEUE_TYPE_WORKFLOW: WORKFLOW, TASK_QUEUE_TYPE_ACTIVITY: ACTIVITY } = proto.api.enums.v1.TaskQueueType;

/** What the worker logs once every worker it runs polls. */
interface PollingLine {
  namespace: string;
  taskQueues: string[];
  config: string;
  metrics?: string;
}

describe('the workers as processes of their own, started as an operator starts them', () => {
  let dir: string;
  let configPath: string;
  let lab: TestLab;
  let connection: Connection;
  const processes: ServingProcess[] = [];

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'pf-worker-processes-'));
    // vm1's guest takes 2 s to shut down: the test sees its session at PoweringOffSource through the server's search,
    // which lags behind the session, before it breaks the DR host (at 100 ms the step was over unseen, now and then).
    lab = await startTestLab(smallEstate({ writeRate: 0, shutdownMs: 2000 }));
    configPath = join(dir, 'planned-failover.yaml');
    const config = testConfiguration(lab.lab.url, {
      proxies: [
        { name: 'proxy-a', slots: 2 },
        { name: PROXY, slots: 2 },
      ],
      // Copied only by proxy-b, whose worker runs in the proxy's process alone.
      jobs: [{ name: JOB, vms: ['vm1'], targetHost: DR, proxies: [PROXY], schedule: { every: '1d' } }],
    });
    writeFileSync(configPath, JSON.stringify(config));
    connection = await Connection.connect({ address: temporalAddress() });
  });

  after(async () => {
    for (const p of processes) await terminate(p.child);
    await connection?.close();
    await lab?.close();
    rmSync(dir, { recursive: true, force: true });
  });

  /** The connection settings an operator gives the worker, as the Temporal CLI reads them. */
  const settings = (namespace: string) => ({
    TEMPORAL_ADDRESS: temporalAddress(),
    TEMPORAL_NAMESPACE: namespace,
    PF_LOG_LEVEL: 'INFO',
  });

  const scheduleExists = (client: Client): Promise<boolean> =>
    client.schedule
      .getHandle(jobScheduleId(JOB))
      .describe()
      .then(
        () => true,
        (err: unknown) => {
          if (err instanceof ScheduleNotFoundError) return false;
          throw err;
        },
      );

  /** The identities (pid@host) of the workers that polled the task queue for tasks of this type. */
  async function pollersOf(namespace: string, taskQueue: string, type: typeof WORKFLOW | typeof ACTIVITY) {
    const { pollers } = await connection.workflowService.describeTaskQueue({
      namespace,
      taskQueue: { name: taskQueue },
      taskQueueType: type,
    });
    return (pollers ?? []).map((p) => p.identity ?? '').sort();
  }

  /** Waits until exactly these processes poll the task queue (the server learns of a poll as it arrives). */
  const polledBy = (namespace: string, taskQueue: string, type: typeof WORKFLOW | typeof ACTIVITY, p: ServingProcess) =>
    within(`${taskQueue} polled by pid ${p.child.pid} alone`, 30_000, async () => {
      const identities = await pollersOf(namespace, taskQueue, type);
      return identities.length === 1 && identities[0]!.startsWith(`${p.child.pid}@`) ? identities : undefined;
    });

  async function startWorker(env: Record<string, string>, ...args: string[]) {
    const worker = await startScript(WORKER, args, env, /"msg":"Workers polling"/, READY_MS);
    processes.push(worker);
    return { worker, polling: JSON.parse(worker.readyLine) as PollingLine };
  }

  it('refuses a bad command line with exit code 2, naming the flag, and starts nothing', async () => {
    const namespace = await createTestNamespace();
    const env = settings(namespace);
    const runs = await Promise.all(
      [
        { args: ['--only', 'workflows'], says: /--only: must be orchestration or proxy <name\.\.\.>, not 'workflows'/ },
        { args: ['--only', 'proxy'], says: /--only: proxy needs the names of the proxies to run/ },
        {
          args: ['--only', 'proxy', 'proxy-z'],
          says: new RegExp(`--only: ${configPath} has no proxy 'proxy-z'; its proxies are 'proxy-a', 'proxy-b'`),
        },
        { args: ['--only', 'orchestration', '--replicas', '2'], says: /unknown option '--replicas'/ },
        { args: ['--metrics', '9464'], says: /--metrics: must be host:port/ },
      ].map(async ({ args, says }) => ({
        args,
        says,
        run: await runScript(WORKER, [...args, '--config', configPath], env),
      })),
    );
    for (const { args, says, run } of runs) {
      assert.equal(run.code, 2, `${args.join(' ')}: exit code ${run.code}, stderr: ${run.stderr}`);
      assert.match(run.stderr, says);
      assert.equal(run.stdout, '', `${args.join(' ')} printed: ${run.stdout}`);
    }
    const client = new Client({ connection, namespace });
    assert.equal(await scheduleExists(client), false, 'a refused worker created the job schedule');
    assert.deepEqual(await pollersOf(namespace, TASK_QUEUE, WORKFLOW), []);
    for (const proxy of ['proxy-a', PROXY])
      assert.deepEqual(await pollersOf(namespace, proxyTaskQueue(proxy), ACTIVITY), []);
  });

  it('run apart, each polls only its own queues, only the orchestration creates schedules, and together they replicate and fail over', async () => {
    const namespace = await createTestNamespace();
    const client = new Client({ connection, namespace, interceptors: { workflow: [testSigner()] } });

    // The proxy's machine first, its configuration named by PF_CONFIG, its metrics address by PF_METRICS_ADDRESS.
    const [proxyMetrics, orchestrationMetrics] = [`127.0.0.1:${await freePort()}`, `127.0.0.1:${await freePort()}`];
    const proxy = await startWorker(
      { ...settings(namespace), PF_CONFIG: configPath, PF_METRICS_ADDRESS: proxyMetrics },
      '--only',
      'proxy',
      PROXY,
    );
    assert.deepEqual(proxy.polling.taskQueues, [proxyTaskQueue(PROXY)]);
    assert.equal(proxy.polling.namespace, namespace);
    assert.equal(proxy.polling.config, configPath);
    await polledBy(namespace, proxyTaskQueue(PROXY), ACTIVITY, proxy.worker);
    assert.equal(await scheduleExists(client), false, "the proxy's process created the job schedule");

    const orchestration = await startWorker(
      settings(namespace),
      '--only',
      'orchestration',
      '--config',
      configPath,
      '--metrics',
      orchestrationMetrics,
    );
    assert.equal(orchestration.polling.metrics, `http://${orchestrationMetrics}/metrics`);
    assert.deepEqual(orchestration.polling.taskQueues, [TASK_QUEUE]);
    await polledBy(namespace, TASK_QUEUE, WORKFLOW, orchestration.worker);
    await polledBy(namespace, TASK_QUEUE, ACTIVITY, orchestration.worker);
    assert.equal(await scheduleExists(client), true, "the orchestration's process did not create the job schedule");

    const replicated = await (await startReplicationJob(client, { job: JOB, requestedBy: 'alice' })).result();
    assert.equal(replicated.sessions[0]?.outcome, 'replicated', replicated.sessions[0]?.detail);
    // The failover halts in its critical window once: the halted-sessions gauge shows it while it waits.
    const scrape = async (address: string) => (await fetch(`http://${address}/metrics`)).text();
    const haltedNow = (count: number) =>
      within(`planned_failover_sessions_halted ${count}`, 60_000, async () =>
        new RegExp(`^planned_failover_sessions_halted\\{[^}]*namespace="${namespace}"[^}]*\\} ${count}$`, 'm').test(
          await scrape(orchestrationMetrics),
        )
          ? true
          : undefined,
      );
    const halted = await haltedSession(client, lab, 'vm1', undefined, {
      input: { reason: `apart ${randomUUID()}` },
    });
    await haltedNow(1);
    await halted.session.executeUpdate(haltedSessionUpdates.retry, {
      args: [{ requestedBy: 'alice', reason: 'back' }],
    });
    const moved = (await halted.handle.result()) as PlannedFailoverResult;
    await haltedNow(0);
    const session = moved.sessions[0]!;
    assert.equal(session.outcome, 'failedOver', session.detail);
    assert.equal(session.fullVerification?.identical, true, JSON.stringify(session.fullVerification));
    // The copies went through the proxy's process: its queue has no other poller, and proxy-a's none at all.
    await polledBy(namespace, proxyTaskQueue(PROXY), ACTIVITY, proxy.worker);
    assert.deepEqual(await pollersOf(namespace, proxyTaskQueue('proxy-a'), ACTIVITY), []);

    // Each serves its metrics: the orchestrator's own come from the workflows and the halted-sessions count, so from
    // the orchestration's process.
    const ours = await scrape(orchestrationMetrics);
    const one = (metric: string, labels: string) => new RegExp(`^${metric}\\{[^}]*${labels}[^}]*\\} 1$`, 'm');
    assert.match(ours, one('planned_failover_sessions_total', 'operation="planned_failover",outcome="failedOver"'));
    assert.match(ours, one('planned_failover_sessions_total', 'operation="replication",outcome="replicated"'));
    assert.match(ours, one('planned_failover_downtime_seconds_count', 'outcome="failedOver"'));
    assert.match(ours, /^planned_failover_downtime_part_seconds_count\{[^}]*part="final_sync"[^}]*\} 1$/m);
    // Sampled from the slot registry every 10 s: the session's slot is given back by the next sample.
    const slots = async () => {
      for (const deadline = Date.now() + 15_000; ; await new Promise((r) => setTimeout(r, 500))) {
        const text = await scrape(orchestrationMetrics);
        if (/^planned_failover_proxy_slots_in_use\{[^}]*proxy="proxy-b"[^}]*\} 0$/m.test(text) || Date.now() > deadline)
          return text;
      }
    };
    const sampled = await slots();
    assert.match(sampled, /^planned_failover_proxy_slots_capacity\{[^}]*proxy="proxy-b"[^}]*\} 2$/m);
    assert.match(sampled, /^planned_failover_proxy_slots_in_use\{[^}]*proxy="proxy-b"[^}]*\} 0$/m);
    assert.match(ours, one('planned_failover_halts_total', 'step="[a-zA-Z]+"'));
    assert.match(ours, one('planned_failover_halt_decisions_total', 'decision="retry"'));
    const proxies = await scrape(proxyMetrics);
    assert.match(proxies, /^temporal_activity_execution_latency_count\{[^}]*activity_type="copyDisk"/m);
    assert.doesNotMatch(proxies, /^planned_failover_/m);

    // An operator's stop (SIGTERM) ends each cleanly.
    for (const { worker } of [proxy, orchestration]) {
      await terminate(worker.child);
      const exit = worker.child.exitCode ?? worker.child.signalCode;
      assert.equal(exit, 0, `pid ${worker.child.pid} exited ${exit}:\n${worker.output()}`);
    }
  });
});
