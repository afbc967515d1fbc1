// The critical window of a planned failover on real VMs, as test/integration/critical-window.test.ts has it on the
// lab: a writing guest's failover between two KVM hosts (two libvirt instances, each with our host process) halted
// at power-off, the final checkpoint, the copy and the replica's power-on by a real failure of a KVM host, with no
// fault injection: a host process or a libvirtd stopped, a file the source's definition names gone, the paused QEMU
// that serves the powered-off source's final view destroyed. Each decision is sent from some of them: retry, abort,
// forceFailover. (A verification, seal or switch that fails cannot be caused this way at a chosen moment: the lab's
// fault injection covers them.)
// Each case checks the outcome, what runs where, the data (qemu-img compare and the replica's canary where the
// outcome promises identity, the loss where it records one), and that the next job run replicates, tracked.
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { after, before, describe, test } from 'node:test';
import type { WorkflowHandle } from '@temporalio/client';
import { lastSeq, readGuestLines, waitForReady, waitForSeq } from '../../kvm/guest/guest';
import { replicaNameOf } from '../../src/activities/inventory';
import { startPlannedFailover } from '../../src/client';
import {
  haltedSessionUpdates,
  operationUpdates,
  replicaQueries,
  replicaWorkflowId,
  sessionQueries,
  type OperatorRequest,
  type PlannedFailoverSessionResult,
} from '../../src/contract';
import { haltOf } from '../failover-helpers';
import { within } from '../harness';
import {
  assertFailedOver,
  cleanStop,
  killOfflineViewDaemons,
  replicateJob,
  startKvmEstate,
  type KvmEstate,
} from './helpers';

const exec = promisify(execFile);

const PROD = 'kvm-cw-prod';
const DR = 'kvm-cw-dr';
const VM = 'pf-cw1';
const MINUTES_4 = 240_000;

describe('the critical window on real VMs: halts a KVM host causes, and each decision', () => {
  let estate: KvmEstate;
  const vm = { host: PROD, vm: VM };
  const replica = { host: DR, replica: replicaNameOf(VM) };
  const replicaDir = () => join(estate.dir, 'dr', 'state', 'replicas', replica.replica);
  const replicaConsole = () => join(replicaDir(), 'console.log');

  before(async () => {
    estate = await startKvmEstate({ prefix: 'pf-kvmcw-', prod: PROD, dr: DR, vm: VM, restorePoints: 3 });
    await estate.port.powerOn(vm);
    await estate.prod.seqAtLeast(5);
    await replicateJob(estate.o.client, 'kvm');
  });
  after(() => estate?.close());

  const client = () => estate.o.client;
  const alice = (reason: string): [OperatorRequest] => [{ requestedBy: 'alice', reason }];
  const domState = async (host: 'prod' | 'dr', domain: string) =>
    (await estate[host].libvirt.virsh.run(['domstate', domain])).trim();
  const entityState = async () =>
    (await client().workflow.getHandle(replicaWorkflowId(VM)).query(replicaQueries.state)).state;

  /** The session a planned failover started, from its history (visibility may lag behind a short step). */
  const sessionOf = (handle: WorkflowHandle) =>
    within('the session to start', 60_000, async () => {
      const events = (await handle.fetchHistory()).events ?? [];
      const child = events.find((e) => e.startChildWorkflowExecutionInitiatedEventAttributes)
        ?.startChildWorkflowExecutionInitiatedEventAttributes?.workflowId;
      return child ? client().workflow.getHandle(child) : undefined;
    });

  /**
   * A planned failover of the writing guest, halted: `fault` runs once the session shuts the source down (the
   * window has begun, helper point 2 is open) and stays until the case repairs it.
   */
  async function halted(fault: () => Promise<void>) {
    await estate.prod.seqAtLeast((lastSeq(await estate.prod.guestLines()) ?? 0) + 3);
    const consoleSince = (await readGuestLines(replicaConsole())).length;
    const handle = await startPlannedFailover(client(), { vms: [VM], requestedBy: 'alice', reason: 'kvm window' });
    const session = await sessionOf(handle);
    await within('the source’s shutdown', 60_000, async () =>
      (await session.query(sessionQueries.progress)).step === 'PoweringOffSource' ? true : undefined,
    );
    await fault();
    const halt = await haltOf(session, 120_000);
    const result = () => session.result() as Promise<PlannedFailoverSessionResult>;
    return { handle, session, halt, consoleSince, result };
  }

  /** Undo of the failover: the replica stops, the source runs again and writes. */
  async function undo(): Promise<void> {
    const since = (await estate.prod.guestLines()).length;
    await client()
      .workflow.getHandle(replicaWorkflowId(VM))
      .executeUpdate(operationUpdates.undoFailover, { args: alice('next case') });
    await estate.prod.readyAfter(since);
  }

  /** The next job run copies what changed since the last verified point, by change tracking, into a sealed head. */
  async function replicatesTracked(): Promise<void> {
    await estate.prod.seqAtLeast((lastSeq(await estate.prod.guestLines()) ?? 0) + 3);
    const run = (await replicateJob(client(), 'kvm')).sessions[0]!;
    assert.deepEqual(Object.values(run.copy!.modes), ['tracked'], 'the job run after the decision is tracked');
    const info = await estate.port.getReplica(replica);
    assert.equal(info.headPointId, run.restorePoint!.id);
    assert.ok(
      info.points.every((p) => p.sealed),
      info.points.map((p) => `${p.id}${p.sealed ? '' : ' (open)'}`).join(', '),
    );
  }

  /** What the replica holds after an abort: off, no running layer, `head` its head, no helper point 2 unless kept. */
  async function replicaReady(head: string): Promise<void> {
    const info = await estate.port.getReplica(replica);
    assert.equal(info.powerState, 'Off');
    assert.equal(info.hasRunningLayer, false);
    assert.equal(info.headPointId, head);
    assert.ok(info.points.every((p) => p.sealed));
    assert.equal(await entityState(), 'Ready');
  }

  test(
    'power-off: the production host process goes away during the shutdown; abort once it is back',
    { timeout: MINUTES_4 },
    async () => {
      const { session, halt, result } = await halted(() => estate.prod.host.stop());
      assert.equal(halt.step, 'powerOff', halt.reason);
      await estate.prod.restartHost();
      assert.match(
        await session.executeUpdate(haltedSessionUpdates.abort, { args: alice('production stays') }),
        /aborted by alice/,
      );
      const s = await result();
      assert.equal(s.outcome, 'aborted');
      assert.equal((await estate.port.getVm(vm)).powerState, 'Running');
      assert.equal(await domState('prod', VM), 'running');
      await replicaReady(s.helperPoints[0]!);
      const points = (await estate.port.listRestorePoints(replica)).map((p) => p.id);
      assert.ok(!points.includes(`rp-${s.sessionId}-helper2`), points.join(', '));
      await replicatesTracked();
    },
  );

  test(
    'checkpoint: another program holds the powered-off source’s disk; retry once it lets go',
    { timeout: MINUTES_4 },
    async () => {
      // An operator's qemu-nbd takes the image the moment the guest's QEMU lets go of it.
      const holder = join(estate.dir, 'holder.pid');
      const nbd = `qemu-nbd -r -t -f qcow2 -k ${join(estate.dir, 'holder.sock')} --fork --pid-file ${holder}`;
      const taking = spawn('bash', ['-c', `until ${nbd} ${estate.prod.image} 2>/dev/null; do sleep 0.01; done`]);
      const { handle, session, halt, consoleSince } = await halted(async () => undefined);
      assert.equal(halt.step, 'checkpoint', halt.reason);
      assert.match(halt.reason, /lock/);
      assert.equal(await domState('prod', VM), 'shut off');
      taking.kill();
      const pid = Number(readFileSync(holder, 'utf8').trim());
      process.kill(pid, 'SIGTERM');
      await within('the holder to let go', 10_000, async () => (existsSync(`/proc/${pid}`) ? undefined : true));
      assert.match(
        await session.executeUpdate(haltedSessionUpdates.retry, { args: alice('disk let go') }),
        /retrying from checkpoint/,
      );
      const s = (await handle.result()).sessions[0]!;
      await assertFailedOver(s, { prod: estate.prod, replicaDir: replicaDir(), consoleSince });
      assert.equal(await domState('dr', replica.replica), 'running');
      await undo();
      await replicatesTracked();
    },
  );

  test(
    'copy: the DR host process goes away; forceFailover boots the replica from helper point 1 and records the loss',
    { timeout: MINUTES_4 },
    async () => {
      const { session, halt, consoleSince, result } = await halted(() => estate.dr.host.stop());
      assert.equal(halt.step, 'copy', halt.reason);
      await estate.dr.restartHost();
      assert.match(
        await session.executeUpdate(haltedSessionUpdates.forceFailover, { args: alice('production is gone') }),
        /forced failover to helper restore point 1 by alice/,
      );
      const s = await result();
      assert.equal(s.outcome, 'forcedFailover');
      assert.match(s.dataLoss ?? '', /after helper restore point 1 were not replicated and are lost/);
      const [helper1] = s.helperPoints;
      const info = await estate.port.getReplica(replica);
      assert.equal(info.powerState, 'Running');
      assert.equal(info.headPointId, helper1);
      assert.equal(info.hasRunningLayer, true);
      assert.ok(
        !info.points.some((p) => p.id === `rp-${s.sessionId}-helper2`),
        'the unverified helper point 2 is gone',
      );
      assert.equal(await domState('dr', replica.replica), 'running');
      assert.equal(await domState('prod', VM), 'shut off');
      // The replica's guest goes on from helper point 1: what the source wrote after it is the recorded loss.
      const atHelper1 = (await estate.port.readReplicaCanary(replica, { pointId: helper1! })).sequence;
      const ready = await waitForReady(replicaConsole(), consoleSince, { timeoutMs: 60_000 });
      assert.equal(ready.resume, atHelper1);
      assert.ok(atHelper1 < cleanStop(await estate.prod.guestLines()), 'the source wrote after helper point 1');
      await waitForSeq(replicaConsole(), atHelper1 + 3, { since: consoleSince, timeoutMs: 60_000 });
      await undo();
      await replicatesTracked();
    },
  );

  test(
    'copy, then the final view’s exports die and the source’s disk is written: retry takes the view again, verified',
    { timeout: MINUTES_4 },
    async () => {
      const { handle, session, halt, consoleSince } = await halted(() => estate.dr.host.stop());
      assert.equal(halt.step, 'copy', halt.reason);
      // The powered-off source's final view is read offline; its export daemons die, and something writes to the
      // image meanwhile (the copy must not mix the two states).
      assert.equal(await domState('prod', VM), 'shut off');
      await killOfflineViewDaemons(estate.prod);
      const at = 900 * 65536;
      await exec('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x3c ${at} 65536`, estate.prod.image]);
      await estate.dr.restartHost();
      assert.match(
        await session.executeUpdate(haltedSessionUpdates.retry, { args: alice('DR back') }),
        /retrying from checkpoint/,
      );
      const s = (await handle.result()).sessions[0]!;
      await assertFailedOver(s, { prod: estate.prod, replicaDir: replicaDir(), consoleSince });
      assert.deepEqual(
        s.halts.map((h) => [h.step, h.decision]),
        [['copy', 'retry']],
      );
      await undo();
      await replicatesTracked();
    },
  );

  test(
    'power-on: the DR host’s libvirtd is down; abort keeps the verified helper point 2, and tracking goes on from it',
    { timeout: MINUTES_4 },
    async () => {
      const { session, halt, result } = await halted(() => estate.dr.libvirt.stopDaemon());
      assert.equal(halt.step, 'powerOn', halt.reason);
      assert.match(
        await session.executeUpdate(haltedSessionUpdates.abort, { args: alice('back to production') }),
        /runs again.*could not be confirmed off/,
      );
      assert.equal((await estate.port.getVm(vm)).powerState, 'Running');
      await estate.dr.libvirt.startDaemon();
      const s = await result();
      assert.equal(s.outcome, 'aborted');
      assert.doesNotMatch(s.detail, /left for the next job run/);
      await replicaReady(s.helperPoints[1]!);
      // The final checkpoint became the reference point before the source powered on (which ends its view).
      const refs = await estate.port.listReferencePoints(vm);
      assert.ok(
        refs.some((r) => r.id === `ref-${s.sessionId}-2` && r.trackingValid),
        refs.map((r) => r.id).join(', '),
      );
      await replicatesTracked();
    },
  );

  test(
    'power-on: the DR host’s libvirtd is down; once it is back, forceFailover boots helper point 2, nothing lost',
    { timeout: MINUTES_4 },
    async () => {
      const { session, halt, consoleSince, result } = await halted(() => estate.dr.libvirt.stopDaemon());
      assert.equal(halt.step, 'powerOn', halt.reason);
      await estate.dr.libvirt.startDaemon();
      assert.match(
        await session.executeUpdate(haltedSessionUpdates.forceFailover, { args: alice('boot it') }),
        /forced failover to helper restore point 2 by alice/,
      );
      const s = await result();
      assert.equal(s.outcome, 'forcedFailover');
      assert.equal(s.dataLoss, undefined);
      assert.equal(s.fullVerification?.identical, true, JSON.stringify(s.fullVerification));
      const helper2 = s.helperPoints[1]!;
      assert.equal((await estate.port.getReplica(replica)).headPointId, helper2);
      await exec('qemu-img', ['compare', '-U', join(replicaDir(), `${helper2}.vda.qcow2`), estate.prod.image]);
      const stoppedAt = cleanStop(await estate.prod.guestLines());
      const ready = await waitForReady(replicaConsole(), consoleSince, { timeoutMs: 60_000 });
      assert.equal(ready.resume, stoppedAt, 'the replica resumes at the source’s last write');
      assert.equal(await domState('dr', replica.replica), 'running');
      await undo();
      await replicatesTracked();
    },
  );
});
