import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { GUEST_BLOCK_SIZE, guestBlockNumbers, lastSeq, parseDataBlock, waitForGuest } from '../../kvm/guest/guest';
import { blockDigest } from '../../src/host-api/digests';
import {
  BadRequestError,
  ConflictError,
  HostFailureError,
  HostIdentityError,
  NotFoundError,
  TrackingLostError,
} from '../../src/hypervisor/errors';
import type { HostApiHypervisor } from '../../src/hypervisor/host-api-adapter';
import { BLOCK_SIZE, type Extent, type ExtentPage, type PageRequest } from '../../src/hypervisor/port';
import { kvmPort, rawRequest } from '../tls';
import {
  BLOCKS_PER_ITERATION,
  GUEST_DISK_BYTES as DISK_BYTES,
  killOfflineViewDaemons,
  startTestKvmHost,
  type TestKvmHost,
} from './helpers';

const HOST = 'kvm-prod1';
const VM = 'pf-src1';
/** A libvirt checkpoint of the guest made by another backup tool. */
const OTHER_TOOL = 'zz-other-backup-tool';
const exec = promisify(execFile);

/** A domain of someone else's on the same host: never listed for the agent. */
const otherDomainXml = (name: string, image: string) => `<domain type='qemu'>
  <name>${name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='${image}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
`;

async function allPages(list: (page: PageRequest) => Promise<ExtentPage>): Promise<Extent[]> {
  const out: Extent[] = [];
  let cursor: string | undefined;
  do {
    const page = await list({ cursor, limit: 7 }); // small pages: the cursor is exercised
    out.push(...page.extents);
    cursor = page.nextCursor;
  } while (cursor !== undefined);
  return out;
}

const bytesOf = (extents: Extent[]) => extents.reduce((n, e) => n + e.length, 0);
const covers = (extents: Extent[], offset: number) =>
  extents.some((e) => offset >= e.offset && offset < e.offset + e.length);

// The orchestrator's adapter against our host process on a real libvirt host: the same calls it makes of the lab,
// answered from libvirt's checkpoints and pull backups of a real guest.
describe('the KVM host process, source side, on a private libvirtd', () => {
  let dir: string;
  let kvm: TestKvmHost;
  let port: HostApiHypervisor;
  let serialLog: string;
  const vm = { host: HOST, vm: VM };
  const disk = { ...vm, disk: 'vda' };
  /** A replica kept as a plain buffer: what the orchestrator would have written into restore points. */
  const copy = Buffer.alloc(DISK_BYTES);
  const libvirt = () => kvm.libvirt;
  const guestLines = () => kvm.guestLines();
  const seqAtLeast = (n: number) => kvm.seqAtLeast(n);
  const bootAndWrite = async () => {
    const before = (await guestLines()).length;
    await port.powerOn(vm);
    await kvm.readyAfter(before);
    return seqAtLeast((lastSeq(await guestLines()) ?? 0) + 3);
  };
  async function applyTo(target: Buffer, checkpointId: string, extents: Extent[]): Promise<number> {
    let bytes = 0;
    for await (const piece of port.readExtents(disk, checkpointId, extents)) {
      piece.data.copy(target, piece.offset);
      bytes += piece.data.length;
    }
    return bytes;
  }
  async function assertCopyEquals(checkpointId: string): Promise<void> {
    const blocks = DISK_BYTES / BLOCK_SIZE;
    const { digests, algorithm } = await port.blockDigests(disk, checkpointId, { startBlock: 0, count: blocks });
    assert.equal(algorithm, 'sha256-128');
    const differing = digests.flatMap((d, b) =>
      d === blockDigest(copy.subarray(b * BLOCK_SIZE, (b + 1) * BLOCK_SIZE)) ? [] : [b],
    );
    assert.deepEqual(differing, [], `blocks of the copy that differ from ${checkpointId}`);
  }

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'pf-kvmhost-'));
    kvm = await startTestKvmHost({ dir, name: HOST, domain: VM });
    serialLog = kvm.serialLog;
    port = kvmPort(kvm.host.url, HOST);
  });

  after(async () => {
    port?.close();
    await kvm?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  test('inventory: the host and its libvirt domain, with its disk; calls for other hosts or replicas are refused', async () => {
    assert.deepEqual(await port.listHosts(), [{ name: HOST, site: 'primary', role: 'production' }]);
    const [info, ...others] = await port.listVms(HOST);
    assert.equal(others.length, 0);
    assert.deepEqual(info, {
      name: VM,
      host: HOST,
      kind: 'source',
      powerState: 'Off',
      disks: [{ id: 'vda', sizeBytes: DISK_BYTES }],
      lastStop: null,
    });
    await assert.rejects(port.getVm({ host: HOST, vm: 'nosuch' }), NotFoundError);
    // The adapter sends no call about another host here (this process's certificate names HOST alone) ...
    await assert.rejects(port.getVm({ host: 'other', vm: VM }), HostIdentityError);
    // ... and one that reaches the process anyway is answered 404.
    const other = await rawRequest(`${kvm.host.url}/v1/hosts/other/vms/${VM}`);
    assert.equal(other.status, 404);
    assert.equal(other.json<{ error: { field: string } }>().error.field, 'params.host');
    await assert.rejects(port.getReplica({ host: HOST, replica: 'r' }), NotFoundError);
    await assert.rejects(port.discardRunningLayer({ host: HOST, replica: 'r' }), NotFoundError);
    // What KVM hosts do not serve yet says so (501), never a success or a 404 a caller would take for "gone".
    await assert.rejects(
      port.listBackups(VM),
      (e: Error) => e instanceof HostFailureError && /not served by KVM hosts yet/.test(e.message),
    );
    // A new VM is made from a definition: without one, nothing is made, and the answer names the field.
    await assert.rejects(
      port.createVm({ host: HOST, vm: 'new1' }, { disks: [{ id: 'vda', sizeBytes: DISK_BYTES }] }),
      (e: Error) => e instanceof BadRequestError && /body\.definition/.test(e.message),
    );
    assert.deepEqual(await libvirt().virsh.domains(), [VM]);
  });

  test('a domain not listed in its domains file is invisible to the agent and untouched; listed, it is seen at once', async () => {
    // payroll-db: a domain of the host under no job, defined and powered by someone else.
    const other = 'payroll-db';
    const image = join(dir, `${other}.qcow2`);
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', image, '10000000000']);
    writeFileSync(join(dir, `${other}.xml`), otherDomainXml(other, image));
    await libvirt().virsh.run(['define', join(dir, `${other}.xml`)]);
    const otherVm = { host: HOST, vm: other };
    const unknown = (e: Error) => e instanceof NotFoundError && e.message.includes(`VM ${other} not found`);
    assert.deepEqual(
      (await port.listVms(HOST)).map((v) => v.name),
      [VM],
    );
    await assert.rejects(port.getVm(otherVm), unknown);
    await assert.rejects(port.getVmDefinition(otherVm), unknown);
    await assert.rejects(port.powerOn(otherVm), unknown);
    await assert.rejects(port.powerOff(otherVm), unknown);
    await assert.rejects(port.fenceWrites(otherVm, 'mine'), unknown);
    await assert.rejects(port.createCheckpoint(otherVm, 'steal'), unknown);
    await assert.rejects(port.listReferencePoints(otherVm), unknown);
    await assert.rejects(
      port.writeExtents(
        { ...otherVm, disk: 'vda' },
        (async function* () {
          yield { offset: 0, data: Buffer.alloc(BLOCK_SIZE, 1) };
        })(),
      ),
      unknown,
    );
    // Neither made anew over it, nor taken as a replica's name.
    await assert.rejects(
      port.createVm(otherVm, {
        disks: [{ id: 'vda', sizeBytes: BLOCK_SIZE * 16 }],
        definition: (await port.getVmDefinition(vm))!,
      }),
      ConflictError,
    );
    await assert.rejects(
      port.createReplica(
        { host: HOST, replica: other },
        { sourceVm: VM, disks: [{ id: 'vda', sizeBytes: DISK_BYTES }] },
      ),
      ConflictError,
    );
    await assert.rejects(
      port.createReplica(
        { host: HOST, replica: '101' },
        { sourceVm: VM, disks: [{ id: 'vda', sizeBytes: DISK_BYTES }] },
      ),
      (e: Error) => e instanceof BadRequestError && /all-digit/.test(e.message),
    );
    assert.equal(await libvirt().virsh.domainState(other), 'shut off', 'never started');
    assert.deepEqual(await libvirt().virsh.run(['checkpoint-list', other, '--name']), '');
    // Listed by its operator, it is under the agent's care at once (no restart); unlisted, invisible again.
    writeFileSync(kvm.domainsFile, `${VM}\n${other} # added\n`);
    assert.deepEqual((await port.getVm(otherVm)).name, other);
    // Its disk of 10^10 bytes is no whole number of 64 KiB blocks: said before any copy starts (review m7).
    await assert.rejects(
      port.createCheckpoint(otherVm, 'odd-size'),
      (e: Error) =>
        e instanceof ConflictError && /10000000000 bytes, not a whole number of 64 KiB blocks/.test(e.message),
    );
    assert.deepEqual(await libvirt().virsh.run(['checkpoint-list', other, '--name']), '');
    writeFileSync(kvm.domainsFile, `${VM}\n`);
    await assert.rejects(port.getVm(otherVm), unknown);
    await libvirt().virsh.run(['undefine', other]);
  });

  test('a disk whose path holds a comma and a space: found, written (failback) and read through a view (m5)', async () => {
    const name = 'pf-odd-path';
    const image = join(dir, 'db, 1.qcow2');
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(DISK_BYTES)]);
    writeFileSync(join(dir, `${name}.xml`), otherDomainXml(name, image));
    await libvirt().virsh.run(['define', join(dir, `${name}.xml`)]);
    writeFileSync(kvm.domainsFile, `${VM}\n${name}\n`);
    const odd = { host: HOST, vm: name };
    assert.deepEqual((await port.getVm(odd)).disks, [{ id: 'vda', sizeBytes: DISK_BYTES }]);
    const data = Buffer.alloc(BLOCK_SIZE, 0x3c);
    await port.fenceWrites(odd, 'odd-1');
    const written = await port.writeExtents(
      { ...odd, disk: 'vda' },
      (async function* () {
        yield { offset: 5 * BLOCK_SIZE, data };
      })(),
      { fence: 'odd-1' },
    );
    assert.deepEqual(written, { bytesWritten: BLOCK_SIZE });
    await port.createCheckpoint(odd, 'odd-view');
    const read: Buffer[] = [];
    for await (const piece of port.readExtents({ ...odd, disk: 'vda' }, 'odd-view', [
      { offset: 5 * BLOCK_SIZE, length: BLOCK_SIZE },
    ]))
      read.push(piece.data);
    assert.deepEqual(Buffer.concat(read), data);
    await port.deleteCheckpoint(odd, 'odd-view');
    writeFileSync(kvm.domainsFile, `${VM}\n`);
    await libvirt().virsh.run(['undefine', '--checkpoints-metadata', name]);
  });

  test('a first full copy from a checkpoint of the running guest, then an incremental one from the changed extents: each equals its checkpoint', async () => {
    const written = await bootAndWrite();
    assert.equal((await port.getVm(vm)).powerState, 'Running');
    // Another backup tool's checkpoint of the same domain: never the agent's to delete (review M6).
    await libvirt().virsh.run(['checkpoint-create-as', VM, OTHER_TOOL]);

    const c1 = await port.createCheckpoint(vm, 'c1');
    assert.deepEqual(await port.createCheckpoint(vm, 'c1'), c1, 'a retried create returns the same checkpoint');
    const allocated = await allPages((page) => port.listAllocatedExtents(disk, 'c1', page));
    assert.ok(covers(allocated, 0), 'the canary block holds data');
    assert.ok(bytesOf(allocated) < DISK_BYTES / 2, `${bytesOf(allocated)} bytes allocated of a mostly empty disk`);
    await applyTo(copy, 'c1', allocated);
    await assertCopyEquals('c1');
    const canary1 = (await port.readCanary(vm, 'c1')).sequence;
    assert.ok(canary1 >= written, `canary ${canary1} at c1, the guest said ${written} before it`);
    await assert.rejects(
      port.listChangedExtents(disk, { referencePointId: 'nosuch', checkpointId: 'c1' }),
      NotFoundError,
    );
    // The copy is sealed: c1 becomes the reference point, as promoteCheckpoint does it.
    await port.createReferencePoint(vm, 'r1', 'c1');
    await port.deleteCheckpoint(vm, 'c1');
    await assert.rejects(port.readCanary(vm, 'c1'), NotFoundError, 'a deleted checkpoint is gone');

    const later = await seqAtLeast(canary1 + 6);
    await port.createCheckpoint(vm, 'c2');
    const changed = await allPages((page) =>
      port.listChangedExtents(disk, { referencePointId: 'r1', checkpointId: 'c2' }, page),
    );
    assert.ok(bytesOf(changed) < DISK_BYTES / 4, `${bytesOf(changed)} bytes changed since c1`);
    assert.ok(covers(changed, 0), 'the canary changed');
    // Iteration canary1 + 1 may have begun before c1; the next one began after its canary, so after c1.
    for (let seq = canary1 + 2; seq <= later; seq++)
      for (const block of guestBlockNumbers(seq, DISK_BYTES, BLOCKS_PER_ITERATION))
        assert.ok(covers(changed, block * GUEST_BLOCK_SIZE), `block ${block} of iteration ${seq} is among the changes`);
    await applyTo(copy, 'c2', changed);
    await assertCopyEquals('c2');
    // Crash-consistent: every block of the iteration the canary names is there.
    const canary2 = (await port.readCanary(vm, 'c2')).sequence;
    for (const block of guestBlockNumbers(canary2, DISK_BYTES, BLOCKS_PER_ITERATION)) {
      const b = block * GUEST_BLOCK_SIZE;
      const data = parseDataBlock(copy.subarray(b, b + GUEST_BLOCK_SIZE));
      assert.ok(data && data.seq >= canary2, `block ${block}: ${JSON.stringify(data)} at canary ${canary2}`);
    }
  });

  test('a restart of the host process keeps its reference points and the open view', async () => {
    port.close();
    await kvm.host.stop();
    port = kvmPort((await kvm.restartHost()).url, HOST);
    assert.deepEqual(
      (await port.listReferencePoints(vm)).map((r) => [r.id, r.checkpointId, r.trackingValid]),
      [['r1', 'c1', true]],
    );
    await assertCopyEquals('c2');
    await port.createReferencePoint(vm, 'r2', 'c2');
    await port.deleteCheckpoint(vm, 'c2');
    await port.deleteReferencePoint(vm, 'r1');
    assert.deepEqual(
      (await port.listReferencePoints(vm)).map((r) => r.id),
      ['r2'],
    );
    const checkpoints = (await libvirt().virsh.run(['checkpoint-list', VM, '--name'])).trim().split('\n');
    assert.deepEqual(
      checkpoints.sort(),
      ['c2', OTHER_TOOL],
      'libvirt keeps the checkpoint the reference point stands for, and the other tool’s',
    );
  });

  test('the inventory asked while views begin and end: the guest runs on', async () => {
    // QEMU 7.2 aborts (qcow2_get_specific_info: Assertion `false' failed) when libvirt's domblkinfo queries its block
    // nodes while a backup job's scratch node goes: the fault suite lost a production guest so. The agent reads a
    // disk's size from its image instead.
    let asking = true;
    let asked = 0;
    const inventory = (async () => {
      while (asking) {
        await port.getVm(vm);
        asked++;
      }
    })();
    try {
      for (let i = 0; i < 20; i++) {
        await port.createCheckpoint(vm, `race-${i}`);
        await port.deleteCheckpoint(vm, `race-${i}`);
      }
    } finally {
      asking = false;
      await inventory;
    }
    assert.ok(asked > 20, `asked ${asked} times`);
    assert.equal(await libvirt().virsh.domainState(VM), 'running', 'the guest’s QEMU runs');
    assert.equal((await port.getVm(vm)).disks[0]?.sizeBytes, DISK_BYTES);
  });

  test('ACPI shutdown, then the final copy of the powered-off guest, read offline: exact, and the domain never starts', async () => {
    const shutdown = await port.shutdownGuest(vm, 60_000);
    assert.deepEqual(shutdown, { outcome: 'off', state: 'Off' });
    const clean = await waitForGuest(serialLog, (lines) => lines.filter((l) => l.kind === 'clean-shutdown').at(-1), {
      timeoutMs: 5_000,
    });
    assert.deepEqual(await port.shutdownGuest(vm, 1_000), { outcome: 'already-off', state: 'Off' });

    await port.createCheckpoint(vm, 'final');
    assert.equal(await libvirt().virsh.domainState(VM), 'shut off', 'read without starting it');
    const during = await port.getVm(vm);
    assert.equal(during.powerState, 'Off');
    assert.equal(during.lastStop, 'guest-shutdown');
    // The view's exports hold the image: nobody starts the domain under a copy.
    await assert.rejects(libvirt().virsh.run(['start', VM]), /lock/);
    const changed = await allPages((page) =>
      port.listChangedExtents(disk, { referencePointId: 'r2', checkpointId: 'final' }, page),
    );
    await applyTo(copy, 'final', changed);
    await assertCopyEquals('final');
    assert.equal((await port.readCanary(vm, 'final')).sequence, clean.seq, 'the canary of the clean shutdown');

    // Its export daemon killed: served again, as the image is unchanged (the checkpoint's own bitmap is clean) ...
    const viewGone = (e: Error) => e instanceof ConflictError && /view of checkpoint .* is gone/.test(e.message);
    await killOfflineViewDaemons(kvm);
    await assertCopyEquals('final');
    // ... but not once something wrote to the image meanwhile: that view is gone, and the checkpoint is taken again.
    await killOfflineViewDaemons(kvm);
    const written = 900 * BLOCK_SIZE;
    await exec('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x3c ${written} ${BLOCK_SIZE}`, kvm.image]);
    await assert.rejects(port.readCanary(vm, 'final'), viewGone);
    await port.createCheckpoint(vm, 'final');
    const again = await allPages((page) =>
      port.listChangedExtents(disk, { referencePointId: 'r2', checkpointId: 'final' }, page),
    );
    assert.ok(covers(again, written), 'the write since is a change since the reference point');
    await applyTo(copy, 'final', again);
    await assertCopyEquals('final');

    await port.createReferencePoint(vm, 'r3', 'final');
    await port.deleteCheckpoint(vm, 'final');
    await port.deleteReferencePoint(vm, 'r2');
    assert.equal(await libvirt().virsh.domainState(VM), 'shut off');
    assert.equal((await port.getVm(vm)).lastStop, 'guest-shutdown');
    // libvirt knows the checkpoint as if it had made it, so its next backup counts changes from it (the next test).
    assert.ok((await libvirt().virsh.run(['checkpoint-list', VM, '--name'])).split('\n').includes('final'));
  });

  test('a second checkpoint ends the first one’s backup job instead of hanging on libvirt’s lock', async () => {
    await bootAndWrite();
    await port.createCheckpoint(vm, 'stale');
    await port.createCheckpoint(vm, 'fresh');
    await assert.rejects(port.readCanary(vm, 'stale'), NotFoundError);
    const changed = await allPages((page) =>
      port.listChangedExtents(disk, { referencePointId: 'r3', checkpointId: 'fresh' }, page),
    );
    await applyTo(copy, 'fresh', changed);
    await assertCopyEquals('fresh');
    await port.createReferencePoint(vm, 'r4', 'fresh');
    await port.deleteCheckpoint(vm, 'fresh');
    await port.deleteReferencePoint(vm, 'r3');
  });

  test('libvirtd restarted during a copy: the export and the backup job go on, and the copy is exact', async () => {
    await port.createCheckpoint(vm, 'across-restart');
    const allocated = await allPages((page) => port.listAllocatedExtents(disk, 'across-restart', page));
    const restarted = libvirt().restartDaemon();
    const bytes = await applyTo(copy, 'across-restart', allocated);
    await restarted;
    assert.equal(bytes, bytesOf(allocated));
    await assertCopyEquals('across-restart');
    // Through the restarted daemon: the job is still there to end, and its checkpoint goes.
    await port.deleteCheckpoint(vm, 'across-restart');
    const checkpoints = (await libvirt().virsh.run(['checkpoint-list', VM, '--name'])).trim().split('\n');
    assert.deepEqual(
      checkpoints.sort(),
      ['fresh', OTHER_TOOL],
      'the reference point’s checkpoint and the other tool’s',
    );
  });

  test('QEMU killed: tracking lost is the port’s TrackingLostError, and a digest comparison still copies exactly', async () => {
    // A view open when its QEMU dies: a conflict at once, also once the guest runs again, not a refused connection
    // that a copy retries for minutes (found by the fault suite).
    await port.createCheckpoint(vm, 'before-kill');
    await allPages((page) => port.listAllocatedExtents(disk, 'before-kill', page));
    const viewGone = (e: Error) => e instanceof ConflictError && /view of checkpoint .* is gone/.test(e.message);
    const [pid, ...more] = libvirt().qemuPids();
    assert.ok(pid !== undefined && more.length === 0, 'one QEMU runs');
    process.kill(pid, 'SIGKILL');
    for (let i = 0; i < 100 && (await libvirt().virsh.domainState(VM)) !== 'shut off'; i++)
      await new Promise((r) => setTimeout(r, 100));
    assert.equal((await port.getVm(vm)).lastStop, 'forced-off');
    await assert.rejects(
      allPages((page) => port.listAllocatedExtents(disk, 'before-kill', page)),
      viewGone,
    );
    await bootAndWrite();
    await assert.rejects(
      allPages((page) => port.listAllocatedExtents(disk, 'before-kill', page)),
      viewGone,
    );
    await port.createCheckpoint(vm, 'after-kill');
    await assert.rejects(
      port.listChangedExtents(disk, { referencePointId: 'r4', checkpointId: 'after-kill' }),
      TrackingLostError,
    );
    assert.deepEqual(
      (await port.listReferencePoints(vm)).map((r) => [r.id, r.trackingValid]),
      [['r4', false]],
    );
    // What the orchestrator then does: compare block digests and copy the blocks that differ.
    const blocks = DISK_BYTES / BLOCK_SIZE;
    const { digests } = await port.blockDigests(disk, 'after-kill', { startBlock: 0, count: blocks });
    const differing = digests.flatMap((d, b) =>
      d === blockDigest(copy.subarray(b * BLOCK_SIZE, (b + 1) * BLOCK_SIZE))
        ? []
        : [{ offset: b * BLOCK_SIZE, length: BLOCK_SIZE }],
    );
    assert.ok(differing.length > 0, 'the guest wrote since the last copy');
    await applyTo(copy, 'after-kill', differing);
    await assertCopyEquals('after-kill');
    // Tracking from the new reference point is whole again.
    await port.createReferencePoint(vm, 'r5', 'after-kill');
    await port.deleteCheckpoint(vm, 'after-kill');
    await port.deleteReferencePoint(vm, 'r4');
    await seqAtLeast((lastSeq(await guestLines()) ?? 0) + 3);
    await port.createCheckpoint(vm, 'c6');
    const changed = await allPages((page) =>
      port.listChangedExtents(disk, { referencePointId: 'r5', checkpointId: 'c6' }, page),
    );
    await applyTo(copy, 'c6', changed);
    await assertCopyEquals('c6');
    await port.deleteCheckpoint(vm, 'c6');
    const off = await port.powerOff(vm);
    assert.deepEqual(off, { state: 'Off', alreadyInState: false });
    assert.equal((await port.getVm(vm)).lastStop, 'forced-off');
    assert.deepEqual(await port.powerOff(vm), { state: 'Off', alreadyInState: true });
  });

  test('failback’s writes into the powered-off guest: fenced, refused while it runs, tracked, and a view read after them shows them', async () => {
    assert.equal(await libvirt().virsh.domainState(VM), 'shut off');
    const block = 1000; // not the canary's: the guest boots on afterwards
    const at = { offset: block * BLOCK_SIZE, length: BLOCK_SIZE };
    const data = Buffer.alloc(BLOCK_SIZE, 0x5a);
    async function* frames(): AsyncGenerator<{ offset: number; data: Buffer }> {
      yield { offset: at.offset, data };
    }
    const readBlock = async (checkpointId: string) => {
      const pieces: Buffer[] = [];
      for await (const piece of port.readExtents(disk, checkpointId, [at])) pieces.push(piece.data);
      return Buffer.concat(pieces);
    };

    await port.fenceWrites(vm, 'failback-1');
    await port.createCheckpoint(vm, 'fb-view'); // an offline view, as a failback's phase takes it
    const before = await readBlock('fb-view');
    assert.notDeepEqual(before, data);
    await assert.rejects(port.writeExtents(disk, frames(), { fence: 'a-dead-writer' }), ConflictError);
    await assert.rejects(port.writeExtents(disk, frames()), ConflictError, 'a write without the fence');
    assert.deepEqual(await readBlock('fb-view'), before, 'a refused write changes nothing and ends no view');

    assert.deepEqual(await port.writeExtents(disk, frames(), { fence: 'failback-1' }), { bytesWritten: BLOCK_SIZE });
    assert.equal(await libvirt().virsh.domainState(VM), 'shut off');
    // The view is taken again when read: it shows the write, and the checkpoint's bitmap counted it.
    assert.deepEqual(await readBlock('fb-view'), data);
    const changed = await allPages((page) =>
      port.listChangedExtents(disk, { referencePointId: 'r5', checkpointId: 'fb-view' }, page),
    );
    assert.ok(covers(changed, at.offset), 'the write is a change since the reference point');
    await port.deleteCheckpoint(vm, 'fb-view');

    await port.fenceWrites(vm, 'failback-2');
    await assert.rejects(port.writeExtents(disk, frames(), { fence: 'failback-1' }), ConflictError);
    await bootAndWrite();
    await assert.rejects(
      port.writeExtents(disk, frames(), { fence: 'failback-2' }),
      (e: Error) => e instanceof ConflictError && /writes need it Off/.test(e.message),
    );
    await port.powerOff(vm);
    const checkpoints = (await libvirt().virsh.run(['checkpoint-list', VM, '--name'])).trim().split('\n');
    assert.deepEqual(checkpoints.sort(), ['after-kill', OTHER_TOOL], 'the view’s libvirt checkpoint went with it');
  });

  test('a reference point whose libvirt checkpoint is gone is tracking lost; another tool’s backup job is never aborted', async () => {
    // An operator deleted the checkpoint the reference point stands for (review M7).
    await libvirt().virsh.run(['checkpoint-delete', '--metadata', VM, 'after-kill']);
    await bootAndWrite();
    await port.createCheckpoint(vm, 'm7');
    await assert.rejects(
      port.listChangedExtents(disk, { referencePointId: 'r5', checkpointId: 'm7' }),
      TrackingLostError,
    );
    assert.deepEqual(
      (await port.listReferencePoints(vm)).map((r) => [r.id, r.trackingValid]),
      [['r5', false]],
    );
    const allocated = await allPages((page) => port.listAllocatedExtents(disk, 'm7', page));
    await applyTo(copy, 'm7', allocated);
    await assertCopyEquals('m7');
    // Our view's job ended by someone else, and another backup tool's pull backup started (review M6).
    await libvirt().virsh.run(['domjobabort', VM]);
    const backupXml = join(dir, 'other-backup.xml');
    writeFileSync(
      backupXml,
      `<domainbackup mode='pull'><server transport='unix' socket='${join(dir, 'other.sock')}'/><disks>` +
        `<disk name='vda' backup='yes' type='file'><scratch file='${join(dir, 'other-scratch.qcow2')}'/></disk>` +
        `</disks></domainbackup>`,
    );
    await libvirt().virsh.run(['backup-begin', VM, backupXml]);
    await assert.rejects(
      port.createCheckpoint(vm, 'm6'),
      (e: Error) => e instanceof ConflictError && /another tool's backup job/.test(e.message),
    );
    assert.match(await libvirt().virsh.run(['domjobinfo', VM]), /Operation:\s+Backup/, 'its job runs on');
    await libvirt().virsh.run(['domjobabort', VM]);
    await port.createCheckpoint(vm, 'm6');
    await port.deleteCheckpoint(vm, 'm6');
    // With no view of its own left, the agent's next checkpoint waits for the other tool's job too (a 409, not a 500).
    await libvirt().virsh.run(['backup-begin', VM, backupXml]);
    await assert.rejects(
      port.createCheckpoint(vm, 'm6-again'),
      (e: Error) => e instanceof ConflictError && /another tool's backup job/.test(e.message),
    );
    assert.match(await libvirt().virsh.run(['domjobinfo', VM]), /Operation:\s+Backup/, 'its job runs on');
    await libvirt().virsh.run(['domjobabort', VM]);
    await port.powerOff(vm);
  });
});
