import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import type { EstateInput } from '../../lab/estate';
import { replicaNameOf } from '../../src/activities/inventory';
import { startPlannedFailover, startReplicationJob } from '../../src/client';
import {
  FailureTypes,
  operationSignals,
  operationUpdates,
  replicaQueries,
  replicaWorkflowId,
  WorkflowTypes,
  type OperationName,
  type PlannedFailoverSessionResult,
  type RestorePointSummary,
} from '../../src/contract';
import type { ReplicaView } from '../../src/hypervisor/port';
import {
  operationByCli,
  operationFinished,
  startOrchestrator,
  testConfiguration,
  within,
  type TestOrchestrator,
} from '../harness';
import { assemble, DR, estateOf, PROD } from '../lab/helpers';

const MiB = 1024 * 1024;
const DISKS = [
  { id: 'os', size: 4 * MiB },
  { id: 'data', size: 2 * MiB },
];
const VMS = [
  'undo1',
  'back1',
  'back2',
  'perm1',
  'pick1',
  'state1',
  'new1',
  'queue1',
  'rest1',
  'fail1',
  'torn1',
  'torn2',
  'reg1',
  'new2',
  'at1',
];

const estate = (): EstateInput =>
  estateOf(VMS, DISKS, { writeRate: 40, hotSetFraction: 0.2, shutdownMs: 200, bootMs: 200 });

describe('finishing a failover: undo, permanent, failback with commit and undo, regular failover', () => {
  let o: TestOrchestrator;
  const failedOver = new Map<string, PlannedFailoverSessionResult>();

  before(async () => {
    o = await startOrchestrator({
      estate: estate(),
      configure: (url) =>
        testConfiguration(url, { jobs: [{ name: 'ops', vms: VMS, targetHost: DR, restorePoints: 10 }] }),
    });
    const seeded = await (await startReplicationJob(o.client, { job: 'ops', requestedBy: 'alice' })).result();
    for (const s of seeded.sessions) assert.equal(s.outcome, 'replicated', s.detail);
    const moved = await (
      await startPlannedFailover(o.client, {
        vms: ['undo1', 'back1', 'back2', 'perm1', 'new1', 'queue1', 'rest1', 'fail1', 'torn1', 'torn2', 'new2'],
        reason: 'set-up',
        requestedBy: 'alice',
        options: { maxParallelJobs: 1 },
      })
    ).result();
    for (const s of moved.sessions) failedOver.set(s.vm, s);
    // at1 gets a second restore point, for choosing one by time.
    await (await startReplicationJob(o.client, { job: 'ops', requestedBy: 'alice', vms: ['at1'] })).result();
  });

  after(() => o?.close());

  const entity = (vm: string) => o.client.workflow.getHandle(replicaWorkflowId(vm));
  const state = (vm: string) => entity(vm).query(replicaQueries.state);
  const update = (vm: string, op: OperationName, payload: unknown) =>
    entity(vm).executeUpdate(operationUpdates[op], { args: [payload] });
  const refusal = (vm: string, op: OperationName, payload: unknown): Promise<string> =>
    update(vm, op, payload).then(
      (outcome) => assert.fail(`${op} on ${vm} should be refused, got ${JSON.stringify(outcome)}`),
      (e: unknown) => String((e as { cause?: Error }).cause?.message ?? (e as Error).message),
    );
  const who = { requestedBy: 'alice', reason: 'test' };

  async function disk(read: (d: { id: string; size: number }) => Promise<Buffer>): Promise<Buffer[]> {
    return Promise.all(DISKS.map(read));
  }
  const replicaImage = (vm: string, view: ReplicaView) =>
    disk((d) =>
      assemble(
        o.lab.port.readReplicaExtents({ host: DR, replica: replicaNameOf(vm), disk: d.id }, view, [
          { offset: 0, length: d.size },
        ]),
        d.size,
      ),
    );
  async function productionImage(vm: string): Promise<Buffer[]> {
    const ref = { host: PROD, vm };
    const checkpointId = `test-${randomUUID()}`;
    await o.lab.port.createCheckpoint(ref, checkpointId);
    try {
      return await disk((d) =>
        assemble(o.lab.port.readExtents({ ...ref, disk: d.id }, checkpointId, [{ offset: 0, length: d.size }]), d.size),
      );
    } finally {
      await o.lab.port.deleteCheckpoint(ref, checkpointId);
    }
  }
  const sameImages = (a: Buffer[], b: Buffer[]) => a.length === b.length && a.every((x, i) => x.equals(b[i]!));
  const power = async (vm: string) => (await o.lab.port.getVm({ host: PROD, vm })).powerState;
  /** Production refuses the failback's verification checkpoint (a conflict: not retried), after both phases. */
  const refuseVerification = (vm: string) =>
    o.lab.control.setFault(PROD, {
      kind: 'fail',
      status: 409,
      path: `^/v1/hosts/${PROD}/vms/${vm}/checkpoints/ckpt-[^/]*-verify$`,
    });
  const replicaInfo = (vm: string) => o.lab.port.getReplica({ host: DR, replica: replicaNameOf(vm) });

  it('undoFailover, typed at the Temporal CLI, discards the replica changes and the next run is incremental', async () => {
    const helper2 = failedOver.get('undo1')!.helperPoints[1]!;
    await new Promise((r) => setTimeout(r, 300)); // the replica's guest writes into its running layer
    const stdout = await operationByCli(o.namespace, 'update', 'undo1', 'undoFailover', {
      requestedBy: 'bob',
      reason: 'maintenance done',
    });
    assert.match(stdout, /replica off, its changes since failover discarded; undo1 powered on/);
    const info = await replicaInfo('undo1');
    assert.equal(info.powerState, 'Off');
    assert.equal(info.hasRunningLayer, false);
    assert.equal(info.headPointId, helper2);
    assert.equal(await power('undo1'), 'Running');
    assert.equal((await state('undo1')).state, 'Ready');

    const run = await (
      await startReplicationJob(o.client, { job: 'ops', requestedBy: 'alice', vms: ['undo1'] })
    ).result();
    assert.equal(run.sessions[0]!.outcome, 'replicated');
    assert.deepEqual(Object.values(run.sessions[0]!.copy!.modes), ['tracked', 'tracked'], 'no full resync after undo');
  });

  it('requests wait in order: an undo, a second undo and a job run sent together run one after another', async () => {
    await entity('queue1').signal(operationSignals.undoFailover, { requestedBy: 'alice', reason: 'first' });
    await entity('queue1').signal(operationSignals.undoFailover, { requestedBy: 'bob', reason: 'second' });
    const job = await startReplicationJob(o.client, { job: 'ops', requestedBy: 'alice', vms: ['queue1'] });
    const run = (await job.result()).sessions[0]!;

    // The first undo ran; the second waited for it and was refused at its turn, the replica being Ready by then;
    // the job run waited for both and replicated incrementally.
    assert.equal(run.outcome, 'replicated', run.detail);
    assert.deepEqual(Object.values(run.copy!.modes), ['tracked', 'tracked']);
    const view = await state('queue1');
    assert.equal(view.state, 'Ready');
    assert.equal(view.lastRejection?.requestedBy, 'bob');
    assert.match(view.lastRejection?.reason ?? '', /needs a replica in state Failover, but it is in state Ready/);
    const undos: (Date | undefined)[] = [];
    const query = `FailoverVm="queue1" AND WorkflowType="${WorkflowTypes.replicaOperation}"`;
    for await (const wf of o.client.workflow.list({ query })) undos.push(wf.closeTime);
    assert.equal(undos.length, 1, 'one undo ran');
    // The job run's restore point was begun only after the undo had finished.
    const point = view.restorePoints.at(-1)!;
    assert.equal(point.id, run.restorePoint?.id);
    assert.ok(new Date(point.createdAt) >= undos[0]!, 'the job run copied after the undo finished');
  });

  it('refuses every operation the state does not allow, by update and by signal, changing nothing', async () => {
    // state1 is Ready: only failover (and a job run or planned failover) may start from here.
    const before = await state('state1');
    for (const op of ['undoFailover', 'failback', 'commitFailback', 'undoFailback'] as const) {
      assert.match(await refusal('state1', op, who), new RegExp(`${op} needs a replica in state`));
    }
    assert.match(
      await refusal('state1', 'permanentFailover', { ...who, confirm: true }),
      /needs a replica in state Failover/,
    );
    await operationByCli(o.namespace, 'signal', 'state1', 'undoFailover', { requestedBy: 'bob', reason: 'by signal' });
    const after = await within('the refused signal in the replica state', 10_000, async () => {
      const view = await state('state1');
      return view.lastRejection?.requestedBy === 'bob' ? view : undefined;
    });
    assert.equal(after.lastRejection?.operation, 'undoFailover');
    assert.match(after.lastRejection?.reason ?? '', /needs a replica in state Failover/);
    assert.equal(after.state, before.state);
    assert.deepEqual(after.restorePoints, before.restorePoints);
    assert.equal(await power('state1'), 'Running');

    // perm1 is in Failover: failover, commitFailback and undoFailback are refused; bad payloads too.
    assert.match(await refusal('perm1', 'failover', { ...who, restorePointId: 'x' }), /needs a replica in state Ready/);
    assert.match(await refusal('perm1', 'commitFailback', who), /needs a replica in state Failback/);
    assert.match(await refusal('perm1', 'undoFailback', who), /needs a replica in state Failback/);
    assert.match(await refusal('perm1', 'permanentFailover', who), /confirm: must be true/);
    assert.match(await refusal('perm1', 'undoFailover', { reason: 'x' }), /requestedBy: is required/);
    assert.match(
      await refusal('perm1', 'undoFailover', { ...who, requestedBy: 'carol' }),
      /user 'carol' holds BackupOperator/,
    );
    assert.equal((await state('perm1')).state, 'Failover');
  });

  it('says what a refusal is: a missing role is an access refusal, a bad payload names the field, neither retryable', async () => {
    const causeOf = (vm: string, op: OperationName, payload: unknown) =>
      update(vm, op, payload).then(
        () => assert.fail(`${op} should be refused`),
        (e: { cause?: { type?: string; message?: string; nonRetryable?: boolean } }) => e.cause!,
      );
    const roles = await causeOf('perm1', 'undoFailover', { ...who, requestedBy: 'carol' });
    assert.equal(roles.type, FailureTypes.accessDenied);
    assert.equal(roles.nonRetryable, true);
    const schema = await causeOf('perm1', 'failback', { ...who, target: 'elsewhere' });
    assert.equal(schema.type, FailureTypes.invalidInput);
    assert.match(schema.message ?? '', /target: must be "original"/);
    assert.equal(schema.nonRetryable, true);
    const state = await causeOf('state1', 'undoFailover', who);
    assert.equal(state.type, FailureTypes.wrongState);
  });

  it('permanentFailover, confirmed and signalled at the Temporal CLI, merges every point; the job skips the VM', async () => {
    const request = { ...who, reason: 'permanent by signal', confirm: true };
    await operationByCli(o.namespace, 'signal', 'perm1', 'permanentFailover', request);
    const done = await operationFinished(o.client, 'perm1', 'permanentFailover', request.reason);
    assert.equal(done.state, 'PermanentFailover');
    const info = await replicaInfo('perm1');
    assert.equal(info.points.length, 0);
    assert.equal(info.powerState, 'Running');
    const run = await (
      await startReplicationJob(o.client, { job: 'ops', requestedBy: 'alice', vms: ['perm1'] })
    ).result();
    assert.equal(run.sessions[0]!.outcome, 'skipped');
    assert.match(await refusal('perm1', 'undoFailover', who), /state PermanentFailover/);
  });

  it('failback ships the replica back exactly; commit resumes incremental replication', async () => {
    await new Promise((r) => setTimeout(r, 300));
    const outcome = await update('back1', 'failback', who);
    assert.equal(outcome.state, 'Failback');
    const view = await state('back1');
    const protective = view.restorePoints.find((p) => p.kind === 'failback-protective');
    assert.ok(protective, 'a failback-protective point is kept');
    assert.deepEqual(view.failbackTo, { host: PROD, vm: 'back1' });
    // Production runs again (the default); the exact comparison is in the next test, where it stays off.
    assert.equal(await power('back1'), 'Running');
    assert.match(outcome.detail, /verified/);
    // The data moved on a proxy, like every copy, under the proxy's slot accounting.
    const history = await o.client.workflow.getHandle(outcome.workflowId).fetchHistory();
    const shipped = (history.events ?? []).filter(
      (e) => e.activityTaskScheduledEventAttributes?.activityType?.name === 'shipToProduction',
    );
    assert.equal(shipped.length, 2, 'two phases');
    for (const e of shipped)
      assert.equal(e.activityTaskScheduledEventAttributes?.taskQueue?.name, 'planned-failover-proxy-proxy-a');

    // Committed by a signal typed at the Temporal CLI.
    const commit = { ...who, reason: 'commit by signal' };
    await operationByCli(o.namespace, 'signal', 'back1', 'commitFailback', commit);
    const committed = await operationFinished(o.client, 'back1', 'commitFailback', commit.reason);
    assert.equal(committed.state, 'Ready');
    const run = await (
      await startReplicationJob(o.client, { job: 'ops', requestedBy: 'alice', vms: ['back1'] })
    ).result();
    assert.equal(run.sessions[0]!.outcome, 'replicated');
    assert.deepEqual(
      Object.values(run.sessions[0]!.copy!.modes),
      ['tracked', 'tracked'],
      'replication resumes incrementally',
    );
    assert.ok(
      (await state('back1')).restorePoints.some((p) => p.id === protective.id),
      'the protective point is kept',
    );
  });

  it('failback without powering production on leaves it equal to the replica; undoFailback returns to the replica', async () => {
    const outcome = await update('back2', 'failback', { ...who, powerOnProduction: false });
    assert.equal(outcome.state, 'Failback');
    assert.equal(await power('back2'), 'Off');
    const protective = (await state('back2')).restorePoints.find((p) => p.kind === 'failback-protective')!;
    assert.ok(
      sameImages(await productionImage('back2'), await replicaImage('back2', { pointId: protective.id })),
      'exact failback',
    );

    const undone = await update('back2', 'undoFailback', who);
    assert.equal(undone.state, 'Failover');
    assert.equal(await power('back2'), 'Off');
    const info = await replicaInfo('back2');
    assert.equal(info.powerState, 'Running');
    assert.equal(info.headPointId, protective.id);
  });

  it('failback to a new VM on a production host copies everything to it', async () => {
    const outcome = await update('new1', 'failback', {
      ...who,
      target: { newVm: { name: 'new1-restored', host: PROD } },
      powerOnProduction: false,
    });
    assert.equal(outcome.state, 'Failback');
    const protective = (await state('new1')).restorePoints.find((p) => p.kind === 'failback-protective')!;
    assert.ok(
      sameImages(await productionImage('new1-restored'), await replicaImage('new1', { pointId: protective.id })),
    );
    assert.deepEqual((await state('new1')).failbackTo, { host: PROD, vm: 'new1-restored' });
  });

  it('failback to a VM restored elsewhere finds it by name and ships only the blocks that differ', async () => {
    // A VM restored elsewhere, under another name, from a recent copy: the replica as it runs now.
    const restored = { host: PROD, vm: 'rest1-restored' };
    await o.lab.port.createVm(restored, { disks: DISKS.map((d) => ({ id: d.id, sizeBytes: d.size })) });
    for (const d of DISKS) {
      const replicaDisk = { host: DR, replica: replicaNameOf('rest1'), disk: d.id };
      const whole = [{ offset: 0, length: d.size }];
      await o.lab.port.writeExtents(
        { ...restored, disk: d.id },
        o.lab.port.readReplicaExtents(replicaDisk, { running: true }, whole),
      );
    }

    const outcome = await update('rest1', 'failback', {
      ...who,
      target: { restoredVm: restored.vm },
      powerOnProduction: false,
    });
    assert.equal(outcome.state, 'Failback');
    const view = await state('rest1');
    assert.deepEqual(view.failbackTo, restored);
    const protective = view.restorePoints.find((p) => p.kind === 'failback-protective')!;
    assert.ok(sameImages(await productionImage(restored.vm), await replicaImage('rest1', { pointId: protective.id })));
    const shipped = outcome.bytesCopied;
    const diskBytes = DISKS.reduce((n, d) => n + d.size, 0);
    assert.ok(shipped > 0 && shipped < diskBytes / 2, `${shipped} bytes shipped of ${diskBytes}: only what differs`);
    assert.equal(await power('rest1'), 'Off', 'the original source is not touched');
  });

  it('a failback that fails after the replica was stopped powers the replica on again; failback works again', async () => {
    const vm = 'fail1';
    // Production refuses the verification's checkpoint (a conflict: not retried): phase 2 is done, the replica off.
    await refuseVerification(vm);
    const failed = await refusal(vm, 'failback', { ...who, powerOnProduction: false });
    assert.match(failed, /powered on again and serves as before/);
    assert.equal((await replicaInfo(vm)).powerState, 'Running', 'the service is not left down');
    assert.equal((await state(vm)).state, 'Failover');
    await o.lab.control.clearFaults(PROD);
    const again = await update(vm, 'failback', { ...who, powerOnProduction: false });
    assert.equal(again.state, 'Failback');
    const protective = (await state(vm)).restorePoints.filter((p) => p.kind === 'failback-protective').at(-1)!;
    assert.ok(
      sameImages(await productionImage(vm), await replicaImage(vm, { pointId: protective.id })),
      'exact failback',
    );
  });

  it('after a failback that stopped once it had written to production, undoFailover does not boot that VM', async () => {
    const vm = 'torn1';
    // Both phases have written to production when its verification checkpoint is refused: the failback fails.
    await refuseVerification(vm);
    await refusal(vm, 'failback', { ...who, powerOnProduction: false });
    await o.lab.control.clearFaults(PROD);
    const marked = await state(vm);
    assert.equal(marked.unfinishedFailback?.vm, vm);
    assert.match(marked.attention ?? '', /torn1's disks may be partly overwritten; run failback again/);
    // 0.2.0 powered torn1 on here, with a mix of its own data and the replica's (found by the fault suite).
    const refused = await refusal(vm, 'undoFailover', who);
    assert.match(refused, /undoFailover would power on torn1, which failback .* may have partly overwritten/);
    assert.equal(await power(vm), 'Off', 'production stays off');
    assert.equal((await replicaInfo(vm)).powerState, 'Running', 'the replica still serves');
    const finished = await update(vm, 'failback', { ...who, powerOnProduction: false });
    assert.equal(finished.state, 'Failback');
    const after = await state(vm);
    assert.equal(after.unfinishedFailback, null);
    assert.equal(after.attention, null);
  });

  it('a failback terminated after it sealed its protective point: the failback the attention asks for finishes it', async () => {
    const vm = 'torn2';
    // Its verification hangs: both phases have written to production and the protective point is sealed.
    await o.lab.control.setFault(PROD, {
      kind: 'slow',
      latencyMs: 15_000,
      path: `^/v1/hosts/${PROD}/vms/${vm}/checkpoints/ckpt-[^/]*-verify$`,
    });
    const cutOff = refusal(vm, 'failback', { ...who, powerOnProduction: true });
    const sealed = await within('the protective point sealed, the replica off', 30_000, async () => {
      const info = await replicaInfo(vm);
      const head = info.points.find((p) => p.id === info.headPointId);
      return info.powerState === 'Off' && !info.hasRunningLayer && head?.kind === 'failback-protective' && head.sealed
        ? head
        : undefined;
    });
    // No clean-up runs: the replica stays off on that point (an operator's terminate, a reset gone wrong).
    await o.client.workflow.getHandle((await state(vm)).currentSession!.workflowId).terminate('test: cut off');
    assert.match(await cutOff, /failback failed: .*terminated/i);
    await o.lab.control.clearFaults(PROD);
    const marked = await state(vm);
    assert.equal(marked.state, 'Failover');
    assert.match(marked.attention ?? '', /torn2's disks may be partly overwritten; run failback again/);
    // 0.2.0 refused it here: the host shows the replica off, not failed over.
    const finished = await update(vm, 'failback', { ...who, powerOnProduction: false });
    assert.equal(finished.state, 'Failback', finished.detail);
    assert.match(finished.detail, new RegExp(`protective point ${sealed.id}`));
    const info = await replicaInfo(vm);
    assert.equal(info.headPointId, sealed.id, 'resumed from that point, no second one');
    assert.equal(info.points.filter((p) => p.kind === 'failback-protective').length, 1);
    assert.ok(
      sameImages(await productionImage(vm), await replicaImage(vm, { pointId: sealed.id })),
      'production is the point',
    );
    const after = await state(vm);
    assert.equal(after.unfinishedFailback, null);
    assert.equal(after.attention, null);
    // It was committed like any failback: the next job run is incremental from the point's reference.
    await update(vm, 'commitFailback', who);
    const run = (await (await startReplicationJob(o.client, { job: 'ops', requestedBy: 'alice', vms: [vm] })).result())
      .sessions[0]!;
    assert.equal(run.outcome, 'replicated', run.detail);
  });

  it('failback onto a production VM that runs is refused unless confirmed; then its guest is shut down and the overwrite recorded', async () => {
    const vm = 'reg1';
    const point = (await state(vm)).restorePoints.at(-1)!;
    await update(vm, 'failover', { ...who, restorePointId: point.id }); // a regular failover: production keeps running
    assert.equal(await power(vm), 'Running');
    const refused = await refusal(vm, 'failback', who);
    assert.match(refused, /reg1 is Running: failing back overwrites what it wrote since the failover/);
    assert.equal(await power(vm), 'Running', 'nothing was changed');
    assert.equal((await replicaInfo(vm)).powerState, 'Running');
    const outcome = await update(vm, 'failback', { ...who, confirm: true, powerOnProduction: false });
    assert.equal(outcome.state, 'Failback');
    assert.ok((outcome.productionBytesOverwritten ?? 0) > 0, `overwritten: ${outcome.productionBytesOverwritten}`);
    assert.match(
      outcome.detail,
      /reg1 had run since the failover: .* it wrote were overwritten \(confirmed by alice\)/,
    );
    const production = await o.lab.port.getVm({ host: PROD, vm });
    assert.equal(production.lastStop, 'guest-shutdown', 'shut down, not cut off');
  });

  it('after a failback to a new VM is committed, the job replicates the new VM, not the stale original', async () => {
    const vm = 'new2';
    const fresh = { host: PROD, vm: 'new2-fresh' };
    await update(vm, 'failback', {
      ...who,
      target: { newVm: { name: fresh.vm, host: PROD } },
      powerOnProduction: false,
    });
    const committed = await update(vm, 'commitFailback', who);
    assert.match(committed.detail, /production is new2-fresh/);
    assert.deepEqual((await state(vm)).productionVm, fresh);
    const run = (await (await startReplicationJob(o.client, { job: 'ops', requestedBy: 'alice', vms: [vm] })).result())
      .sessions[0]!;
    assert.equal(run.outcome, 'replicated', run.detail);
    assert.equal(run.restorePoint?.source.vm, fresh.vm, 'the new point was read from the new VM');
    assert.ok(
      sameImages(await replicaImage(vm, { pointId: run.restorePoint.id }), await productionImage(fresh.vm)),
      'the replica equals the VM that runs production now',
    );
  });

  it('a regular failover to a time picks the newest point at or before that instant, whatever its offset', async () => {
    const vm = 'at1';
    const [first, second] = (await state(vm)).restorePoints as [RestorePointSummary, RestorePointSummary];
    // The first point's instant, written in +02:00: as text it sorts after both points.
    const firstMs = Date.parse(first.createdAt);
    assert.ok(firstMs < Date.parse(second.createdAt));
    const local = new Date(firstMs + 2 * 3600_000).toISOString().replace('Z', '+02:00');
    const outcome = await update(vm, 'failover', { ...who, at: local });
    assert.match(outcome.detail, new RegExp(`replica running from ${first.id}`));
    assert.equal((await replicaInfo(vm)).headPointId, first.id);
  });

  it('regular failover to a chosen restore point, signalled at the Temporal CLI, leaves the source untouched', async () => {
    const points = (await state('pick1')).restorePoints;
    const chosen = points[0]!;
    const request = { ...who, reason: 'failover by signal', restorePointId: chosen.id };
    await operationByCli(o.namespace, 'signal', 'pick1', 'failover', request);
    const done = await operationFinished(o.client, 'pick1', 'failover', request.reason);
    assert.equal(done.state, 'Failover');
    assert.match(done.lastRun?.outcome ?? '', new RegExp(`replica running from ${chosen.id}`));
    assert.equal(await power('pick1'), 'Running');
    const info = await replicaInfo('pick1');
    assert.equal(info.powerState, 'Running');
    assert.equal(info.headPointId, chosen.id);
    assert.match(
      await refusal('pick1', 'failover', { ...who, restorePointId: chosen.id }),
      /needs a replica in state Ready/,
    );
  });
});
