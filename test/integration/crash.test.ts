// Crash tests: the orchestrator's workers run in a child process (test/worker-process.ts) that is killed with
// SIGKILL while work is in flight, then started again. The work must complete exactly once, with exact data.
//
// One kill hits seven sessions at once, each held at a different point, so that the test pays the retry delays
// (copy heartbeat timeout 20 s, control activity start-to-close 45 s) once instead of once per step:
//   rep1       replication job run, in the middle of its copy (the server holds a heartbeat with resumeOffset > 0)
//   pf-sync    planned failover step 1, in the middle of the copy into helper point 1
//   pf-off     step 2, the guest shutdown call in flight
//   pf-final   step 3, in the middle of the final copy into helper point 2
//   pf-seal    step 3, sealing helper point 2 in flight
//   pf-verify  step 3, the zero-data-loss verification in flight
//   pf-on      step 5, the replica's power-on call in flight
//   pf-forced  step 2, the forced power-off in flight after its guest shutdown timed out
// The workers reach the lab through the test proxy of test/crash-harness.ts, which slows the copies down, holds the
// answers of calls in flight until the kill, and counts what the lab received: bytes per restore point and disk,
// and every power call with the lab's answer.
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import type { Client, WorkflowHandle } from '@temporalio/client';
import { defaultPayloadConverter } from '@temporalio/common';
import type { EstateInput } from '../../lab/estate';
import { replicaNameOf } from '../../src/activities/inventory';
import type { CopyProgress } from '../../src/activities/replication';
import { startPlannedFailover, startReplicationJob } from '../../src/client';
import {
  replicaQueries,
  replicaWorkflowId,
  SearchAttributes,
  WorkflowTypes,
  type PlannedFailoverResult,
  type ReplicationJobResult,
} from '../../src/contract';
import { BLOCK_SIZE } from '../../src/hypervisor/port';
import { isPower, startCrashSite, type CrashSite, type LabProxy } from '../crash-harness';
import { within } from '../harness';
import { assemble, blocksDiffering, DR, estateOf, MiB, PROD, type TestLab } from '../lab/helpers';

const DISKS = [
  { id: 'os', size: 2 * MiB },
  { id: 'data', size: 96 * MiB },
];
/** Blocks written on the data disk of the VMs whose copy is killed: three 32 MiB copy batches, the last short. */
const DELTA_BLOCKS = (80 * MiB) / BLOCK_SIZE;
const DELTA_BYTES = DELTA_BLOCKS * BLOCK_SIZE;

const REP = 'rep1';
const PF = {
  sync: 'pf-sync',
  off: 'pf-off',
  final: 'pf-final',
  seal: 'pf-seal',
  verify: 'pf-verify',
  on: 'pf-on',
} as const;
const PF_VMS = Object.values(PF);
/** Its guest takes longer to shut down than its request allows: the session powers it off hard. */
const FORCED = 'pf-forced';
/** The step each failover session shows when the worker dies. */
const STEP_AT_KILL: Record<string, string> = {
  [PF.sync]: 'Syncing',
  [PF.off]: 'PoweringOffSource',
  [PF.final]: 'FinalSync',
  // Helper point 2 is sealed only once verified: the seal runs while the session shows Verifying.
  [PF.seal]: 'Verifying',
  [PF.verify]: 'Verifying',
  [PF.on]: 'PoweringOnReplica',
};
/** The activity each session runs when the worker dies. */
const ACTIVITY_AT_KILL: Record<string, string> = {
  [REP]: 'copyDisk',
  [PF.sync]: 'copyDisk',
  [PF.off]: 'shutDownSource',
  [PF.final]: 'copyDisk',
  [PF.seal]: 'sealRestorePoint',
  [PF.verify]: 'verifyFinalSync',
  [PF.on]: 'powerOnVm',
};
const COPY_VMS = [REP, PF.sync, PF.final];
/** Held at their shutdown until the copies are far enough: the lab adapter gives a control call 30 s, so their
 * call held at the kill must start shortly before it. */
const LATE_VMS = [PF.seal, PF.verify, PF.on];
const ALL_VMS = [REP, ...PF_VMS, FORCED];

// The guests write only when told, so that every byte of every delta is known.
const estate: EstateInput = estateOf(ALL_VMS, DISKS, { writeRate: 0, shutdownMs: 200, bootMs: 200 });
for (const vm of estate.sites[0]!.hosts[0]!.vms!) if (vm.name === FORCED) vm.shutdownMs = 5_000;

interface CrashRun {
  pointsBefore: Map<string, string[]>;
  /** The heartbeat the server held for each slowed copy of the data disk when the worker died. */
  atKill: Map<string, CopyProgress>;
  job: ReplicationJobResult;
  failover: PlannedFailoverResult;
  forced: PlannedFailoverResult;
}

describe('a worker killed with SIGKILL mid-operation, then restarted', () => {
  let site: CrashSite;
  let lab: TestLab;
  let proxy: LabProxy;
  let client: Client;

  before(async () => {
    site = await startCrashSite(estate, ALL_VMS);
    ({ lab, proxy, client } = site);
    // Seed every replica, then give rep1 and pf-sync a large delta to copy.
    await Promise.all(
      ALL_VMS.map(async (vm) => {
        const result = await (await startReplicationJob(client, { job: `job-${vm}`, requestedBy: 'alice' })).result();
        assert.equal(result.sessions[0]?.outcome, 'replicated', `${vm}: ${result.sessions[0]?.detail}`);
      }),
    );
    for (const vm of [REP, PF.sync]) await dirty(vm);
  });

  after(() => site?.close());

  const deltaBlocks = Array.from({ length: DELTA_BLOCKS }, (_, i) => i);
  const dirty = async (vm: string): Promise<void> => {
    await lab.control.guestWrite(vm, 'data', deltaBlocks);
  };

  async function runningSession(vm: string, type: string): Promise<WorkflowHandle> {
    return within(`a running ${type} of ${vm}`, 30_000, async () => {
      for await (const wf of client.workflow.list({
        query: `FailoverVm="${vm}" AND WorkflowType="${type}" AND ExecutionStatus="Running"`,
      }))
        return client.workflow.getHandle(wf.workflowId);
      return undefined;
    });
  }

  /** The heartbeat the server holds for the session's copy of the data disk, when one is running. */
  async function dataDiskCopy(session: WorkflowHandle): Promise<CopyProgress | undefined> {
    const { raw } = await session.describe();
    for (const activity of raw.pendingActivities ?? []) {
      if (activity.activityType?.name !== 'copyDisk') continue;
      const payload = activity.heartbeatDetails?.payloads?.[0];
      if (!payload) continue;
      // A copy heartbeats before it has progress to report (while it lists the changed blocks).
      const progress = defaultPayloadConverter.fromPayload<CopyProgress | undefined>(payload);
      if (progress?.disk === 'data') return progress;
    }
    return undefined;
  }

  const pendingActivities = async (session: WorkflowHandle): Promise<string[]> =>
    ((await session.describe()).raw.pendingActivities ?? []).map((a) => a.activityType?.name ?? '?');

  const stepOf = async (session: WorkflowHandle): Promise<string | undefined> =>
    (await session.describe()).typedSearchAttributes.get(SearchAttributes.FailoverStep);

  async function sourceDisk(vm: string, disk: { id: string; size: number }): Promise<Buffer> {
    const checkpointId = `test-${randomUUID()}`;
    const ref = { host: PROD, vm };
    await lab.port.createCheckpoint(ref, checkpointId);
    try {
      return await assemble(
        lab.port.readExtents({ ...ref, disk: disk.id }, checkpointId, [{ offset: 0, length: disk.size }]),
        disk.size,
      );
    } finally {
      await lab.port.deleteCheckpoint(ref, checkpointId);
    }
  }

  const replicaDisk = (vm: string, disk: { id: string; size: number }, pointId: string): Promise<Buffer> =>
    assemble(
      lab.port.readReplicaExtents({ host: DR, replica: replicaNameOf(vm), disk: disk.id }, { pointId }, [
        { offset: 0, length: disk.size },
      ]),
      disk.size,
    );

  const pointIdsOf = async (vm: string): Promise<string[]> =>
    (await lab.port.listRestorePoints({ host: DR, replica: replicaNameOf(vm) })).map((p) => p.id);

  /** Starts a job run and a planned failover, holds every session at its point, kills the worker, restarts it. */
  async function crash(): Promise<CrashRun> {
    const started = Date.now();
    const pointsBefore = new Map(await Promise.all(ALL_VMS.map(async (vm) => [vm, await pointIdsOf(vm)] as const)));
    const replicaPath = (vm: string) => `/v1/hosts/${DR}/replicas/${replicaNameOf(vm)}`;
    // In flight at the kill: answers held by the proxy after the lab did the work.
    const inFlight = [
      proxy.gate('response', isPower(PROD, PF.off, 'shutdown')),
      proxy.gate(
        'response',
        (c) => c.path.startsWith(`${replicaPath(PF.seal)}/points/`) && c.path.endsWith('-helper2/seal'),
      ),
      proxy.gate('response', (c) => c.path === `${replicaPath(PF.verify)}/canary`),
      proxy.gate('response', isPower(DR, replicaNameOf(PF.on), 'on')),
      proxy.gate('response', isPower(PROD, FORCED, 'off')),
    ];
    // pf-final: the guest writes a large delta just before its shutdown, for the final sync to copy.
    const finalShutdown = proxy.gate('request', isPower(PROD, PF.final, 'shutdown'));
    const lateShutdowns = LATE_VMS.map((vm) => proxy.gate('response', isPower(PROD, vm, 'shutdown')));
    proxy.slowed = new Set(COPY_VMS.map(replicaNameOf));

    const jobHandle = await startReplicationJob(client, { job: `job-${REP}`, requestedBy: 'alice' });
    const failoverHandle = await startPlannedFailover(client, {
      vms: PF_VMS,
      reason: 'crash test',
      requestedBy: 'alice',
      options: { maxParallelJobs: PF_VMS.length },
    });
    const forcedHandle = await startPlannedFailover(client, {
      vms: [FORCED],
      reason: 'crash test: forced off',
      requestedBy: 'alice',
      options: { shutdownTimeoutSeconds: 1 },
    });
    await finalShutdown.arrived;
    await dirty(PF.final);
    finalShutdown.release();

    const sessions: Record<string, WorkflowHandle> = {
      [REP]: await runningSession(REP, WorkflowTypes.replicationSession),
    };
    for (const vm of PF_VMS) sessions[vm] = await runningSession(vm, WorkflowTypes.plannedFailoverSession);
    // The server must hold a heartbeat past the first batch: only then can a retry resume instead of restart.
    // Heartbeats reach it at most every 16 s (0.8 of the 20 s heartbeat timeout).
    const atKill = new Map<string, CopyProgress>();
    await within('heartbeats with resumeOffset > 0 from every slowed copy', 90_000, async () => {
      for (const vm of COPY_VMS) {
        const progress = await dataDiskCopy(sessions[vm]!);
        if (progress && progress.resumeOffset > 0) atKill.set(vm, progress);
      }
      return atKill.size === COPY_VMS.length ? true : undefined;
    });
    for (const gate of lateShutdowns) gate.release();
    for (const gate of inFlight) await gate.arrived;

    // Everything is where it should be: each failover session at its step with an activity running, and the
    // copies not finished.
    assert.deepEqual(
      Object.fromEntries(await Promise.all(PF_VMS.map(async (vm) => [vm, await stepOf(sessions[vm]!)] as const))),
      STEP_AT_KILL,
      'each failover session is at its step when the worker dies',
    );
    for (const [vm, activity] of Object.entries(ACTIVITY_AT_KILL))
      assert.ok((await pendingActivities(sessions[vm]!)).includes(activity), `${vm}: ${activity} is running`);
    for (const vm of COPY_VMS) {
      const progress = await dataDiskCopy(sessions[vm]!);
      assert.ok(progress && progress.bytesCopied < DELTA_BYTES, `${vm}: its copy is still running`);
    }
    await site.killWorker();
    const killedAt = Date.now();
    proxy.slowed = new Set();
    proxy.written.push(new Map<string, number>());
    await site.startWorker();

    const [job, failover, forced] = await Promise.all([
      jobHandle.result(),
      failoverHandle.result(),
      forcedHandle.result(),
    ]);
    console.log(
      `crash test: the worker was killed ${((killedAt - started) / 1000).toFixed(1)} s after the start; ` +
        `everything was done ${((Date.now() - killedAt) / 1000).toFixed(1)} s after the kill`,
    );
    return { pointsBefore, atKill, job, failover, forced };
  }

  let run: Promise<CrashRun> | undefined;
  const crashRun = (): Promise<CrashRun> => (run ??= crash());

  /** The restarted worker sent the lab less than a whole delta, but all that lay past resumeOffset. */
  function assertResumed(r: CrashRun, vm: string, pointId: string): void {
    const key = `${replicaNameOf(vm)}/${pointId}/data`;
    const [before, again] = proxy.written.map((w) => w.get(key) ?? 0) as [number, number];
    const { resumeOffset } = r.atKill.get(vm)!;
    assert.ok(before >= resumeOffset, `${vm}: ${before} bytes had reached the lab before the kill`);
    assert.ok(
      again < DELTA_BYTES,
      `${vm}: resumed, not restarted: the restarted worker sent ${again} bytes, the delta is ${DELTA_BYTES}`,
    );
    assert.ok(again >= DELTA_BYTES - resumeOffset, `${vm}: everything past offset ${resumeOffset} was sent again`);
  }

  it(
    'a replication copy killed mid-way resumes from its heartbeat; the restore point is exact and made once',
    { timeout: 300_000 },
    async () => {
      const r = await crashRun();
      const session = r.job.sessions[0]!;
      assert.equal(session.outcome, 'replicated', session.detail);
      const point = session.restorePoint!.id;
      assertResumed(r, REP, point);
      assert.equal(session.copy?.modes.data, 'tracked');
      assert.equal(session.copy?.bytesCopied, DELTA_BYTES + BLOCK_SIZE, 'the data delta and the canary block');
      // The guest has not written since: the new point is the source, byte for byte.
      for (const disk of DISKS) {
        assert.ok(
          (await replicaDisk(REP, disk, point)).equals(await sourceDisk(REP, disk)),
          `${REP}/${disk.id}: the restore point equals the source`,
        );
      }
      assert.deepEqual(await pointIdsOf(REP), [...r.pointsBefore.get(REP)!, point], 'one new restore point');
      const state = await client.workflow.getHandle(replicaWorkflowId(REP)).query(replicaQueries.state);
      assert.equal(state.state, 'Ready');
      assert.deepEqual(
        state.restorePoints.map((p) => p.id),
        [...r.pointsBefore.get(REP)!, point],
      );
    },
  );

  it(
    'a source forced off before the worker died is reported forced off, not shut down',
    { timeout: 300_000 },
    async () => {
      const r = await crashRun();
      const session = r.forced.sessions[0]!;
      assert.equal(session.outcome, 'failedOver', session.detail);
      assert.equal(session.sourceShutdown, 'forced-off', 'the retried shutdown found it off and asked the host how');
      assert.equal((await lab.port.getVm({ host: PROD, vm: FORCED })).lastStop, 'forced-off');
      const offs = proxy.powerCalls.filter((c) => c.vm === FORCED && c.action === 'off' && c.status === 200);
      assert.equal(offs.filter((c) => !c.answer.alreadyInState).length, 1, 'powered off hard once');
    },
  );

  it(
    'a planned failover killed at each step completes exactly once, with exact data and one power operation each',
    { timeout: 300_000 },
    async () => {
      const r = await crashRun();
      assert.deepEqual(
        r.failover.sessions.map((s) => [s.vm, s.outcome]),
        PF_VMS.map((vm) => [vm, 'failedOver']),
      );
      const byVm = (vm: string) => r.failover.sessions.find((s) => s.vm === vm)!;
      // The copies killed mid-way resumed.
      assertResumed(r, PF.sync, byVm(PF.sync).helperPoints[0]!);
      assertResumed(r, PF.final, byVm(PF.final).helperPoints[1]!);
      assert.equal(byVm(PF.sync).bytesBeforePowerOff, DELTA_BYTES + BLOCK_SIZE, 'pf-sync: the delta and the canary');
      assert.equal(byVm(PF.final).bytesAfterPowerOff, DELTA_BYTES + BLOCK_SIZE, 'pf-final: the delta and the canary');

      for (const session of r.failover.sessions) {
        const vm = session.vm;
        assert.equal(session.verification?.identical, true, `${vm} verified`);
        assert.equal(session.helperPoints.length, 2, `${vm}: two helper points`);
        const [helper1, helper2] = session.helperPoints as [string, string];
        // Exactly the two helper points were added, each once, on the DR host and in the replica's entity.
        const expected = [...r.pointsBefore.get(vm)!, helper1, helper2];
        assert.deepEqual(await pointIdsOf(vm), expected, `${vm}: restore points on the DR host`);
        const state = await client.workflow.getHandle(replicaWorkflowId(vm)).query(replicaQueries.state);
        assert.equal(state.state, 'Failover', `${vm}: replica state`);
        assert.deepEqual(
          state.restorePoints.map((p) => p.id),
          expected,
          `${vm}: restore points in replica/${vm}`,
        );
        assert.equal((await lab.port.getVm({ host: PROD, vm })).powerState, 'Off', `${vm}: source off`);
        const replica = await lab.port.getReplica({ host: DR, replica: replicaNameOf(vm) });
        assert.equal(replica.powerState, 'Running', `${vm}: replica running`);
        // Helper point 2 is the powered-off source, byte for byte; helper point 1 lacks only what the guest
        // wrote after it (pf-final's delta; the canary block is on the other disk).
        for (const disk of DISKS) {
          const source = await sourceDisk(vm, disk);
          assert.ok((await replicaDisk(vm, disk, helper2)).equals(source), `${vm}/${disk.id} at helper point 2`);
          if (disk.id === 'data') {
            const differing = blocksDiffering(await replicaDisk(vm, disk, helper1), source);
            assert.deepEqual(differing, vm === PF.final ? deltaBlocks : [], `${vm}/data at helper point 1`);
          }
        }
      }

      // No repeated power operation: each source was shut down by one call that took effect and never powered
      // on or off otherwise; each replica booted once. A call retried after the kill found the work done.
      for (const vm of PF_VMS) {
        const calls = proxy.powerCalls.filter((c) => c.host === PROD && c.vm === vm);
        assert.ok(
          calls.every((c) => c.action === 'shutdown' && c.status === 200),
          `${vm}: guest shutdowns only: ${JSON.stringify(calls)}`,
        );
        assert.equal(calls.filter((c) => c.answer.outcome !== 'already-off').length, 1, `${vm}: shut down once`);
        const boots = proxy.powerCalls.filter((c) => c.host === DR && c.vm === replicaNameOf(vm));
        assert.ok(
          boots.every((c) => c.action === 'on' && c.status === 200),
          `${vm}: power-on of the replica only: ${JSON.stringify(boots)}`,
        );
        assert.equal(boots.filter((c) => !c.answer.alreadyInState).length, 1, `${vm}: the replica booted once`);
      }
      assert.equal(proxy.powerCalls.filter((c) => c.vm === PF.off).length, 2, 'pf-off: the shutdown was retried');
      assert.equal(
        proxy.powerCalls.filter((c) => c.vm === replicaNameOf(PF.on)).length,
        2,
        'pf-on: the power-on was retried',
      );
    },
  );
});
