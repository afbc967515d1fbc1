// The critical window of a planned failover (source off, replica not yet on) as one protected region: a failure,
// timeout or cancellation at any step ends in Halted with the reason, never in a failed session with both VMs
// off; every decision works from every halt point, its update returns, and replication works afterwards.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import type { WorkflowHandle } from '@temporalio/client';
import { replicaNameOf } from '../../src/activities/inventory';
import { startReplicationJob } from '../../src/client';
import {
  FailureTypes,
  haltedSessionUpdates,
  PROXY_REGISTRY_WORKFLOW_ID,
  proxyQueries,
  replicaWorkflowId,
  SearchAttributes,
  type OperatorRequest,
  type PlannedFailoverSessionResult,
} from '../../src/contract';
import type { LabFault } from '../../src/hypervisor/host-api-adapter';
import {
  entityState,
  haltOf,
  powerOf,
  replicaImage,
  replicaOnHost,
  resultOfFailed,
  sameImages,
  sessionAt,
  sourceImage,
  startFailover,
  type Disk,
} from '../failover-helpers';
import {
  operationByCli,
  settlesWithin,
  startOrchestrator,
  testConfiguration,
  within,
  type TestOrchestrator,
} from '../harness';
import { DR, estateOf, MiB, PROD } from '../lab/helpers';

const DISKS: Disk[] = [
  { id: 'os', size: 4 * MiB },
  { id: 'data', size: 2 * MiB },
];

const VM = {
  abortDrDown: 'cw-abort-dr',
  verifyRetry: 'cw-verify-retry',
  verifyAbort: 'cw-verify-abort',
  verifyForce: 'cw-verify-force',
  powerOnRetry: 'cw-power-retry',
  powerOnAbort: 'cw-power-abort',
  cancelled: 'cw-cancel',
  noProxy: 'cw-noproxy',
  stale: 'cw-stale',
  forceAgain: 'cw-force-again',
  corrupt: 'cw-corrupt',
  powerOffFails: 'cw-poweroff',
  checkpointFails: 'cw-checkpoint',
  sealFails: 'cw-seal',
  switchFails: 'cw-switch',
  sourceOn: 'cw-source-on',
} as const;
const VMS = Object.values(VM);

/** Guests keep writing, except where a test needs known content; the cancelled VM's guest shuts down slowly. */
const estate = () => {
  const e = estateOf(VMS, DISKS, { writeRate: 30, hotSetFraction: 0.2, shutdownMs: 200, bootMs: 200 });
  for (const vm of e.sites[0]!.hosts[0]!.vms!) {
    if (vm.name === VM.cancelled) vm.shutdownMs = 3000;
    if (vm.name === VM.corrupt) vm.writeRate = 0;
  }
  return e;
};

const alice = (reason: string): [OperatorRequest] => [{ requestedBy: 'alice', reason }];

describe('the critical window halts on every failure and every decision works from every halt', () => {
  let o: TestOrchestrator;
  let proxyWorker: { stop(): Promise<void> } | undefined;

  before(async () => {
    o = await startOrchestrator({
      estate: estate(),
      configure: (url) =>
        testConfiguration(url, {
          proxies: [
            { name: 'proxy-a', slots: 8 },
            { name: 'proxy-n', slots: 2 },
          ],
          jobs: VMS.map((vm) => ({
            name: `job-${vm}`,
            vms: [vm],
            targetHost: DR,
            ...(vm === VM.noProxy ? { proxies: ['proxy-n'] } : {}),
          })),
        }),
      // proxy-n's worker runs apart, so that a test can take it down alone.
      roles: { orchestration: true, proxies: ['proxy-a'] },
    });
    proxyWorker = await o.startWorkersFor({ orchestration: false, proxies: ['proxy-n'] });
    await Promise.all(
      VMS.map(async (vm) => {
        const run = await (await startReplicationJob(o.client, { job: `job-${vm}`, requestedBy: 'alice' })).result();
        assert.equal(run.sessions[0]!.outcome, 'replicated', `${vm}: ${run.sessions[0]!.detail}`);
      }),
    );
  });

  after(() => o?.close());

  const replicaPath = (vm: string) => `/v1/hosts/${DR}/replicas/${replicaNameOf(vm)}`;
  /** Fails only the copy into helper point 2: the session halts at its final copy, whatever the timing. */
  const helper2Writes = (vm: string): LabFault => ({
    kind: 'fail',
    path: `^${replicaPath(vm)}/points/[^/]*-helper2/disks/[^/]+/write$`,
  });
  /** Fails only the reads of the zero-data-loss verification inside the window. */
  const verificationReads = (vm: string): LabFault => ({
    kind: 'fail',
    path: `^${replicaPath(vm)}/(disks/[^/]+/digests|canary)$`,
  });
  /** Fails only the power calls of the replica. */
  const replicaPower = (vm: string): LabFault => ({
    kind: 'fail',
    path: `^/v1/hosts/${DR}/vms/${replicaNameOf(vm)}/power$`,
  });

  /** A planned failover of `vm` halted by `fault`, set before it starts and left in place. */
  async function halted(vm: string, fault: LabFault) {
    await o.lab.control.setFault(DR, fault);
    const handle = await startFailover(o.client, { vms: [vm], reason: 'critical window', requestedBy: 'alice' });
    const session = await sessionAt(o.client, vm, 'Halted');
    return { handle, session, halt: await haltOf(session) };
  }

  const sessionResult = (session: WorkflowHandle) => session.result() as Promise<PlannedFailoverSessionResult>;
  /** The outcome of the only VM of a planned failover that completed. */
  const onlySessionOf = async (handle: WorkflowHandle) =>
    ((await handle.result()) as { sessions: PlannedFailoverSessionResult[] }).sessions[0]!;

  /** The next job run replicates, incrementally, and the replica's new point equals the source at that run. */
  async function replicatesNormally(vm: string, modes = ['tracked', 'tracked']): Promise<void> {
    const run = (await (await startReplicationJob(o.client, { job: `job-${vm}`, requestedBy: 'alice' })).result())
      .sessions[0]!;
    assert.equal(run.outcome, 'replicated', `${vm}: ${run.detail}`);
    assert.deepEqual(Object.values(run.copy!.modes), modes, `${vm}: the job run after the decision is incremental`);
    const info = await replicaOnHost(o.lab, vm);
    assert.equal(info.headPointId, run.restorePoint!.id, `${vm}: the new point is the head`);
    assert.ok(
      info.points.every((p) => p.sealed),
      `${vm}: nothing unverified stays open: ${info.points.map((p) => `${p.id}${p.sealed ? '' : ' (open)'}`).join(', ')}`,
    );
  }

  it('abort powers production back on while the DR host is unreachable, and puts the DR side back later', async () => {
    const vm = VM.abortDrDown;
    const { handle, session, halt } = await halted(vm, helper2Writes(vm));
    assert.equal(halt.step, 'copy');
    // A halt may last days: its proxy slots go back meanwhile.
    const registry = await o.client.workflow.getHandle(PROXY_REGISTRY_WORKFLOW_ID).query(proxyQueries.slots);
    const sessionId = session.workflowId.split('/').at(-1)!;
    assert.ok(
      registry.proxies.every((p) => !p.leasedTo.includes(sessionId)),
      JSON.stringify(registry),
    );
    await o.lab.control.clearFaults(DR);
    await o.lab.control.setFault(DR, { kind: 'unreachable' });
    const started = Date.now();
    const outcome = await session.executeUpdate(haltedSessionUpdates.abort, { args: alice('DR storage is down') });
    assert.match(outcome, /aborted by alice/);
    assert.equal(await powerOf(o.lab, vm), 'Running');
    assert.ok(Date.now() - started < 30_000, `abort took ${Date.now() - started} ms with the DR host away`);
    // The session stays until it has given the DR host back what it left there.
    const step = (await session.describe()).typedSearchAttributes.get(SearchAttributes.FailoverStep);
    assert.equal(step, 'Aborting');
    await o.lab.control.clearFaults(DR);
    const result = await sessionResult(session);
    assert.equal(result.outcome, 'aborted');
    assert.equal((await resultOfFailed(handle)).sessions[0]!.outcome, 'aborted');
    assert.equal((await entityState(o.client, vm)).state, 'Ready');
    const listed = (await replicaOnHost(o.lab, vm)).points.map((p) => p.id);
    assert.ok(listed.includes(result.helperPoints[0]!), 'helper point 1 is kept');
    assert.ok(!listed.some((id) => id.endsWith('-helper2')), 'the unverified helper point 2 is dropped');
    await replicatesNormally(vm);
  });

  it('retry after a failed verification completes the failover with zero data loss', async () => {
    const vm = VM.verifyRetry;
    const { handle, session, halt } = await halted(vm, verificationReads(vm));
    assert.equal(halt.step, 'verify');
    await o.lab.control.clearFaults(DR);
    assert.match(
      await session.executeUpdate(haltedSessionUpdates.retry, { args: alice('DR back') }),
      /retrying from checkpoint/,
    );
    const s = await onlySessionOf(handle);
    assert.equal(s.outcome, 'failedOver');
    assert.equal(s.verification?.identical, true);
    assert.equal(s.fullVerification?.identical, true, JSON.stringify(s.fullVerification));
    assert.ok(
      sameImages(
        await replicaImage(o.lab, vm, DISKS, { pointId: s.helperPoints[1]! }),
        await sourceImage(o.lab, vm, DISKS),
      ),
    );
    assert.deepEqual(
      s.halts.map((h) => [h.step, h.decision, h.decidedBy]),
      [['verify', 'retry', 'alice']],
    );
  });

  it('abort after a failed verification drops the unverified point, and the next job run replicates', async () => {
    const vm = VM.verifyAbort;
    const { session } = await halted(vm, verificationReads(vm));
    await o.lab.control.clearFaults(DR);
    assert.match(await session.executeUpdate(haltedSessionUpdates.abort, { args: alice('not today') }), /aborted/);
    assert.equal((await sessionResult(session)).outcome, 'aborted');
    assert.equal(await powerOf(o.lab, vm), 'Running');
    await replicatesNormally(vm);
  });

  it('forceFailover before the seal moves to helper point 1 and records the loss; undo and replication work after', async () => {
    const vm = VM.verifyForce;
    const { session } = await halted(vm, verificationReads(vm));
    await o.lab.control.clearFaults(DR);
    const outcome = await session.executeUpdate(haltedSessionUpdates.forceFailover, { args: alice('site burning') });
    assert.match(outcome, /forced failover to helper restore point 1 by alice/);
    const s = await sessionResult(session);
    assert.equal(s.outcome, 'forcedFailover');
    assert.match(s.dataLoss ?? '', /not replicated and are lost/);
    const info = await replicaOnHost(o.lab, vm);
    assert.equal(info.powerState, 'Running');
    assert.equal(info.headPointId, s.helperPoints[0]);
    assert.ok(!info.points.some((p) => p.id.endsWith('-helper2')), 'the unverified helper point 2 is dropped');
    assert.deepEqual(
      o.lab.lab.site.vms.get(vm)!.meta.checkpoints.map((c) => c.id),
      [],
      'no checkpoint is left on the source to keep growing its copy-on-write data',
    );
    // Undo goes back to helper point 1, never to an unverified point; the next run copies what was lost.
    await operationByCli(o.namespace, 'update', vm, 'undoFailover', { requestedBy: 'alice', reason: 'undo the force' });
    assert.equal((await replicaOnHost(o.lab, vm)).headPointId, s.helperPoints[0]);
    await replicatesNormally(vm);
  });

  it('a replica that cannot be powered on halts the session; retry boots it', async () => {
    const vm = VM.powerOnRetry;
    const { handle, session, halt } = await halted(vm, replicaPower(vm));
    assert.equal(halt.step, 'powerOn');
    assert.equal(await powerOf(o.lab, vm), 'Off', 'the source is off: the workload is down, the session says so');
    assert.equal((await entityState(o.client, vm)).state, 'Failover');
    await o.lab.control.clearFaults(DR);
    assert.match(
      await session.executeUpdate(haltedSessionUpdates.retry, { args: alice('power back') }),
      /retrying from powerOn/,
    );
    const s = await onlySessionOf(handle);
    assert.equal(s.outcome, 'failedOver');
    assert.equal((await replicaOnHost(o.lab, vm)).powerState, 'Running');
    assert.ok(s.downtime!.haltedMs > 0, 'the downtime counts the halt');
  });

  it('abort after helper point 2 was sealed keeps it, powers the source on, and replication goes on incrementally', async () => {
    const vm = VM.powerOnAbort;
    const { session } = await halted(vm, replicaPower(vm));
    // The replica's power calls still fail: abort cannot confirm it off, and powers production on anyway.
    const outcome = await session.executeUpdate(haltedSessionUpdates.abort, { args: alice('back to production') });
    assert.match(outcome, /runs again.*could not be confirmed off/);
    assert.equal(await powerOf(o.lab, vm), 'Running');
    await o.lab.control.clearFaults(DR);
    const s = await sessionResult(session);
    assert.equal(s.outcome, 'aborted');
    assert.equal((await entityState(o.client, vm)).state, 'Ready');
    const info = await replicaOnHost(o.lab, vm);
    assert.equal(info.powerState, 'Off');
    assert.equal(info.headPointId, s.helperPoints[1], 'the verified helper point 2 stays the head');
    await replicatesNormally(vm);
  });

  it('a cancellation inside the window halts it for an operator; abort then brings the source back', async () => {
    const vm = VM.cancelled;
    const handle = await startFailover(o.client, { vms: [vm], reason: 'cancel me', requestedBy: 'alice' });
    const session = await sessionAt(o.client, vm, 'PoweringOffSource');
    await handle.cancel(); // the parent, as the Web UI or a script would
    const halt = await haltOf(session);
    assert.match(halt.reason, /cancellation was requested/);
    assert.equal(await powerOf(o.lab, vm), 'Off', 'the shutdown was not cut off half-way');
    await session.executeUpdate(haltedSessionUpdates.abort, { args: alice('cancelled on purpose') });
    assert.equal((await sessionResult(session)).outcome, 'aborted');
    assert.equal(await powerOf(o.lab, vm), 'Running');
    await replicatesNormally(vm);
  });

  it('a copy that no proxy worker picks up halts the session within a minute; retry finishes once it is back', async () => {
    const vm = VM.noProxy;
    const handle = await startFailover(o.client, { vms: [vm], reason: 'proxy down', requestedBy: 'alice' });
    await sessionAt(o.client, vm, 'PoweringOffSource');
    await proxyWorker!.stop();
    const session = await sessionAt(o.client, vm, 'Halted', 90_000);
    const halt = await haltOf(session);
    assert.equal(halt.step, 'copy');
    assert.match(halt.reason, /schedule.?to.?start|ScheduleToStart|not picked up|timed out/i);
    proxyWorker = await o.startWorkersFor({ orchestration: false, proxies: ['proxy-n'] });
    await session.executeUpdate(haltedSessionUpdates.retry, { args: alice('proxy back') });
    const s = await onlySessionOf(handle);
    assert.equal(s.outcome, 'failedOver');
    assert.equal(s.fullVerification?.identical, true);
  });

  it('a decision applies to the halt it was sent for: of two sent together one is taken, the other refused', async () => {
    const vm = VM.stale;
    const { session } = await halted(vm, helper2Writes(vm));
    // A viewer may not decide: refused as an access refusal, not as a wrong state.
    const viewer = await session
      .executeUpdate(haltedSessionUpdates.retry, { args: [{ requestedBy: 'erin', reason: 'me too' }] })
      .then(
        () => assert.fail('a viewer decided'),
        (e: { cause?: { type?: string; message?: string } }) => e.cause,
      );
    assert.equal(viewer?.type, FailureTypes.accessDenied);
    assert.match(viewer?.message ?? '', /user 'erin' holds BackupViewer/);
    // A bad payload names the field and is final.
    const bad = await session
      .executeUpdate(haltedSessionUpdates.retry, { args: [{ requestedBy: 'alice' }] as never })
      .then(
        () => assert.fail('a request without a reason was taken'),
        (e: { cause?: { type?: string; message?: string; nonRetryable?: boolean } }) => e.cause,
      );
    assert.equal(bad?.type, FailureTypes.invalidInput);
    assert.match(bad?.message ?? '', /reason: is required/);

    const [retry, abort] = await Promise.allSettled([
      session.executeUpdate(haltedSessionUpdates.retry, { args: alice('try again') }),
      session.executeUpdate(haltedSessionUpdates.abort, { args: alice('give up') }),
    ]);
    const taken = [retry, abort].filter((r) => r.status === 'fulfilled');
    const refused = [retry, abort].filter((r) => r.status === 'rejected');
    assert.equal(taken.length, 1, 'exactly one decision is taken');
    const stale = (refused[0] as PromiseRejectedResult).reason as { cause?: { message?: string } };
    assert.match(String(stale.cause?.message), /was already decided/);
    if (retry.status === 'fulfilled') {
      // The retry meets the same fault and halts again (#2): decide that one.
      const second = await haltOf(session);
      assert.equal(second.id, 2);
      await o.lab.control.clearFaults(DR);
      await session.executeUpdate(haltedSessionUpdates.abort, { args: alice('give up') });
    }
    await o.lab.control.clearFaults(DR);
    assert.equal((await sessionResult(session)).outcome, 'aborted');
    assert.equal(await powerOf(o.lab, vm), 'Running');
  });

  it('every decision update returns: a forced failover that halts again says so', async () => {
    const vm = VM.forceAgain;
    const { session } = await halted(vm, replicaPower(vm));
    // Forcing does not help while the replica cannot start: the update returns with the next halt.
    const outcome = await session.executeUpdate(haltedSessionUpdates.forceFailover, { args: alice('force it') });
    assert.match(outcome, /halted again at powerOn/);
    assert.equal((await haltOf(session)).id, 2);
    await o.lab.control.clearFaults(DR);
    const done = await session.executeUpdate(haltedSessionUpdates.retry, { args: alice('power back') });
    assert.match(done, /retrying from powerOn/);
    const s = await sessionResult(session);
    // helper point 2 was sealed before the power-on failed: forcing lost nothing.
    assert.equal(s.outcome, 'forcedFailover');
    assert.equal(s.dataLoss, undefined);
    assert.equal(s.fullVerification?.identical, true);
  });

  it('a source that cannot be shut down halts at power-off; abort leaves it running', async () => {
    const vm = VM.powerOffFails;
    await o.lab.control.setFault(PROD, { kind: 'fail', path: `^/v1/hosts/${PROD}/vms/${vm}/power$` });
    const handle = await startFailover(o.client, { vms: [vm], reason: 'power-off fails', requestedBy: 'alice' });
    const session = await sessionAt(o.client, vm, 'Halted');
    assert.equal((await haltOf(session)).step, 'powerOff');
    await o.lab.control.clearFaults(PROD);
    await session.executeUpdate(haltedSessionUpdates.abort, { args: alice('not now') });
    assert.equal((await resultOfFailed(handle)).sessions[0]!.outcome, 'aborted');
    assert.equal(await powerOf(o.lab, vm), 'Running');
    await replicatesNormally(vm);
  });

  it('a final checkpoint that fails halts; retry completes the failover', async () => {
    const vm = VM.checkpointFails;
    await o.lab.control.setFault(PROD, {
      kind: 'fail',
      path: `^/v1/hosts/${PROD}/vms/${vm}/checkpoints/ckpt-[^/]*-final$`,
    });
    const handle = await startFailover(o.client, { vms: [vm], reason: 'checkpoint fails', requestedBy: 'alice' });
    const session = await sessionAt(o.client, vm, 'Halted');
    assert.equal((await haltOf(session)).step, 'checkpoint');
    await o.lab.control.clearFaults(PROD);
    await session.executeUpdate(haltedSessionUpdates.retry, { args: alice('prod back') });
    const s = await onlySessionOf(handle);
    assert.equal(s.outcome, 'failedOver');
    assert.equal(s.fullVerification?.identical, true);
  });

  it('a seal that fails halts; force then moves to helper point 1, since the host shows helper point 2 unsealed', async () => {
    const vm = VM.sealFails;
    const { session, halt } = await halted(vm, {
      kind: 'fail',
      path: `^${replicaPath(vm)}/points/[^/]*-helper2/seal$`,
    });
    assert.equal(halt.step, 'seal');
    await o.lab.control.clearFaults(DR);
    assert.match(
      await session.executeUpdate(haltedSessionUpdates.forceFailover, { args: alice('seal broken') }),
      /forced failover to helper restore point 1/,
    );
    const s = await sessionResult(session);
    assert.equal(s.outcome, 'forcedFailover');
    assert.equal((await replicaOnHost(o.lab, vm)).headPointId, s.helperPoints[0]);
  });

  it('a retry takes the final checkpoint again only of a source still off: one powered on meanwhile halts again', async () => {
    const vm = VM.sourceOn;
    const { handle, session, halt } = await halted(vm, helper2Writes(vm));
    assert.equal(halt.step, 'copy');
    await o.lab.control.clearFaults(DR);
    // Someone powers the source on during the halt: copying it now would fail over a VM that runs on.
    await o.lab.port.powerOn({ host: PROD, vm });
    assert.match(
      await session.executeUpdate(haltedSessionUpdates.retry, { args: alice('copy again') }),
      /retrying from checkpoint/,
    );
    const second = await within('the second halt', 60_000, async () => {
      const h = await haltOf(session);
      return h.id === 2 ? h : undefined;
    });
    assert.equal(second.step, 'checkpoint');
    assert.match(second.reason, /is Running: the final checkpoint is taken of a powered-off source only/);
    await session.executeUpdate(haltedSessionUpdates.abort, { args: alice('it runs anyway') });
    assert.equal((await resultOfFailed(handle)).sessions[0]!.outcome, 'aborted');
    assert.equal(await powerOf(o.lab, vm), 'Running');
    await replicatesNormally(vm);
  });

  it('a switch that cannot reach the replica entity halts; once the entity is back, retry completes', async () => {
    const vm = VM.switchFails;
    // Halt at the copy, then take the entity away: the switch after the retried copy has nobody to tell.
    const { handle, session } = await halted(vm, helper2Writes(vm));
    await o.lab.control.clearFaults(DR);
    await o.client.workflow.getHandle(replicaWorkflowId(vm)).terminate('test: the entity is lost');
    await session.executeUpdate(haltedSessionUpdates.retry, { args: alice('copy again') });
    const second = await within('the halt at the switch', 60_000, async () => {
      const h = await haltOf(session);
      return h.id === 2 ? h : undefined;
    });
    assert.equal(second.step, 'switch');
    // A job run starts the entity again: it rebuilds, finds the halted session holding the replica, waits.
    const job = await startReplicationJob(o.client, { job: `job-${vm}`, requestedBy: 'alice' });
    await within('the new entity to adopt the session', 30_000, async () => {
      const view = await entityState(o.client, vm).catch(() => undefined);
      return view?.currentSession?.workflowId === session.workflowId && view.waitingSessions.length > 0
        ? true
        : undefined;
    });
    await session.executeUpdate(haltedSessionUpdates.retry, { args: alice('entity back') });
    const s = await onlySessionOf(handle);
    assert.equal(s.outcome, 'failedOver');
    assert.equal((await entityState(o.client, vm)).state, 'Failover');
    assert.equal(
      (await job.result()).sessions[0]!.outcome,
      'skipped',
      'the job run waited, then skipped the failed-over replica',
    );
  });

  it('the whole-disk comparison after power-on finds what the window check cannot, and shouts it', async () => {
    const vm = VM.corrupt;
    // A block of the seed point goes bad on the DR host; no change tracking will ever show it.
    const seed = (await replicaOnHost(o.lab, vm)).points[0]!.id;
    await o.lab.control.corruptBlock(replicaNameOf(vm), 'data', 7, { pointId: seed });
    const handle = await startFailover(o.client, { vms: [vm], reason: 'corrupt', requestedBy: 'alice' });
    const failure = await settlesWithin(
      'the failover to finish',
      60_000,
      handle.result().then(
        () => assert.fail('a failover with a corrupt replica succeeded'),
        (e: { cause?: { type?: string; message?: string; details?: unknown[] } }) => e.cause!,
      ),
    );
    assert.equal(failure.type, FailureTypes.zeroDataLossUnproven);
    assert.match(failure.message ?? '', /1 block\(s\) differ/);
    const s = (failure.details?.[0] as { sessions: PlannedFailoverSessionResult[] }).sessions[0]!;
    assert.equal(s.outcome, 'failedOver', 'the replica runs: the failover happened');
    assert.equal(s.verification?.identical, true, 'the window check passed: it compares the copied blocks only');
    assert.equal(s.fullVerification?.identical, false);
    assert.equal(s.fullVerification?.mismatchedBlocks, 1);
    const sessionHandle = o.client.workflow.getHandle(`session/${vm}/${s.sessionId}`);
    assert.equal(
      (await sessionHandle.describe()).typedSearchAttributes.get(SearchAttributes.FailoverStep),
      'VerificationMismatch',
    );
    const state = await entityState(o.client, vm);
    assert.equal(state.lastVerification?.identical, false);
    assert.equal(state.lastVerification?.sessionId, s.sessionId);
    assert.equal(await powerOf(o.lab, vm, PROD), 'Off');
  });
});
