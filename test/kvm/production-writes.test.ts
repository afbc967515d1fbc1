import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, test } from 'node:test';
import type { HostApiHypervisor } from '../../src/hypervisor/host-api-adapter';
import { BLOCK_SIZE, type Extent, type ExtentData } from '../../src/hypervisor/port';
import { kvmPort } from '../tls';
import { spawnKvmHostProcess, startTestKvmHost, type KvmHostProcess, type TestKvmHost } from './helpers';

const HOST = 'kvm-prod3';
const VM = 'pf-wr1';
/** How long an upload may send nothing before the agent cuts it off (60 s by default). */
const STALL_SECONDS = 5;

// Failback's writes into a powered-off domain go through a qemu-storage-daemon the production host process starts
// for each write request. The process killed in the middle of one leaves that daemon holding the disk: its next run
// must stop it, and the write, retried as a copy activity retries, must land whole and be counted by tracking.
describe('writes into a powered-off KVM domain through a SIGKILL of the production host process', () => {
  let dir: string;
  let kvm: TestKvmHost;
  let child: KvmHostProcess;
  let port: HostApiHypervisor;
  const vm = { host: HOST, vm: VM };
  const disk = { ...vm, disk: 'vda' };
  const stateDir = () => join(dir, 'state');
  /** The host process's write daemons still running (their sockets are named `<key>.write.sock`). */
  const writeDaemons = () =>
    spawnSync('pgrep', ['-f', `${join(stateDir(), 'run')}/[0-9a-f]+\\.write\\.sock`], { encoding: 'utf8' })
      .stdout.trim()
      .split('\n')
      .filter(Boolean);

  async function startProcess(): Promise<void> {
    child = await spawnKvmHostProcess({
      name: HOST,
      role: 'production',
      libvirtUri: kvm.libvirt.virsh.uri,
      stateDir: stateDir(),
      domainsFile: kvm.domainsFile,
      flags: ['--upload-stall-seconds', String(STALL_SECONDS)],
    });
    port = kvmPort(child.url, HOST);
  }

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'pf-kvmwr-'));
    kvm = await startTestKvmHost({ dir, name: HOST, domain: VM });
    await kvm.host.stop(); // the domain stays; the host process runs on in a process of its own
    await startProcess();
  });

  after(async () => {
    port?.close();
    await child?.stop();
    await kvm?.libvirt.stop();
    const left = spawnSync('pgrep', ['-f', stateDir()], { encoding: 'utf8' }).stdout.trim();
    rmSync(dir, { recursive: true, force: true });
    assert.equal(left, '', 'no daemon of the host process is left running');
  });

  test('a write cut off by the kill is retried after the restart: it lands, the view shows it, tracking counts it, and the domain boots', async () => {
    // Changes are counted from a reference point of the powered-off domain.
    await port.createCheckpoint(vm, 'c0');
    await port.createReferencePoint(vm, 'r0', 'c0');
    await port.deleteCheckpoint(vm, 'c0');
    await port.fenceWrites(vm, 'failback-1');
    await port.createCheckpoint(vm, 'ship'); // what a failback's phase reads production through

    const data: ExtentData[] = Array.from({ length: 32 }, (_, i) => ({
      offset: (16 + 2 * i) * BLOCK_SIZE,
      data: randomBytes(BLOCK_SIZE),
    }));
    let release!: () => void;
    const held = new Promise<void>((r) => (release = r));
    async function* firstThenHeld(): AsyncGenerator<ExtentData> {
      yield data[0]!;
      await held;
      yield* data.slice(1);
    }
    const cutOff = port.writeExtents(disk, firstThenHeld(), { fence: 'failback-1' });
    cutOff.catch(() => undefined);
    for (let i = 0; i < 200 && writeDaemons().length === 0; i++) await sleep(50);
    assert.equal(writeDaemons().length, 1, 'the write request opened the disk');
    await child.kill();
    release();
    await assert.rejects(cutOff);
    assert.equal(writeDaemons().length, 1, 'the killed process left its write daemon holding the disk');

    port.close();
    await startProcess();
    assert.deepEqual(writeDaemons(), [], 'the restarted process stopped it');
    async function* all(): AsyncGenerator<ExtentData> {
      yield* data;
    }
    const total = data.length * BLOCK_SIZE;
    assert.deepEqual(await port.writeExtents(disk, all(), { fence: 'failback-1' }), { bytesWritten: total });
    assert.deepEqual(writeDaemons(), [], 'each write request closes its daemon');

    // The view, taken again, shows every write; the reference point's tracking counted them.
    const extents: Extent[] = data.map((d) => ({ offset: d.offset, length: BLOCK_SIZE }));
    const read = new Map<number, Buffer>();
    for await (const piece of port.readExtents(disk, 'ship', extents)) read.set(piece.offset, piece.data);
    for (const d of data) assert.ok(read.get(d.offset)?.equals(d.data), `block at ${d.offset} as written`);
    const changed: Extent[] = [];
    let cursor: string | undefined;
    do {
      const page = await port.listChangedExtents(disk, { referencePointId: 'r0', checkpointId: 'ship' }, { cursor });
      changed.push(...page.extents);
      cursor = page.nextCursor;
    } while (cursor !== undefined);
    for (const d of data)
      assert.ok(
        changed.some((e) => d.offset >= e.offset && d.offset < e.offset + e.length),
        `block at ${d.offset} counted as changed`,
      );
    await port.deleteCheckpoint(vm, 'ship');

    // Nothing holds the disk any more: the domain boots.
    const since = (await kvm.guestLines()).length;
    await port.powerOn(vm);
    await kvm.readyAfter(since);
    await port.powerOff(vm);
  });

  test('a failback upload that stalls is cut off at the stall limit: the VM’s power calls wait only that long', async () => {
    await port.fenceWrites(vm, 'failback-2');
    const silent = new Promise<void>(() => undefined); // a sender behind a partition: no data, no close
    async function* firstThenSilent(): AsyncGenerator<ExtentData> {
      yield { offset: 16 * BLOCK_SIZE, data: randomBytes(BLOCK_SIZE) };
      await silent;
    }
    const stalled = port.writeExtents(disk, firstThenSilent(), { fence: 'failback-2' });
    stalled.catch(() => undefined);
    for (let i = 0; i < 200 && writeDaemons().length === 0; i++) await sleep(50);
    assert.equal(writeDaemons().length, 1, 'the upload holds the disk');
    const since = (await kvm.guestLines()).length;
    const asked = Date.now();
    await port.powerOn(vm); // waits for the domain's lock, which the stalled upload holds until it is cut off
    const waited = Date.now() - asked;
    assert.ok(waited < (STALL_SECONDS + 10) * 1000, `power-on answered after ${waited} ms`);
    await assert.rejects(stalled);
    assert.deepEqual(writeDaemons(), [], 'the cut-off upload let go of the disk');
    await kvm.readyAfter(since);
    await port.powerOff(vm);
  });
});
