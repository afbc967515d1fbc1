import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import { WorkflowFailedError } from '@temporalio/client';
import { ApplicationFailure } from '@temporalio/common';
import {
  FailureTypes,
  proxySignals,
  PROXY_REGISTRY_WORKFLOW_ID,
  replicaQueries,
  replicaWorkflowId,
  sessionWorkflowId,
  TASK_QUEUE,
  WorkflowTypes,
  type ReplicationJobResult,
} from '../../src/contract';
import { replicaNameOf } from '../../src/activities/inventory';
import { BLOCK_SIZE } from '../../src/hypervisor/port';
import { startOrchestrator, testConfiguration, type TestOrchestrator } from '../harness';
import { assemble, DR, PROD, smallEstate } from '../lab/helpers';

/** Disk sizes of the small test estate: vm1 has os and data; the other VMs a 2 MiB os disk. */
const SIZES: Record<string, Record<string, number>> = {
  vm1: { os: 4 * 1024 * 1024, data: 2 * 1024 * 1024 },
  vm2: { os: 2 * 1024 * 1024 },
  vm3: { os: 2 * 1024 * 1024 },
  vm4: { os: 2 * 1024 * 1024 },
};
const sizeOf = (vm: string, disk: string): number => SIZES[vm]![disk]!;

describe('replication jobs against a real server and lab, bytes compared', () => {
  let o: TestOrchestrator;

  before(async () => {
    o = await startOrchestrator({
      // Quiet guests: the test writes blocks itself between runs, so each restore point's content is known.
      estate: smallEstate({ writeRate: 0 }, [
        { name: 'vm2', writeRate: 0 },
        { name: 'vm3', writeRate: 0 },
        { name: 'vm4', writeRate: 0 },
      ]),
      configure: (url) =>
        testConfiguration(url, {
          jobs: [
            { name: 'keep2', vms: ['vm1'], targetHost: DR, restorePoints: 2 },
            { name: 'frombackup', vms: ['vm2'], targetHost: DR, dataSource: 'backup' },
            { name: 'pair', vms: ['vm3'], targetHost: DR, proxies: ['proxy-a'] },
            { name: 'onhost', vms: ['vm4'], targetHost: DR, proxies: ['proxy-h'] },
          ],
          proxies: [
            { name: 'proxy-a', slots: 4 },
            { name: 'proxy-h', slots: 2, transport: 'host-to-host' },
          ],
        }),
    });
  });

  after(() => o?.close());

  const runJob = (job: string, extra: Record<string, unknown> = {}): Promise<ReplicationJobResult> =>
    o.client.workflow.execute(WorkflowTypes.replicationJob, {
      taskQueue: TASK_QUEUE,
      workflowId: `job/${job}/${randomUUID()}`,
      args: [{ job, requestedBy: 'alice', ...extra }],
    });

  /** The source disk as it is now (guests are quiet): read through a checkpoint of the test's own. */
  async function sourceDisk(vm: string, disk: string): Promise<Buffer> {
    const checkpointId = `test-${randomUUID()}`;
    const ref = { host: PROD, vm };
    await o.lab.port.createCheckpoint(ref, checkpointId);
    try {
      const size = sizeOf(vm, disk);
      return await assemble(
        o.lab.port.readExtents({ ...ref, disk }, checkpointId, [{ offset: 0, length: size }]),
        size,
      );
    } finally {
      await o.lab.port.deleteCheckpoint(ref, checkpointId);
    }
  }

  const replicaDisk = (vm: string, disk: string, pointId: string): Promise<Buffer> =>
    assemble(
      o.lab.port.readReplicaExtents({ host: DR, replica: replicaNameOf(vm), disk }, { pointId }, [
        { offset: 0, length: sizeOf(vm, disk) },
      ]),
      sizeOf(vm, disk),
    );

  /** Random blocks a guest may write: the last block of a disk is the lab's canary. */
  const randomBlocks = (vm: string, disk: string, n: number): number[] =>
    Array.from({ length: n }, () => Math.floor(Math.random() * (sizeOf(vm, disk) / BLOCK_SIZE - 2)));

  it('seeds, then copies only changes; each point equals its source; retention keeps the newest two, exact', async () => {
    const expected = new Map<string, { os: Buffer; data: Buffer }>();
    const copied: number[] = [];
    for (let run = 0; run < 4; run++) {
      if (run > 0) {
        await o.lab.control.guestWrite('vm1', 'os', randomBlocks('vm1', 'os', 5));
        await o.lab.control.guestWrite('vm1', 'data', randomBlocks('vm1', 'data', 3));
      } else {
        await o.lab.control.guestWrite('vm1', 'os', randomBlocks('vm1', 'os', 40));
      }
      const result = await runJob('keep2');
      const session = result.sessions[0]!;
      assert.equal(session.outcome, 'replicated', session.detail);
      const pointId = session.restorePoint!.id;
      expected.set(pointId, { os: await sourceDisk('vm1', 'os'), data: await sourceDisk('vm1', 'data') });
      assert.ok((await replicaDisk('vm1', 'os', pointId)).equals(expected.get(pointId)!.os), `os at ${pointId}`);
      assert.ok((await replicaDisk('vm1', 'data', pointId)).equals(expected.get(pointId)!.data), `data at ${pointId}`);
      copied.push(session.copy!.bytesCopied);
      assert.deepEqual(Object.values(session.copy!.modes), run === 0 ? ['full', 'full'] : ['tracked', 'tracked']);
    }
    // Incremental runs copy the few changed blocks, not the disk.
    // Incremental runs copy the few changed blocks (8 written, plus the canary), not the disk.
    for (const bytes of copied.slice(1)) assert.ok(bytes <= 10 * BLOCK_SIZE, `incremental run copied ${bytes} bytes`);

    const replica = await o.lab.port.getReplica({ host: DR, replica: replicaNameOf('vm1') });
    const kept = replica.points.filter((p) => p.sealed).map((p) => p.id);
    assert.deepEqual(kept, [...expected.keys()].slice(-2));
    for (const id of kept) {
      assert.ok((await replicaDisk('vm1', 'os', id)).equals(expected.get(id)!.os), `os at ${id} after merges`);
      assert.ok((await replicaDisk('vm1', 'data', id)).equals(expected.get(id)!.data), `data at ${id} after merges`);
    }

    const state = await o.client.workflow.getHandle(replicaWorkflowId('vm1')).query(replicaQueries.state);
    assert.equal(state.state, 'Ready');
    assert.deepEqual(
      state.restorePoints.map((p) => p.id),
      kept,
    );
    assert.equal(state.currentSession, null);
  });

  it('replicates the newest backup point, not the live VM, for a backup-sourced job', async () => {
    await o.lab.control.guestWrite('vm2', 'os', randomBlocks('vm2', 'os', 10));
    await o.lab.control.takeBackup('vm2');
    const atBackup = await sourceDisk('vm2', 'os');
    await o.lab.control.guestWrite('vm2', 'os', randomBlocks('vm2', 'os', 10));
    const live = await sourceDisk('vm2', 'os');
    assert.ok(!live.equals(atBackup));

    const first = (await runJob('frombackup')).sessions[0]!;
    assert.equal(first.outcome, 'replicated', first.detail);
    assert.deepEqual(first.copy!.modes, { os: 'backup' });
    assert.ok((await replicaDisk('vm2', 'os', first.restorePoint!.id)).equals(atBackup));

    // No newer backup: nothing to do, and the run says so.
    const again = (await runJob('frombackup')).sessions[0]!;
    assert.equal(again.outcome, 'skipped');
    assert.match(again.detail, /no backup point is newer/);
  });

  it('a host-to-host proxy has the source host send the blocks to the DR host; every point is exact', async () => {
    for (const [run, blocks] of [
      ['seed', 20],
      ['incremental', 4],
    ] as const) {
      await o.lab.control.guestWrite('vm4', 'os', randomBlocks('vm4', 'os', blocks));
      const session = (await runJob('onhost')).sessions[0]!;
      assert.equal(session.outcome, 'replicated', session.detail);
      assert.deepEqual(session.copy!.transports, { os: 'host-to-host' }, run);
      assert.deepEqual(session.copy!.modes, { os: run === 'seed' ? 'full' : 'tracked' });
      assert.ok((await replicaDisk('vm4', 'os', session.restorePoint!.id)).equals(await sourceDisk('vm4', 'os')), run);
    }
  });

  it('waits visibly for a proxy slot, proceeds when one frees, and fails clearly at the wait limit', async () => {
    await o.lab.control.guestWrite('vm3', 'os', randomBlocks('vm3', 'os', 4));
    const registry = o.client.workflow.getHandle(PROXY_REGISTRY_WORKFLOW_ID);
    await registry.signal(proxySignals.setProxyOnline, { proxy: 'proxy-a', online: false, requestedBy: 'alice' });

    const waiting = await o.client.workflow.start(WorkflowTypes.replicationJob, {
      taskQueue: TASK_QUEUE,
      workflowId: `job/pair/${randomUUID()}`,
      args: [{ job: 'pair', requestedBy: 'alice' }],
    });
    // The session shows that it waits for a proxy, in its search attributes.
    let found = false;
    for (let i = 0; i < 100 && !found; i++) {
      for await (const wf of o.client.workflow.list({ query: `FailoverVm="vm3" AND FailoverStep="WaitingForProxy"` })) {
        found = wf.status.name === 'RUNNING';
      }
      if (!found) await new Promise((r) => setTimeout(r, 200));
    }
    assert.ok(found, 'a session of vm3 should be listed with FailoverStep=WaitingForProxy');

    await registry.signal(proxySignals.setProxyOnline, { proxy: 'proxy-a', online: true, requestedBy: 'alice' });
    const result = (await waiting.result()) as ReplicationJobResult;
    assert.equal(result.sessions[0]!.outcome, 'replicated');

    await registry.signal(proxySignals.setProxyOnline, { proxy: 'proxy-a', online: false, requestedBy: 'alice' });
    const limited = await runJob('pair', { options: { proxyWaitTimeoutSeconds: 2 } });
    await registry.signal(proxySignals.setProxyOnline, { proxy: 'proxy-a', online: true, requestedBy: 'alice' });
    assert.equal(limited.sessions[0]!.outcome, 'failed');
    assert.match(limited.sessions[0]!.detail, /No proxy slot became free within 2 s/);
  });

  it('never lets two runs of one VM overlap: the later waits for the replica', async () => {
    await o.lab.control.guestWrite('vm3', 'os', randomBlocks('vm3', 'os', 4));
    const [a, b] = await Promise.all([runJob('pair'), runJob('pair')]);
    const intervals = [];
    for (const session of [a.sessions[0]!, b.sessions[0]!]) {
      assert.equal(session.outcome, 'replicated', session.detail);
      const history = await o.client.workflow.getHandle(sessionWorkflowId('vm3', session.sessionId)).fetchHistory();
      const events = history.events ?? [];
      const granted = events.find((e) => e.workflowExecutionSignaledEventAttributes?.signalName === 'sessionGranted');
      // The session's work on the replica ends with its last activity; the release is sent right after it.
      const closed = events.filter((e) => e.activityTaskCompletedEventAttributes).at(-1);
      assert.ok(granted?.eventTime && closed?.eventTime);
      const ms = (t: { seconds?: unknown; nanos?: number | null }) => Number(t.seconds) * 1000 + (t.nanos ?? 0) / 1e6;
      intervals.push({ from: ms(granted.eventTime), to: ms(closed.eventTime) });
    }
    intervals.sort((x, y) => x.from - y.from);
    assert.ok(intervals[0]!.to <= intervals[1]!.from, `sessions overlap: ${JSON.stringify(intervals)}`);
  });

  it('refuses a bad job request, naming the problem', async () => {
    const err: unknown = await o.client.workflow
      .execute(WorkflowTypes.replicationJob, {
        taskQueue: TASK_QUEUE,
        workflowId: `job/x/${randomUUID()}`,
        args: [{ job: 'nosuch', requestedBy: 'alice' }],
      })
      .then(
        () => undefined,
        (e: unknown) => e,
      );
    assert.ok(err instanceof WorkflowFailedError);
    // The job fails with the activity's failure, whose cause says what was wrong.
    const cause = err.cause?.cause;
    assert.ok(cause instanceof ApplicationFailure);
    assert.match(cause.message, /No replication job 'nosuch'/);
    assert.equal(cause.type, FailureTypes.configuration);
  });

  it('refuses a job run from an unknown user or one who may not replicate, before anything runs', async () => {
    for (const [user, why] of [
      ['zed', /requestedBy: unknown user 'zed'/],
      ['dave', /requestedBy: user 'dave' holds RestoreOperator; this needs Backup Administrator or Backup Operator/],
    ] as const) {
      const err: unknown = await o.client.workflow
        .execute(WorkflowTypes.replicationJob, {
          taskQueue: TASK_QUEUE,
          workflowId: `job/x/${randomUUID()}`,
          args: [{ job: 'seed', requestedBy: user }],
        })
        .then(
          () => undefined,
          (e: unknown) => e,
        );
      assert.ok(err instanceof WorkflowFailedError && err.cause instanceof ApplicationFailure, String(err));
      assert.equal(err.cause.type, FailureTypes.accessDenied);
      assert.match(err.cause.message, why);
      assert.equal(err.cause.nonRetryable, true);
    }
  });
});
