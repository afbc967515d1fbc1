// A permanent failover of a running replica on a KVM DR host: a live commit of every layer into the base that lasts
// far longer than one control call's deadline (the agent runs it as a job the adapter follows), and one cut off by a
// SIGKILL of the agent, which its next run resumes (review M3); a half-done one is visible, and undo is refused
// until it is finished (review M2).
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, test } from 'node:test';
import {
  guestFiles,
  guestKernelCmdline,
  lastSeq,
  readGuestLines,
  waitForReady,
  waitForSeq,
} from '../../kvm/guest/guest';
import { guestDomainXml } from '../../kvm/libvirt/domain';
import { CAPABILITIES_CACHE, LibvirtInstance } from '../../kvm/libvirt/instance';
import { ConflictError } from '../../src/hypervisor/errors';
import { HostApiHypervisor } from '../../src/hypervisor/host-api-adapter';
import { BLOCK_SIZE, type ExtentData, type ReplicaRef } from '../../src/hypervisor/port';
import { testClientTls } from '../tls';
import { spawnKvmHostProcess, type KvmHostProcess } from './helpers';

const HOST = 'kvm-dr5';
const DISK_BYTES = 64 * 1024 * 1024;
/** The live commit's rate (above the guest's writes, or it never converges): seconds for the chain below. */
const COMMIT_MIBPS = 4;
/** The adapter's control-call deadline in this test (30 s by default): every call must be short. */
const CONTROL_DEADLINE_MS = 3_000;

async function* pieces(list: ExtentData[]): AsyncGenerator<ExtentData> {
  for (const p of list) yield p;
}

describe('long operations of a KVM DR host: a live commit followed as a job, and resumed after a SIGKILL', () => {
  let dir: string;
  let libvirt: LibvirtInstance;
  let child: KvmHostProcess | undefined;
  let port: HostApiHypervisor;

  async function startAgent(): Promise<void> {
    child = await spawnKvmHostProcess({
      name: HOST,
      role: 'dr',
      libvirtUri: libvirt.virsh.uri,
      stateDir: join(dir, 'state'),
      flags: ['--commit-bandwidth-mibps', String(COMMIT_MIBPS)],
    });
    port = new HostApiHypervisor({
      url: child.url,
      tls: testClientTls(),
      serverName: HOST,
      timeoutMs: CONTROL_DEADLINE_MS,
    });
  }
  const consoleOf = (replica: string) => join(dir, 'state', 'replicas', replica, 'console.log');
  const replicaDir = (replica: string) => join(dir, 'state', 'replicas', replica);

  /** A running replica of the test guest whose chain holds 48 MiB above its base: a point, and its running layer. */
  async function runningReplica(name: string): Promise<ReplicaRef> {
    const ref = { host: HOST, replica: name };
    const guest = guestFiles();
    const definition = guestDomainXml({
      name: 'source-vm',
      disk: '/nonexistent/source.qcow2',
      ...guest,
      cmdline: guestKernelCmdline({ pauseSeconds: 0.05, blocksPerIteration: 4, printEvery: 1 }),
      serialLog: '/nonexistent/source.serial',
    });
    await port.createReplica(ref, {
      sourceVm: `${name}-source`,
      disks: [{ id: 'vda', sizeBytes: DISK_BYTES }],
      definition: { format: 'libvirt-domain-xml', text: definition },
    });
    await port.beginRestorePoint(ref, 'p1', { kind: 'regular', crashConsistent: true });
    // 48 MiB from 16 MiB on: nothing reads them (the guest writes its blocks over the whole disk, reading none).
    const data = Array.from({ length: 768 }, (_, i) => ({
      offset: DISK_BYTES / 4 + i * BLOCK_SIZE,
      data: randomBytes(BLOCK_SIZE),
    }));
    await port.writeRestorePoint({ ...ref, disk: 'vda' }, 'p1', pieces(data));
    await port.sealRestorePoint(ref, 'p1');
    await port.powerOn({ host: HOST, vm: name });
    await waitForReady(consoleOf(name), 0, { timeoutMs: 60_000 });
    return ref;
  }

  /** The replica runs on its base alone and its guest writes on. */
  async function assertOnBase(ref: ReplicaRef): Promise<void> {
    const info = await port.getReplica(ref);
    assert.equal(info.consolidated, true);
    assert.equal(info.consolidating, false);
    assert.deepEqual(info.points, []);
    assert.equal(info.powerState, 'Running');
    const sources = await libvirt.virsh.run(['domblklist', ref.replica]);
    assert.match(sources, new RegExp(`vda\\s+${replicaDir(ref.replica)}/_base\\.vda\\.qcow2`), sources);
    const seq = lastSeq(await readGuestLines(consoleOf(ref.replica))) ?? 0;
    await waitForSeq(consoleOf(ref.replica), seq + 3, { timeoutMs: 60_000 });
  }

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'pf-kvmlong-'));
    libvirt = await LibvirtInstance.start({ dir: join(dir, 'libvirt'), capabilitiesCache: CAPABILITIES_CACHE });
    await startAgent();
  });

  after(async () => {
    port?.close();
    await child?.stop();
    await libvirt?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  test('a live commit of many control deadlines: followed to its end, the replica on its base and writing', async () => {
    const ref = await runningReplica('long1_replica');
    const started = Date.now();
    let settled = false;
    const consolidation = port.consolidateReplica(ref).finally(() => (settled = true));
    let sawHalfDone = false;
    while (!settled && !sawHalfDone) {
      await sleep(500);
      sawHalfDone = (await port.getReplica(ref)).consolidating;
    }
    assert.ok(sawHalfDone, 'the replica showed its consolidation under way');
    await consolidation;
    const took = Date.now() - started;
    assert.ok(took > 3 * CONTROL_DEADLINE_MS, `the commit took ${took} ms: longer than several control deadlines`);
    await assertOnBase(ref);
  });

  test('a live commit cut off by a SIGKILL of the agent: half done is visible, undo refused, the next run finishes it', async () => {
    const ref = await runningReplica('long2_replica');
    const first = port.consolidateReplica(ref);
    first.catch(() => undefined);
    // Killed in the middle of the commit, QEMU's block job running on without anyone to pivot it.
    for (let i = 0; i < 100; i++) {
      const job = await libvirt.virsh.run(['blockjob', ref.replica, 'vda', '--info', '--raw']);
      if (/cur=\d+/.test(job)) break;
      await sleep(200);
    }
    await child!.kill();
    await assert.rejects(first);
    port.close();
    await startAgent();
    const info = await port.getReplica(ref);
    if (!info.consolidated) {
      assert.equal(info.consolidating, true, 'a half-done permanent failover is visible');
      await assert.rejects(
        port.discardRunningLayer(ref),
        (e: Error) => e instanceof ConflictError && /half done|permanently failed over/.test(e.message),
      );
    }
    // Asked for again (as the operation's retry does), the permanent failover ends: the agent resumed it at start.
    await port.consolidateReplica(ref);
    await assertOnBase(ref);
    await assert.rejects(port.discardRunningLayer(ref), ConflictError, 'undo after a permanent failover');
  });
});
