// `npm run cluster` as an operator runs it: it comes up split, with the Web UI and both metrics endpoints; workflows
// run on it and the UI finds them by FailoverVm; SIGTERM stops everything it started; a second start keeps every
// workflow and replica state; after a SIGKILL of the command the next start stops what it left; bad input is refused.
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { after, before, describe, it } from 'node:test';
import { Client, Connection } from '@temporalio/client';
import { startReplicationJob } from '../../src/client';
import { replicaWorkflowId, SearchAttributes, type PlannedFailoverResult } from '../../src/contract';
import { startFailover } from '../failover-helpers';
import { startOrchestrator, testConfiguration } from '../harness';
import { DR, estateOf, MiB } from '../lab/helpers';
import { kill, runScript, startScript, terminate, type ServingProcess } from '../processes';
import { testClusterSettings } from './helpers';

const VM = 'cc-web';
/** The last line it prints once it is up. */
const READY = /^Press Ctrl-C to stop the cluster/;

/** Pids of processes whose command line names the directory: what a cluster on it runs. */
function processesOn(stateDir: string): number[] {
  return readdirSync('/proc')
    .filter((entry) => /^\d+$/.test(entry))
    .filter((pid) => {
      try {
        return readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(stateDir);
      } catch {
        return false;
      }
    })
    .map(Number);
}

describe('npm run cluster', () => {
  let env: Record<string, string>;
  let stateDir: string;
  let frontend: string;
  let ui: string;
  let cluster: ServingProcess | undefined;
  const start = async (): Promise<ServingProcess> =>
    (cluster = await startScript('scripts/cluster.ts', ['--split'], env, READY, 300_000));

  before(async () => {
    const settings = await testClusterSettings(['--split']);
    stateDir = settings.stateDir;
    env = { PF_CLUSTER_PORT: String(settings.ports.frontend), PF_CLUSTER_DIR: stateDir };
    frontend = `127.0.0.1:${settings.ports.frontend}`;
    ui = `http://127.0.0.1:${settings.ports.ui}`;
  });

  after(async () => {
    if (cluster) await terminate(cluster.child);
    await rm(stateDir, { recursive: true, force: true });
  });

  it('refuses a bad flag or setting by name, starting nothing', async () => {
    const bad = await runScript('scripts/cluster.ts', ['--spilt'], env);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /unknown argument '--spilt'/);
    const badPort = await runScript('scripts/cluster.ts', [], { ...env, PF_CLUSTER_PORT: 'seven' });
    assert.equal(badPort.code, 2);
    assert.match(badPort.stderr, /PF_CLUSTER_PORT/);
    assert.deepEqual(processesOn(stateDir), []);
  });

  let namespace: string;
  let failoverId: string;
  it('comes up split, runs a planned failover, and its Web UI lists the sessions by FailoverVm', async () => {
    const running = await start();
    const output = running.output();
    assert.match(output, /Started the Temporal history service/);
    assert.match(output, /Started the Temporal frontend, matching, worker services/);
    assert.match(output, new RegExp(`export TEMPORAL_ADDRESS=${frontend} TEMPORAL_NAMESPACE=default`));
    // The CLI commands it suggests exist (it once suggested one that did not).
    const suggested = [...output.matchAll(/^ {2}npm run failover -- (\S+)/gm)].map((m) => m[1]!);
    assert.notDeepEqual(suggested, []);
    for (const command of suggested)
      assert.equal((await runScript('src/cli/main.ts', ['help', command], {})).code, 0, `failover ${command}`);
    const metricsOf = (name: string) => new RegExp(`${name} (http://127\\.0\\.0\\.1:\\d+/metrics)`).exec(output)?.[1];
    const [frontendMetrics, historyMetrics] = [metricsOf('frontend'), metricsOf('history')];
    assert.match(await (await fetch(frontendMetrics!)).text(), /^service_requests\{/m);
    assert.match(await (await fetch(historyMetrics!)).text(), /^acquire_shards_count\{/m);

    const o = await startOrchestrator({
      server: frontend,
      estate: estateOf([VM], [{ id: 'os', size: 2 * MiB }], { writeRate: 20, shutdownMs: 100, bootMs: 100 }),
      configure: (url) => testConfiguration(url, { jobs: [{ name: `job-${VM}`, vms: [VM], targetHost: DR }] }),
    });
    try {
      namespace = o.namespace;
      await (await startReplicationJob(o.client, { job: `job-${VM}`, requestedBy: 'alice' })).result();
      const handle = await startFailover(o.client, { vms: [VM], reason: 'on the cluster', requestedBy: 'alice' });
      failoverId = handle.workflowId;
      await handle.result();
    } finally {
      await o.close();
    }
    const query = encodeURIComponent(`${SearchAttributes.FailoverVm.name}="${VM}"`);
    const listed = (await (await fetch(`${ui}/api/v1/namespaces/${namespace}/workflows?query=${query}`)).json()) as {
      executions?: { type: { name: string } }[];
    };
    const types = (listed.executions ?? []).map((e) => e.type.name);
    assert.ok(types.includes('plannedFailoverSession'), `the UI lists ${types.join(', ')}`);
  });

  it('stops everything it started on SIGTERM, and keeps every workflow and replica state for the next start', async () => {
    const child = cluster!.child;
    const exited = new Promise<number | null>((resolveExit) => child.once('exit', (code) => resolveExit(code)));
    child.kill('SIGTERM');
    assert.equal(await exited, 0, cluster!.output());
    assert.match(cluster!.output(), /Stopped\.\s*$/);
    assert.deepEqual(processesOn(stateDir), [], 'nothing of the cluster is left running');

    await start();
    const connection = await Connection.connect({ address: frontend });
    try {
      const client = new Client({ connection, namespace });
      // No worker runs now: what the cluster kept is read from the server alone.
      const entity = await client.workflow.getHandle(replicaWorkflowId(VM)).describe();
      assert.equal(entity.status.name, 'RUNNING');
      assert.equal(entity.typedSearchAttributes.get(SearchAttributes.ReplicaState), 'Failover');
      const result = (await client.workflow.getHandle(failoverId).result()) as PlannedFailoverResult;
      assert.equal(result.sessions[0]!.outcome, 'failedOver');
      const sessions = [];
      for await (const wf of client.workflow.list({ query: `${SearchAttributes.FailoverVm.name}="${VM}"` }))
        sessions.push(wf.type);
      assert.ok(sessions.includes('plannedFailoverSession'), sessions.join(', '));
    } finally {
      await connection.close();
    }
  });

  it('after a SIGKILL of the command, the next start stops what it left running and comes up', async () => {
    await kill(cluster!.child);
    const left = processesOn(stateDir);
    assert.ok(left.length >= 4, `PostgreSQL, two server processes and the UI outlive a SIGKILL: ${left.join(' ')}`);
    const again = await start();
    assert.match(again.output(), /that a killed run of the cluster left running/);
    for (const pid of left) assert.ok(!processesOn(stateDir).includes(pid), `pid ${pid} of the killed run is gone`);
  });
});
