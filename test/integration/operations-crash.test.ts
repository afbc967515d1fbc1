// Crash test of the operations that finish a failover: six operations, each on a replica of its own, are sent
// through the real `temporal` command (three as signals, three as updates), each is held at a step where the
// lab has done the work but the worker has not heard back, and the worker dies with SIGKILL. A new worker must
// finish every operation exactly once: one operation workflow each, the right state, exact data, and no power
// operation, discard or merge that took effect twice.
//   op-undo     undoFailover       the discard of the replica's running layer
//   op-perm     permanentFailover  the merge of every restore point into the replica
//   op-back     failback           the first write to production's data disk (phase 1, replica running)
//   op-commit   commitFailback     the read of the replica that starts the operation
//   op-unback   undoFailback       the guest shutdown of production
//   op-pick     failover           the replica's power-on after the revert
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import type { Client } from '@temporalio/client';
import type { EstateInput } from '../../lab/estate';
import { replicaNameOf } from '../../src/activities/inventory';
import { startPlannedFailover, startReplicationJob } from '../../src/client';
import {
  operationUpdates,
  replicaQueries,
  replicaWorkflowId,
  WorkflowTypes,
  type OperationName,
  type ReplicaView as ReplicaEntityView,
} from '../../src/contract';
import type { ReplicaView } from '../../src/hypervisor/port';
import { isPower, startCrashSite, type CrashSite, type Gate, type LabProxy } from '../crash-harness';
import { operationByCli, operationFinished, within } from '../harness';
import { replicaImage as replicaImageOf, sameImages, sourceImage } from '../failover-helpers';
import { DR, estateOf, MiB, PROD, type TestLab } from '../lab/helpers';

const DISKS = [
  { id: 'os', size: 2 * MiB },
  { id: 'data', size: 8 * MiB },
];
/** The VM each operation runs on. */
const VM = {
  undoFailover: 'op-undo',
  permanentFailover: 'op-perm',
  failback: 'op-back',
  commitFailback: 'op-commit',
  undoFailback: 'op-unback',
  failover: 'op-pick',
} as const satisfies Record<OperationName, string>;
const OPERATIONS = Object.entries(VM) as [OperationName, string][];
const ALL_VMS = Object.values(VM);
/** Failed over before the test; op-pick stays Ready for a regular failover. */
const FAILED_OVER = ALL_VMS.filter((vm) => vm !== VM.failover);
/** Failed back before the test, to be committed or undone. */
const FAILED_BACK = [VM.commitFailback, VM.undoFailback];
const who = { requestedBy: 'alice', reason: 'crash test' };

// The guests write only when told, so that every image is known.
const estate: EstateInput = estateOf(ALL_VMS, DISKS, { writeRate: 0, shutdownMs: 200, bootMs: 200 });

describe('a worker killed with SIGKILL during each operation that finishes a failover', () => {
  let site: CrashSite;
  let lab: TestLab;
  let proxy: LabProxy;
  let client: Client;
  let namespace: string;

  const entity = (vm: string) => client.workflow.getHandle(replicaWorkflowId(vm));
  const state = (vm: string): Promise<ReplicaEntityView> => entity(vm).query(replicaQueries.state);
  const replicaRef = (vm: string) => ({ host: DR, replica: replicaNameOf(vm) });
  const replicaPath = (vm: string) => `/v1/hosts/${DR}/replicas/${replicaNameOf(vm)}`;

  /** The replica's disks as seen through `view`: its running state, or a restore point. */
  const replicaImage = (vm: string, view: ReplicaView) => replicaImageOf(lab, vm, DISKS, view);
  const productionImage = (vm: string) => sourceImage(lab, vm, DISKS);
  const sourcePower = async (vm: string) => (await lab.port.getVm({ host: PROD, vm })).powerState;

  /** Makes the replica's guest write these blocks of its data disk now. */
  const replicaWrites = (vm: string, blocks: number[]) => lab.control.guestWrite(replicaNameOf(vm), 'data', blocks);

  before(async () => {
    site = await startCrashSite(estate, ALL_VMS);
    ({ lab, proxy, client, namespace } = site);

    // Every replica seeded; five failed over, their replicas running and writing; two of those failed back.
    await Promise.all(
      ALL_VMS.map(async (vm) => {
        const result = await (await startReplicationJob(client, { job: `job-${vm}`, ...who })).result();
        assert.equal(result.sessions[0]?.outcome, 'replicated', `${vm}: ${result.sessions[0]?.detail}`);
      }),
    );
    const moved = await (
      await startPlannedFailover(client, { vms: FAILED_OVER, ...who, options: { maxParallelJobs: FAILED_OVER.length } })
    ).result();
    for (const s of moved.sessions) assert.equal(s.outcome, 'failedOver', `${s.vm}: ${s.detail}`);
    for (const vm of FAILED_OVER) await replicaWrites(vm, [3, 4, 5, 40, 41, 90]);
    await Promise.all(
      FAILED_BACK.map(async (vm) => {
        const outcome = await entity(vm).executeUpdate(operationUpdates.failback, { args: [who] });
        assert.equal(outcome.state, 'Failback', `${vm}: ${outcome.detail}`);
      }),
    );
  });

  after(() => site?.close());

  /** The operation workflows of this kind that ran for the VM, with their status. */
  async function operationRuns(vm: string, operation: OperationName): Promise<string[]> {
    const runs: string[] = [];
    for await (const wf of client.workflow.list({
      query: `WorkflowType="${WorkflowTypes.replicaOperation}" AND FailoverVm="${vm}"`,
    }))
      if (wf.workflowId.startsWith(`operation/${vm}/${operation}/`)) runs.push(wf.status.name);
    return runs;
  }

  it(
    'each operation completes exactly once, with exact data, after the worker is killed in the middle of it',
    { timeout: 400_000 },
    async () => {
      // What each replica and production VM hold before the operations.
      const [undoHelper2, pickPoint] = [
        (await state(VM.undoFailover)).restorePoints.at(-1)!,
        (await state(VM.failover)).restorePoints[0]!,
      ];
      assert.equal(undoHelper2.kind, 'planned-failover-helper');
      const undoBefore = await replicaImage(VM.undoFailover, { pointId: undoHelper2.id });
      const permanentBefore = await replicaImage(VM.permanentFailover, { running: true });
      const failbackBefore = await replicaImage(VM.failback, { running: true });
      const protective = new Map(
        await Promise.all(
          FAILED_BACK.map(
            async (vm) => [vm, (await state(vm)).restorePoints.find((p) => p.kind === 'failback-protective')!] as const,
          ),
        ),
      );
      const pickImage = await replicaImage(VM.failover, { pointId: pickPoint.id });
      const productionBefore = await productionImage(VM.failover);
      const callsBefore = proxy.calls.length;
      const powerBefore = proxy.powerCalls.length;

      // Each operation's call, held after the lab did the work, until the worker is dead.
      const gates: Record<string, Gate> = {
        [VM.undoFailover]: proxy.gate(
          'response',
          (c) => c.method === 'DELETE' && c.path === `${replicaPath(VM.undoFailover)}/running-layer`,
        ),
        [VM.permanentFailover]: proxy.gate(
          'response',
          (c) => c.path === `${replicaPath(VM.permanentFailover)}/consolidate`,
        ),
        [VM.failback]: proxy.gate(
          'response',
          (c) => c.path === `/v1/hosts/${PROD}/vms/${VM.failback}/disks/data/write`,
        ),
        [VM.commitFailback]: proxy.gate(
          'response',
          (c) => c.method === 'GET' && c.path === replicaPath(VM.commitFailback),
        ),
        // Production's guest is shut down, not cut off: it may have run since the failback.
        [VM.undoFailback]: proxy.gate('response', isPower(PROD, VM.undoFailback, 'shutdown')),
        [VM.failover]: proxy.gate('response', isPower(DR, replicaNameOf(VM.failover), 'on')),
      };

      const reason = (vm: string) => `crash test of ${vm}`;
      const as = (vm: string) => ({ requestedBy: 'alice', reason: reason(vm) });
      await operationByCli(namespace, 'signal', VM.undoFailover, 'undoFailover', as(VM.undoFailover));
      await operationByCli(namespace, 'signal', VM.failback, 'failback', {
        ...as(VM.failback),
        powerOnProduction: false,
      });
      await operationByCli(namespace, 'signal', VM.undoFailback, 'undoFailback', as(VM.undoFailback));
      const updates = {
        [VM.permanentFailover]: operationByCli(namespace, 'update', VM.permanentFailover, 'permanentFailover', {
          ...as(VM.permanentFailover),
          confirm: true,
        }),
        [VM.commitFailback]: operationByCli(
          namespace,
          'update',
          VM.commitFailback,
          'commitFailback',
          as(VM.commitFailback),
        ),
        [VM.failover]: operationByCli(namespace, 'update', VM.failover, 'failover', {
          ...as(VM.failover),
          restorePointId: pickPoint.id,
        }),
      };
      for (const update of Object.values(updates)) update.catch(() => undefined); // awaited below

      await within('every operation at its held call', 90_000, () =>
        Promise.resolve(Object.values(gates).every((gate) => gate.hits > 0) ? true : undefined),
      );
      await site.killWorker();
      const killedAt = Date.now();
      await site.startWorker();

      const outputs = Object.fromEntries(
        await Promise.all(Object.entries(updates).map(async ([vm, update]) => [vm, await update] as const)),
      );
      const views = Object.fromEntries(
        await Promise.all(
          OPERATIONS.map(
            async ([operation, vm]) =>
              [vm, await operationFinished(client, vm, operation, reason(vm), 150_000)] as const,
          ),
        ),
      );
      console.log(
        `operations crash test: everything was done ${((Date.now() - killedAt) / 1000).toFixed(1)} s after the kill`,
      );

      // One operation workflow each, completed; the held call was sent again by the new worker.
      for (const [operation, vm] of OPERATIONS) {
        assert.deepEqual(await operationRuns(vm, operation), ['COMPLETED'], `${vm}: one ${operation} workflow`);
        assert.match(
          views[vm]!.lastRun!.outcome,
          new RegExp(`^${operation}: `),
          `${vm}: ${views[vm]!.lastRun!.outcome}`,
        );
        assert.ok(gates[vm]!.hits >= 2, `${vm}: the held call was retried after the kill`);
      }
      assert.match(outputs[VM.permanentFailover]!, /PermanentFailover/);
      assert.match(outputs[VM.commitFailback]!, /failback committed/);
      assert.match(outputs[VM.failover]!, new RegExp(`replica running from ${pickPoint.id}`));

      const calls = proxy.calls.slice(callsBefore);
      const power = proxy.powerCalls.slice(powerBefore);
      const effective = (host: string, vm: string) =>
        power.filter(
          (c) =>
            c.host === host &&
            c.vm === vm &&
            c.status === 200 &&
            !c.answer.alreadyInState &&
            c.answer.outcome !== 'already-off',
        );

      // Undo: the replica is off without its running layer, its head point unchanged; the source runs again.
      const undo = await lab.port.getReplica(replicaRef(VM.undoFailover));
      assert.equal(views[VM.undoFailover]!.state, 'Ready');
      assert.equal(undo.powerState, 'Off');
      assert.equal(undo.hasRunningLayer, false);
      assert.equal(undo.headPointId, undoHelper2.id);
      assert.ok(
        sameImages(await replicaImage(VM.undoFailover, { running: true }), undoBefore),
        'op-undo: back at helper point 2',
      );
      assert.equal(await sourcePower(VM.undoFailover), 'Running');
      assert.deepEqual(
        effective(PROD, VM.undoFailover).map((c) => c.action),
        ['on'],
        'op-undo: the source powered on once',
      );

      // Permanent failover: every point merged, the replica running with exactly what it held before.
      const permanent = await lab.port.getReplica(replicaRef(VM.permanentFailover));
      assert.equal(views[VM.permanentFailover]!.state, 'PermanentFailover');
      assert.deepEqual(permanent.points, []);
      assert.equal(permanent.powerState, 'Running');
      assert.ok(
        sameImages(await replicaImage(VM.permanentFailover, { running: true }), permanentBefore),
        'op-perm: data kept',
      );
      assert.equal(calls.filter((c) => c.path === `${replicaPath(VM.permanentFailover)}/consolidate`).length, 2);

      // Failback: production equals the replica's protective point, which is what the replica ran with.
      const back = views[VM.failback]!;
      const backPoint = back.restorePoints.find((p) => p.kind === 'failback-protective');
      assert.equal(back.state, 'Failback');
      assert.ok(backPoint, 'op-back: a protective point');
      assert.equal(back.restorePoints.filter((p) => p.kind === 'failback-protective').length, 1);
      const failbackAfter = await replicaImage(VM.failback, { pointId: backPoint.id });
      assert.ok(sameImages(failbackAfter, failbackBefore), 'op-back: the protective point is the replica as it ran');
      assert.ok(sameImages(await productionImage(VM.failback), failbackAfter), 'op-back: production is exact');
      assert.equal(await sourcePower(VM.failback), 'Off', 'op-back: production left off, as asked');
      assert.equal(effective(DR, replicaNameOf(VM.failback)).length, 1, 'op-back: the replica powered off once');

      // Commit: Ready, the protective point kept.
      assert.equal(views[VM.commitFailback]!.state, 'Ready');
      assert.ok(views[VM.commitFailback]!.restorePoints.some((p) => p.id === protective.get(VM.commitFailback)!.id));

      // Undo failback: production off (once), the replica runs again from its protective point.
      const unback = await lab.port.getReplica(replicaRef(VM.undoFailback));
      assert.equal(views[VM.undoFailback]!.state, 'Failover');
      assert.equal(await sourcePower(VM.undoFailback), 'Off');
      assert.deepEqual(
        effective(PROD, VM.undoFailback).map((c) => c.action),
        ['shutdown'],
        'op-unback: production shut down once',
      );
      assert.equal(unback.powerState, 'Running');
      assert.equal(unback.headPointId, protective.get(VM.undoFailback)!.id);
      assert.deepEqual(
        effective(DR, replicaNameOf(VM.undoFailback)).map((c) => c.action),
        ['on'],
        'op-unback: the replica booted once',
      );

      // Regular failover: the replica runs from the chosen point, booted once; the source untouched.
      const pick = await lab.port.getReplica(replicaRef(VM.failover));
      assert.equal(views[VM.failover]!.state, 'Failover');
      assert.equal(pick.powerState, 'Running');
      assert.equal(pick.headPointId, pickPoint.id);
      assert.ok(
        sameImages(await replicaImage(VM.failover, { running: true }), pickImage),
        'op-pick: at the chosen point',
      );
      assert.deepEqual(
        effective(DR, replicaNameOf(VM.failover)).map((c) => c.action),
        ['on'],
        'op-pick: the replica booted once',
      );
      assert.deepEqual(effective(PROD, VM.failover), [], 'op-pick: no power call to the source');
      assert.ok(sameImages(await productionImage(VM.failover), productionBefore), 'op-pick: the source untouched');
    },
  );
});
