import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import { WorkflowFailedError, type WorkflowHandle } from '@temporalio/client';
import { ApplicationFailure } from '@temporalio/common';
import type { EstateInput } from '../../lab/estate';
import { verifyGuestBlock, readCanarySequence } from '../../lab/guest';
import { replicaNameOf } from '../../src/activities/inventory';
import { startReplicationJob } from '../../src/client';
import {
  FailureTypes,
  haltedSessionUpdates,
  operationUpdates,
  PROXY_REGISTRY_WORKFLOW_ID,
  proxySignals,
  replicaQueries,
  replicaWorkflowId,
  TASK_QUEUE,
  WorkflowTypes,
  type PlannedFailoverResult,
  type PlannedFailoverSessionResult,
} from '../../src/contract';
import { BLOCK_SIZE } from '../../src/hypervisor/port';
import { signedFor, startOrchestrator, temporal, testConfiguration, type TestOrchestrator } from '../harness';
import { assemble, DR, estateOf, PROD } from '../lab/helpers';

const MiB = 1024 * 1024;
const DISKS = [
  { id: 'os', size: 4 * MiB },
  { id: 'data', size: 2 * MiB },
];

/** Running guests that keep writing: the failover must still lose nothing. */
const estate = (vms: string[]): EstateInput =>
  estateOf(vms, DISKS, { writeRate: 60, hotSetFraction: 0.2, shutdownMs: 300, bootMs: 300 });

const VMS = ['sql1', 'sql2', 'web1', 'roles1', 'halt-retry', 'halt-abort', 'halt-force', 'wait1', 'wait2'];

describe('planned failover against a real server and lab, bytes compared', () => {
  let o: TestOrchestrator;

  before(async () => {
    o = await startOrchestrator({
      estate: estate(VMS),
      configure: (url) =>
        testConfiguration(url, {
          proxies: [
            { name: 'proxy-a', slots: 4 },
            { name: 'proxy-b', slots: 2 },
          ],
          jobs: [
            { name: 'sql', vms: ['sql1', 'sql2'], targetHost: DR },
            // Replicates from a backup that goes stale: planned failover must still move the live state.
            { name: 'web', vms: ['web1'], targetHost: DR, dataSource: 'backup' },
            { name: 'other', vms: ['roles1', 'halt-retry', 'halt-abort', 'halt-force'], targetHost: DR },
            { name: 'queue', vms: ['wait1', 'wait2'], targetHost: DR, proxies: ['proxy-b'] },
          ],
        }),
    });
    await o.lab.control.takeBackup('web1');
    for (const job of ['sql', 'web', 'other', 'queue']) {
      const result = await (await startReplicationJob(o.client, { job, requestedBy: 'alice' })).result();
      for (const s of result.sessions) assert.equal(s.outcome, 'replicated', `${s.vm}: ${s.detail}`);
    }
  });

  after(() => o?.close());

  const start = (input: unknown): Promise<WorkflowHandle> =>
    o.client.workflow.start(WorkflowTypes.plannedFailover, {
      taskQueue: TASK_QUEUE,
      workflowId: `pf-${randomUUID()}`,
      args: [input],
    });

  async function failureOf(handle: WorkflowHandle): Promise<ApplicationFailure> {
    const err: unknown = await handle.result().then(
      () => undefined,
      (e: unknown) => e,
    );
    assert.ok(err instanceof WorkflowFailedError && err.cause instanceof ApplicationFailure, String(err));
    return err.cause;
  }

  async function sourceDisk(vm: string, disk: { id: string; size: number }): Promise<Buffer> {
    const checkpointId = `test-${randomUUID()}`;
    const ref = { host: PROD, vm };
    await o.lab.port.createCheckpoint(ref, checkpointId);
    try {
      return await assemble(
        o.lab.port.readExtents({ ...ref, disk: disk.id }, checkpointId, [{ offset: 0, length: disk.size }]),
        disk.size,
      );
    } finally {
      await o.lab.port.deleteCheckpoint(ref, checkpointId);
    }
  }

  const replicaDisk = (vm: string, disk: { id: string; size: number }, pointId: string): Promise<Buffer> =>
    assemble(
      o.lab.port.readReplicaExtents({ host: DR, replica: replicaNameOf(vm), disk: disk.id }, { pointId }, [
        { offset: 0, length: disk.size },
      ]),
      disk.size,
    );

  const replicaState = (vm: string) => o.client.workflow.getHandle(replicaWorkflowId(vm)).query(replicaQueries.state);

  async function waitForStep(vm: string, step: string): Promise<void> {
    for (let i = 0; i < 300; i++) {
      for await (const wf of o.client.workflow.list({
        query: `FailoverVm="${vm}" AND FailoverStep="${step}" AND ExecutionStatus="Running"`,
      })) {
        if (wf.type === 'plannedFailoverSession') return;
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.fail(`no session of ${vm} reached step ${step}`);
  }

  /**
   * A helper point is exact when it is the source at one instant. Every guest block carries its write sequence,
   * so that instant is the highest sequence in the point (the canary, written after each batch, may lag it):
   * every block the source last wrote up to then must equal the source's final block, and no block may be newer.
   */
  async function assertCrashConsistent(vm: string, pointId: string): Promise<void> {
    const images = await Promise.all(
      DISKS.map(async (disk) => ({
        disk,
        final: await sourceDisk(vm, disk),
        point: await replicaDisk(vm, disk, pointId),
      })),
    );
    const osPoint = images[0]!.point;
    const canary = readCanarySequence(osPoint.subarray(osPoint.length - BLOCK_SIZE));
    assert.ok(canary > 0, `${pointId} has a canary`);
    const isCanary = (disk: { id: string; size: number }, b: number) =>
      disk === DISKS[0] && b === disk.size / BLOCK_SIZE - 1;
    let instant = canary;
    for (const { disk, point } of images) {
      for (let b = 0; b < disk.size / BLOCK_SIZE; b++) {
        if (isCanary(disk, b)) continue;
        const seq = verifyGuestBlock(point.subarray(b * BLOCK_SIZE, (b + 1) * BLOCK_SIZE), vm, disk.id, b);
        if (seq !== null) instant = Math.max(instant, seq);
      }
    }
    for (const { disk, final, point } of images) {
      for (let b = 0; b < disk.size / BLOCK_SIZE; b++) {
        if (isCanary(disk, b)) continue;
        const ours = point.subarray(b * BLOCK_SIZE, (b + 1) * BLOCK_SIZE);
        const theirs = final.subarray(b * BLOCK_SIZE, (b + 1) * BLOCK_SIZE);
        const finalSeq = verifyGuestBlock(theirs, vm, disk.id, b);
        const pointSeq = verifyGuestBlock(ours, vm, disk.id, b);
        const where = `${vm}/${disk.id} block ${b} in ${pointId}`;
        if (finalSeq === null || finalSeq <= instant)
          assert.ok(ours.equals(theirs), `${where}: seq ${pointSeq}, source ${finalSeq}`);
        else
          assert.ok(
            pointSeq === null ? ours.equals(Buffer.alloc(BLOCK_SIZE)) : pointSeq < finalSeq,
            `${where}: not an older write`,
          );
      }
    }
    assert.ok(instant - canary < 1000, `${pointId}: the canary lags the data by at most one write batch`);
  }

  it('moves two jobs in parallel, one VM after another within a job, with zero data loss', async () => {
    // Let the guests write, and let the backup of web1 go stale, before the failover starts.
    await new Promise((r) => setTimeout(r, 500));
    const handle = await start({ vms: ['sql1', 'web1', 'sql2'], reason: 'DC maintenance', requestedBy: 'alice' });
    const result = (await handle.result()) as PlannedFailoverResult;
    assert.deepEqual(
      result.sessions.map((s) => [s.vm, s.outcome]),
      [
        ['sql1', 'failedOver'],
        ['web1', 'failedOver'],
        ['sql2', 'failedOver'],
      ],
    );
    for (const session of result.sessions) {
      const { vm } = session;
      assert.equal(session.verification?.identical, true, `${vm} verified`);
      assert.equal(session.helperPoints.length, 2);
      const [helper1, helper2] = session.helperPoints as [string, string];
      // The source is off now: helper point 2 must equal it, byte for byte, canary included.
      for (const disk of DISKS) {
        assert.ok(
          (await replicaDisk(vm, disk, helper2)).equals(await sourceDisk(vm, disk)),
          `${vm}/${disk.id} at helper point 2`,
        );
      }
      await assertCrashConsistent(vm, helper1);
      const source = await o.lab.port.getVm({ host: PROD, vm });
      assert.equal(source.powerState, 'Off');
      const replica = await o.lab.port.getReplica({ host: DR, replica: replicaNameOf(vm) });
      assert.equal(replica.powerState, 'Running');
      const state = await replicaState(vm);
      assert.equal(state.state, 'Failover');
      const listed = state.restorePoints.map((p) => p.id);
      assert.ok(listed.includes(helper1) && listed.includes(helper2), `${vm} lists both helper points`);
      assert.deepEqual(
        state.restorePoints.filter((p) => p.kind === 'planned-failover-helper').map((p) => p.id),
        [helper1, helper2],
      );
      const d = session.downtime!;
      assert.equal(
        d.guestShutdownMs + d.finalSyncMs + d.switchMs + d.bootMs + d.haltedMs + d.orchestrationMs,
        d.totalMs,
        `${vm}: the parts add up to the total`,
      );
      assert.ok(d.orchestrationMs >= 0, `${vm}: no part is longer than the whole (${JSON.stringify(d)})`);
      assert.equal(d.haltedMs, 0);
      assert.ok(d.guestShutdownMs >= 250 && d.bootMs >= 250, `${vm} shutdown and boot take the lab's configured time`);
      assert.ok(d.finalSyncMs > 0, `${vm}: the final sync took time`);
      // Zero data loss, proven twice: the copied blocks inside the window, then every block after power-on.
      assert.equal(session.fullVerification?.identical, true, JSON.stringify(session.fullVerification));
      // Every block holding data on the source was compared (the others are unallocated on both sides).
      let holding = 0;
      for (const disk of DISKS) {
        const image = await sourceDisk(vm, disk);
        for (let b = 0; b < disk.size / BLOCK_SIZE; b++)
          if (!image.subarray(b * BLOCK_SIZE, (b + 1) * BLOCK_SIZE).equals(Buffer.alloc(BLOCK_SIZE))) holding++;
      }
      assert.ok(
        (session.fullVerification?.blocksCompared ?? 0) >= holding,
        `${vm}: ${session.fullVerification?.covered}`,
      );
      // The window's proof was taken as the blocks were stored: every block copied after power-off, read back.
      assert.match(session.verification.covered, /read back on the DR host as it was stored/);
      assert.equal(session.verification.blocksCompared * BLOCK_SIZE, session.bytesAfterPowerOff, `${vm}`);
      assert.deepEqual(state.lastVerification?.identical, true);
      // Every point says where and when its data came from: the instants of its checkpoints, in order.
      const sources = [helper1, helper2].map((id) => state.restorePoints.find((p) => p.id === id)!.source);
      for (const source of sources) {
        assert.equal(source.kind, 'checkpoint');
        assert.equal(source.vm, vm);
        assert.equal(source.host, PROD);
      }
      const [at1, at2] = sources.map((source) => Date.parse(source.at ?? ''));
      assert.ok(
        at1! < at2!,
        `${vm}: helper point 2 shows a later instant than helper point 1 (${JSON.stringify(sources)})`,
      );
    }
    // web1's job replicates from a backup; its helper point 2 matched the live source above, not the backup.
    const sessionsOf = async (vm: string) => {
      const out: { start: number; end: number }[] = [];
      for await (const wf of o.client.workflow.list({
        query: `FailoverVm="${vm}" AND WorkflowType="plannedFailoverSession"`,
      })) {
        out.push({ start: wf.startTime.getTime(), end: wf.closeTime!.getTime() });
      }
      assert.equal(out.length, 1);
      return out[0]!;
    };
    const [sql1, sql2, web1] = await Promise.all([sessionsOf('sql1'), sessionsOf('sql2'), sessionsOf('web1')]);
    assert.ok(sql1.end <= sql2.start, 'sessions of one job run one after another, in request order');
    assert.ok(web1.start < sql1.end && sql1.start < web1.end, 'lanes of different jobs run in parallel');
  });

  it('a backup job after a planned failover never copies a backup older than the replica over it', async () => {
    // web1's backup is older than the helper points the planned failover copied from the live VM.
    const entity = o.client.workflow.getHandle(replicaWorkflowId('web1'));
    await entity.executeUpdate(operationUpdates.undoFailover, { args: [{ requestedBy: 'alice', reason: 'undo' }] });
    const head = (await o.lab.port.getReplica({ host: DR, replica: replicaNameOf('web1') })).headPointId!;
    const headImage = await Promise.all(DISKS.map((disk) => replicaDisk('web1', disk, head)));
    const stale = (await (await startReplicationJob(o.client, { job: 'web', requestedBy: 'alice' })).result())
      .sessions[0]!;
    assert.equal(stale.outcome, 'skipped');
    assert.match(stale.detail, /no backup point is newer than the replica/);
    const info = await o.lab.port.getReplica({ host: DR, replica: replicaNameOf('web1') });
    assert.equal(info.headPointId, head, 'no point was added');
    for (const [i, disk] of DISKS.entries())
      assert.ok((await replicaDisk('web1', disk, head)).equals(headImage[i]!), 'the head is unchanged');
    // A backup taken now is newer: it is copied, and its point says it came from that backup.
    const backup = await o.lab.control.takeBackup('web1');
    const fresh = (await (await startReplicationJob(o.client, { job: 'web', requestedBy: 'alice' })).result())
      .sessions[0]!;
    assert.equal(fresh.outcome, 'replicated', fresh.detail);
    assert.deepEqual(fresh.restorePoint?.source, {
      kind: 'backup',
      backupId: backup.id,
      vm: 'web1',
      at: backup.createdAt,
    });
  });

  it('allows exactly Backup Administrator, or Backup Operator with Restore Operator; refusals change nothing', async () => {
    for (const user of ['carol', 'dave', 'erin', 'mallory']) {
      const failure = await failureOf(await start({ vms: ['roles1'], reason: 'roles', requestedBy: user }));
      assert.equal(failure.type, FailureTypes.accessDenied, user);
      assert.match(failure.message, new RegExp(`requestedBy: (user '${user}' holds|unknown user '${user}')`));
      assert.equal((await o.lab.port.getVm({ host: PROD, vm: 'roles1' })).powerState, 'Running');
      assert.equal((await replicaState('roles1')).state, 'Ready');
    }
    const result = (await (
      await start({ vms: ['roles1'], reason: 'roles', requestedBy: 'bob' })
    ).result()) as PlannedFailoverResult;
    assert.equal(result.sessions[0]!.outcome, 'failedOver');
  });

  it('refuses impossible requests with one error naming every problem, touching nothing', async () => {
    const failure = await failureOf(
      await start({ vms: ['nosuch', 'sql1', 'halt-retry', 'halt-retry'], reason: 'bad', requestedBy: 'alice' }),
    );
    assert.equal(failure.type, FailureTypes.invalidInput);
    assert.match(failure.message, /vms\[3\]: 'halt-retry' is already named at vms\[2\]/);
    const again = await failureOf(await start({ vms: ['nosuch', 'sql1'], reason: 'bad', requestedBy: 'alice' }));
    assert.match(again.message, /vms\[0\]: 'nosuch' is in no replication job/);
    assert.match(again.message, /vms\[0\]: 'nosuch' is on none of the production hosts/);
    assert.match(
      again.message,
      /vms\[1\]: 'sql1': plannedFailover needs a replica in state Ready, but it is in state Failover/,
    );
    assert.equal((await o.lab.port.getVm({ host: PROD, vm: 'halt-retry' })).powerState, 'Running');
  });

  it('a session waiting for a proxy holds back the sessions behind it in its job', async () => {
    const registry = o.client.workflow.getHandle(PROXY_REGISTRY_WORKFLOW_ID);
    await registry.signal(proxySignals.setProxyOnline, { proxy: 'proxy-b', online: false, requestedBy: 'alice' });
    const handle = await start({ vms: ['wait1', 'wait2'], reason: 'queue', requestedBy: 'alice' });
    await waitForStep('wait1', 'WaitingForProxy');
    await new Promise((r) => setTimeout(r, 1500));
    const behind = [];
    for await (const wf of o.client.workflow.list({
      query: 'FailoverVm="wait2" AND WorkflowType="plannedFailoverSession"',
    }))
      behind.push(wf);
    assert.equal(behind.length, 0, 'wait2 has no session while wait1 waits for a proxy');
    await registry.signal(proxySignals.setProxyOnline, { proxy: 'proxy-b', online: true, requestedBy: 'alice' });
    const result = (await handle.result()) as PlannedFailoverResult;
    assert.deepEqual(
      result.sessions.map((s) => s.outcome),
      ['failedOver', 'failedOver'],
    );
  });

  /** Breaks the DR host's writes once the source is going down, so the final sync cannot finish. */
  async function haltedSession(vm: string): Promise<{ handle: WorkflowHandle; session: WorkflowHandle }> {
    const handle = await start({ vms: [vm], reason: 'critical window', requestedBy: 'alice' });
    await waitForStep(vm, 'PoweringOffSource');
    await o.lab.control.setFault(DR, { kind: 'fail' });
    try {
      await waitForStep(vm, 'Halted');
    } finally {
      // The session stays halted until an operator decides, whatever the DR host does now.
      await o.lab.control.clearFaults(DR);
    }
    let sessionId = '';
    for await (const wf of o.client.workflow.list({ query: `FailoverVm="${vm}" AND FailoverStep="Halted"` }))
      sessionId = wf.workflowId;
    return { handle, session: o.client.workflow.getHandle(sessionId) };
  }

  it('halts in the critical window; retry completes it with zero data loss', async () => {
    const { handle, session } = await haltedSession('halt-retry');
    // A decision needs the roles too, and is refused with the reason.
    const refused = await session
      .executeUpdate(haltedSessionUpdates.retry, { args: [{ requestedBy: 'erin', reason: 'try again' }] })
      .then(
        () => 'accepted',
        (e: unknown) => String((e as { cause?: Error }).cause?.message ?? e),
      );
    assert.match(refused, /user 'erin' holds BackupViewer/);
    const outcome = await session.executeUpdate(haltedSessionUpdates.retry, {
      args: [{ requestedBy: 'alice', reason: 'DR storage back' }],
    });
    assert.match(outcome, /retrying/);
    const result = (await handle.result()) as PlannedFailoverResult;
    const s = result.sessions[0]!;
    assert.equal(s.outcome, 'failedOver');
    assert.equal(s.verification?.identical, true);
    for (const disk of DISKS) {
      assert.ok(
        (await replicaDisk('halt-retry', disk, s.helperPoints[1]!)).equals(await sourceDisk('halt-retry', disk)),
      );
    }
  });

  it('abort powers the source back on; the replica stays Ready with helper point 1', async () => {
    const { handle, session } = await haltedSession('halt-abort');
    const outcome = await session.executeUpdate(haltedSessionUpdates.abort, {
      args: [{ requestedBy: 'bob', reason: 'not today' }],
    });
    assert.match(outcome, /aborted by bob/);
    const failure = await failureOf(handle);
    assert.equal(failure.type, FailureTypes.plannedFailoverIncomplete);
    const s = (failure.details?.[0] as PlannedFailoverResult).sessions[0] as PlannedFailoverSessionResult;
    assert.equal(s.outcome, 'aborted');
    assert.equal((await o.lab.port.getVm({ host: PROD, vm: 'halt-abort' })).powerState, 'Running');
    const state = await replicaState('halt-abort');
    assert.equal(state.state, 'Ready');
    assert.ok(
      state.restorePoints.some((p) => p.id === s.helperPoints[0]),
      'helper point 1 is kept',
    );
  });

  it('forceFailover fails over to helper point 1 and records the data loss', async () => {
    const { handle, session } = await haltedSession('halt-force');
    // Through the real `temporal` command, as an operator would type it.
    const { stdout } = await temporal(
      o.namespace,
      'workflow',
      'update',
      'execute',
      '--workflow-id',
      session.workflowId,
      '--name',
      'forceFailover',
      '--input',
      JSON.stringify(
        signedFor('forceFailover', session.workflowId, { requestedBy: 'alice', reason: 'production site is burning' }),
      ),
    );
    assert.match(stdout, /forced failover to helper restore point 1 by alice/);
    const failure = await failureOf(handle);
    const s = (failure.details?.[0] as PlannedFailoverResult).sessions[0]!;
    assert.equal(s.outcome, 'forcedFailover');
    assert.match(s.dataLoss ?? '', /not replicated and are lost/);
    assert.equal((await replicaState('halt-force')).state, 'Failover');
    const replica = await o.lab.port.getReplica({ host: DR, replica: replicaNameOf('halt-force') });
    assert.equal(replica.powerState, 'Running');
    assert.equal(replica.headPointId, s.helperPoints[0]);
  });
});
