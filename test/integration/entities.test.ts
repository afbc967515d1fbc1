// The long-lived entities (replica/<vm>, proxy-slots) never wedge: not at continue-as-new with an update waiting,
// not when a holder dies without giving back what it holds, and not when the entity itself is terminated (it
// rebuilds its state from the DR host and never takes an existing replica for an unseeded one). They run here on
// a server of their own that suggests continue-as-new after 60 events, so they do so again and again.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import type { WorkflowHandle } from '@temporalio/client';
import { replicaNameOf } from '../../src/activities/inventory';
import { startReplicationJob } from '../../src/client';
import {
  FailureTypes,
  haltedSessionUpdates,
  operationSignals,
  operationUpdates,
  PROXY_REGISTRY_WORKFLOW_ID,
  proxyQueries,
  replicaWorkflowId,
  type OperationOutcome,
} from '../../src/contract';
import type { LabFault } from '../../src/hypervisor/host-api-adapter';
import { freePort, startDevServer, type DevServer } from '../../scripts/lib/dev-server';
import { ALL_ROLES } from '../../src/worker';
import {
  entityState,
  haltOf,
  replicaImage,
  replicaOnHost,
  sameImages,
  sessionAt,
  startFailover,
  type Disk,
} from '../failover-helpers';
import {
  settlesWithin,
  startOrchestrator,
  temporalCli,
  testConfiguration,
  within,
  type TestOrchestrator,
} from '../harness';
import { DR, estateOf, MiB } from '../lab/helpers';

const DISKS: Disk[] = [
  { id: 'os', size: 2 * MiB },
  { id: 'data', size: 2 * MiB },
];
const VM = {
  queuedUpdate: 'en-can',
  deadParent: 'en-parent',
  deadSession: 'en-session',
  permanentLost: 'en-perm',
  readyLost: 'en-ready',
  failbackLost: 'en-back',
  adopted: 'en-adopt',
  entityGone: 'en-gone',
  rolledOver: 'en-roll',
  moved: 'en-moved',
  busy: 'en-busy',
} as const;
const VMS = Object.values(VM);
const SUGGEST_CONTINUE_AS_NEW = 60;
const alice = { requestedBy: 'alice' };

describe('the entities survive continue-as-new, dead holders and their own loss', () => {
  let server: DevServer;
  let dir: string;
  let o: TestOrchestrator;

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'pf-entities-'));
    server = await startDevServer({
      cli: temporalCli(),
      port: await freePort(),
      dbFile: join(dir, 'temporal.db'),
      logFile: join(dir, 'server.log'),
      dynamicConfig: { 'limit.historyCount.suggestContinueAsNew': SUGGEST_CONTINUE_AS_NEW },
    });
    o = await startOrchestrator({
      server: server.address,
      estate: estateOf(VMS, DISKS, { writeRate: 0, shutdownMs: 100, bootMs: 100 }),
      configure: (url) => configuration(url),
    });
    await Promise.all(VMS.map((vm) => runJob(vm, 'replicated')));
  });

  /** The test's configuration; `movedTo` puts en-moved in another job, as an operator's edit would. */
  const configuration = (url: string, movedTo?: string) =>
    testConfiguration(url, {
      // Exactly one slot per disk on the dead session's proxy: its leaked slots would block the next run.
      proxies: [
        { name: 'proxy-a', slots: 8 },
        { name: 'proxy-tight', slots: 2 },
      ],
      jobs: VMS.map((vm) => ({
        name: vm === VM.moved && movedTo ? movedTo : `job-${vm}`,
        vms: [vm],
        targetHost: DR,
        ...(vm === VM.deadSession ? { proxies: ['proxy-tight'] } : {}),
      })),
    });

  after(async () => {
    await o?.close();
    await server?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  async function runJob(vm: string, expected: string, ms = 60_000, job = `job-${vm}`) {
    const handle = await startReplicationJob(o.client, { job, requestedBy: 'alice' });
    const result = await settlesWithin(`the job run of ${vm}`, ms, handle.result());
    const session = result.sessions[0]!;
    assert.equal(session.outcome, expected, `${vm}: ${session.detail}`);
    return session;
  }

  const replicaPath = (vm: string) => `/v1/hosts/${DR}/replicas/${replicaNameOf(vm)}`;
  const helper2Writes = (vm: string): LabFault => ({
    kind: 'fail',
    path: `^${replicaPath(vm)}/points/[^/]*-helper2/disks/[^/]+/write$`,
  });
  /** A planned failover of `vm` halted in its critical window: helper point 2 could not be written. */
  async function haltedAtHelper2(vm: string): Promise<WorkflowHandle> {
    await o.lab.control.setFault(DR, helper2Writes(vm));
    await startFailover(o.client, { vms: [vm], reason: 'halt it', requestedBy: 'alice' });
    const session = await sessionAt(o.client, vm, 'Halted');
    await haltOf(session);
    await o.lab.control.clearFaults(DR);
    return session;
  }
  const slowHelper1 = (vm: string): LabFault => ({
    kind: 'slow',
    latencyMs: 5_000,
    path: `^${replicaPath(vm)}/points/[^/]*-helper1/disks/[^/]+/write$`,
  });
  const entity = (vm: string) => o.client.workflow.getHandle(replicaWorkflowId(vm));
  const terminate = (workflowId: string) => o.client.workflow.getHandle(workflowId).terminate('test: holder dies');

  it('an update queued behind a halted session at continue-as-new completes once the session ends', async () => {
    const vm = VM.queuedUpdate;
    const session = await haltedAtHelper2(vm);
    const firstRun = (await entity(vm).describe()).runId;
    const point = (await entityState(o.client, vm)).restorePoints[0]!;
    // The update waits for its turn behind the halted session.
    const update: Promise<OperationOutcome> = entity(vm).executeUpdate(operationUpdates.failover, {
      args: [{ ...alice, reason: 'queued behind the halt', restorePointId: point.id }],
    });
    // Refused signals push the entity well past the server's continue-as-new suggestion meanwhile.
    for (let i = 0; i < 25; i++)
      await entity(vm).signal(operationSignals.commitFailback, { ...alice, reason: `refused ${i}` });
    assert.ok((await entity(vm).describe()).historyLength > SUGGEST_CONTINUE_AS_NEW, 'past the suggestion');
    await session.executeUpdate(haltedSessionUpdates.abort, { args: [{ ...alice, reason: 'let the update run' }] });
    const outcome = await settlesWithin('the queued update to complete', 60_000, update);
    assert.equal(outcome.state, 'Failover');
    await within('the entity to continue as new', 30_000, async () =>
      (await entity(vm).describe()).runId !== firstRun ? true : undefined,
    );
    assert.equal((await entityState(o.client, vm)).state, 'Failover', 'the state travelled with the new run');
  });

  it('an update that would hold the history open for good is answered StillQueued; its operation stays queued', async () => {
    const vm = VM.rolledOver;
    const session = await haltedAtHelper2(vm);
    const point = (await entityState(o.client, vm)).restorePoints[0]!;
    let settled = false;
    const answered = entity(vm)
      .executeUpdate(operationUpdates.failover, {
        args: [{ ...alice, reason: 'queued for long', restorePointId: point.id }],
      })
      .then(
        () => assert.fail('the update waited for its turn behind the halted session'),
        (e: { cause?: { type?: string; message?: string } }) => e.cause!,
      )
      .finally(() => (settled = true));
    // Refused signals push the history far past the suggestion (60 events) and the roll-over margin (2000 more):
    // the entity then lets go of the update rather than keep its history growing.
    for (let i = 0; i < 3000 && !settled; i += 25)
      await Promise.all(
        Array.from({ length: 25 }, (_, k) =>
          entity(vm).signal(operationSignals.commitFailback, { ...alice, reason: `refused ${i + k}` }),
        ),
      );
    const answer = await settlesWithin('the update to be answered', 60_000, answered);
    assert.equal(answer.type, FailureTypes.stillQueued);
    assert.match(answer.message ?? '', /still queued behind plannedFailover/);
    // The operation itself waits in the queue of the entity's new run, and runs once the session is decided.
    assert.ok((await entityState(o.client, vm)).waitingSessions.some((s) => s.kind === 'failover'));
    await session.executeUpdate(haltedSessionUpdates.abort, { args: [{ ...alice, reason: 'let it run' }] });
    const done = await within('the queued failover to run', 60_000, async () => {
      const view = await entityState(o.client, vm);
      return view.lastRun?.kind === 'failover' ? view : undefined;
    });
    assert.equal(done.state, 'Failover');
  });

  it('a planned failover terminated mid-sync stops cleanly: the next job run replicates, no slot leaks', async () => {
    const vm = VM.deadParent;
    await o.lab.control.setFault(DR, slowHelper1(vm));
    const parent = await startFailover(o.client, { vms: [vm], reason: 'terminate me', requestedBy: 'alice' });
    const session = await sessionAt(o.client, vm, 'Syncing');
    await terminate(parent.workflowId);
    await o.lab.control.clearFaults(DR);
    await within('the session to stop', 60_000, async () =>
      (await session.describe()).status.name === 'CANCELLED' ? true : undefined,
    );
    await runJob(vm, 'replicated');
    const registry = await o.client.workflow.getHandle(PROXY_REGISTRY_WORKFLOW_ID).query(proxyQueries.slots);
    assert.ok(
      registry.proxies.every((p) => !p.leasedTo.some((s) => session.workflowId.endsWith(s))),
      `no lease of the stopped session: ${JSON.stringify(registry.proxies)}`,
    );
  });

  it('a session terminated while it holds the replica and its slots: both are taken back, the slots unasked', async () => {
    const vm = VM.deadSession;
    await o.lab.control.setFault(DR, slowHelper1(vm));
    await startFailover(o.client, { vms: [vm], reason: 'kill the session', requestedBy: 'alice' });
    const session = await sessionAt(o.client, vm, 'Syncing');
    const leasedTo = async () =>
      (await o.client.workflow.getHandle(PROXY_REGISTRY_WORKFLOW_ID).query(proxyQueries.slots)).proxies.find(
        (p) => p.name === 'proxy-tight',
      )!.leasedTo;
    await within('the session to lease its slots', 30_000, async () =>
      (await leasedTo()).length > 0 ? true : undefined,
    );
    await terminate(session.workflowId); // no clean-up of its own runs
    await o.lab.control.clearFaults(DR);
    // Nobody waits: the registry and the entity find the dead holder by themselves (0.2.0 waited for a request).
    await within('the registry to take the slots back', 30_000, async () =>
      (await leasedTo()).length === 0 ? true : undefined,
    );
    await within('the entity to take the replica back', 30_000, async () =>
      (await entityState(o.client, vm)).currentSession === null ? true : undefined,
    );
    const run = await runJob(vm, 'replicated', 60_000);
    assert.ok(run.restorePoint, 'a new point');
    const state = await entityState(o.client, vm);
    assert.match(state.lastRun?.outcome ?? '', /replicated/);
  });

  it('a permanently failed-over replica whose entity was terminated is never written by a job run', async () => {
    const vm = VM.permanentLost;
    const moved = await startFailover(o.client, { vms: [vm], reason: 'move', requestedBy: 'alice' });
    await moved.result();
    await entity(vm).executeUpdate(operationUpdates.permanentFailover, {
      args: [{ ...alice, reason: 'DC closed', confirm: true }],
    });
    const before = await replicaImage(o.lab, vm, DISKS, { running: true });
    await terminate(replicaWorkflowId(vm));
    const run = await runJob(vm, 'skipped');
    assert.match(run.detail, /permanent failover|production VM/);
    assert.equal((await entityState(o.client, vm)).state, 'PermanentFailover', 'rebuilt from the DR host');
    assert.ok(sameImages(await replicaImage(o.lab, vm, DISKS, { running: true }), before), 'the disks are untouched');
    assert.equal((await replicaOnHost(o.lab, vm)).points.length, 0);
  });

  it('a terminated entity of a seeded replica rebuilds Ready, and the next run is incremental', async () => {
    const vm = VM.readyLost;
    const points = (await entityState(o.client, vm)).restorePoints.length;
    await terminate(replicaWorkflowId(vm));
    const run = await runJob(vm, 'replicated');
    assert.deepEqual(Object.values(run.copy!.modes), ['tracked', 'tracked'], 'never taken for unseeded: no full copy');
    const state = await entityState(o.client, vm);
    assert.equal(state.state, 'Ready');
    assert.equal(state.restorePoints.length, points + 1);
  });

  it('a terminated entity of a replica failing back rebuilds Failback, and commit works', async () => {
    const vm = VM.failbackLost;
    await (await startFailover(o.client, { vms: [vm], reason: 'move', requestedBy: 'alice' })).result();
    await entity(vm).executeUpdate(operationUpdates.failback, { args: [{ ...alice, reason: 'home' }] });
    await terminate(replicaWorkflowId(vm));
    await runJob(vm, 'skipped'); // starts the entity again: it rebuilds first
    const state = await entityState(o.client, vm);
    assert.equal(state.state, 'Failback');
    assert.equal(state.failbackTo?.vm, vm);
    const committed = await entity(vm).executeUpdate(operationUpdates.commitFailback, {
      args: [{ ...alice, reason: 'ok' }],
    });
    assert.equal(committed.state, 'Ready');
    await runJob(vm, 'replicated');
  });

  it('a session whose entity is gone when it ends keeps its own result', async () => {
    const vm = VM.entityGone;
    const session = await haltedAtHelper2(vm);
    await terminate(replicaWorkflowId(vm));
    await session.executeUpdate(haltedSessionUpdates.abort, { args: [{ ...alice, reason: 'nobody to tell' }] });
    const result = await settlesWithin('the session', 60_000, session.result() as Promise<{ outcome: string }>);
    assert.equal(result.outcome, 'aborted', 'giving the replica back to a gone entity does not fail the session');
    // The next request starts the entity afresh: it rebuilds Ready, and replication goes on.
    await runJob(vm, 'replicated');
  });

  it('a new entity finds a halted session holding the replica and waits for it', async () => {
    const vm = VM.adopted;
    const session = await haltedAtHelper2(vm);
    await terminate(replicaWorkflowId(vm));
    const job = await startReplicationJob(o.client, { job: `job-${vm}`, requestedBy: 'alice' });
    // A query of the terminated run still answers its old state: wait for the new run's.
    const state = await within('the new entity to adopt the halted session', 30_000, async () => {
      const view = await entityState(o.client, vm).catch(() => undefined);
      return view?.currentSession?.workflowId === session.workflowId && view.waitingSessions.length > 0
        ? view
        : undefined;
    });
    assert.deepEqual(
      state.waitingSessions.map((s) => s.kind),
      ['jobRun'],
      'the job run waits behind the halted session',
    );
    assert.equal(state.currentSession?.kind, 'plannedFailover');
    await session.executeUpdate(haltedSessionUpdates.abort, { args: [{ ...alice, reason: 'done' }] });
    const result = await settlesWithin('the job run', 60_000, job.result());
    assert.equal(result.sessions[0]!.outcome, 'replicated');
  });

  it('a job run that waits for its replica longer than its limit gives its place back and is skipped', async () => {
    const vm = VM.busy;
    const session = await haltedAtHelper2(vm);
    const job = await startReplicationJob(o.client, {
      job: `job-${vm}`,
      requestedBy: 'alice',
      options: { proxyWaitTimeoutSeconds: 5 },
    });
    const run = (await settlesWithin('the job run', 60_000, job.result())).sessions[0]!;
    assert.equal(run.outcome, 'skipped', run.detail);
    assert.match(run.detail, /busy with another session or operation for 5 s/);
    await within('the job run to leave the queue', 30_000, async () => {
      const view = await entityState(o.client, vm);
      return view.waitingSessions.length === 0 && view.currentSession?.workflowId === session.workflowId
        ? true
        : undefined;
    });
    await session.executeUpdate(haltedSessionUpdates.abort, { args: [{ ...alice, reason: 'done' }] });
    await settlesWithin('the session', 60_000, session.result());
    await runJob(vm, 'replicated');
  });

  it('a VM moved to another job in the configuration is replicated and operated on under its new job', async () => {
    const vm = VM.moved;
    await o.stopWorkers();
    const moved = await o.startWorkersFor(ALL_ROLES, (url) => configuration(url, 'job-renamed'));
    try {
      await runJob(vm, 'replicated', 60_000, 'job-renamed');
      assert.equal((await entityState(o.client, vm)).job, 'job-renamed', 'the entity follows the configuration');
      await settlesWithin(
        'the failover',
        60_000,
        (await startFailover(o.client, { vms: [vm], reason: 'moved', requestedBy: 'alice' })).result(),
      );
      const undone = await entity(vm).executeUpdate(operationUpdates.undoFailover, {
        args: [{ ...alice, reason: 'back' }],
      });
      assert.equal(undone.state, 'Ready');
    } finally {
      await moved.stop();
      await o.startWorkers();
    }
  });
});
