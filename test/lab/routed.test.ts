import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { connectHypervisor } from '../../src/config/hypervisor';
import { parseConfiguration } from '../../src/config/load';
import { ConflictError, HostIdentityError, NotFoundError, TransferInterruptedError } from '../../src/hypervisor/errors';
import { HostApiHypervisor } from '../../src/hypervisor/host-api-adapter';
import { BLOCK_SIZE } from '../../src/hypervisor/port';
import { RoutedHypervisor } from '../../src/hypervisor/routed';
import { testClientTls } from '../tls';
import { assemble, collect, DR, MiB, PROD, randomBlocks, smallEstate, startTestLab, type TestLab } from './helpers';

// Two servers of one estate: lab A plays the production host and a DR host, lab B another DR host. Lab B also
// plays a host named like lab A's DR host, which is not routed to it: the router must not report it.
const FAR = 'dr-b';
const src = { host: PROD, vm: 'vm1' };
const far = { host: FAR, replica: 'r-far' };
const near = { host: DR, replica: 'r-near' };
const DISK = { id: 'os', sizeBytes: 4 * MiB };
const whole = [{ offset: 0, length: DISK.sizeBytes }];
const spec = { kind: 'regular', crashConsistent: true } as const;

describe('one estate served by two labs, routed by host', () => {
  let a: TestLab;
  let b: TestLab;
  let router: RoutedHypervisor;
  before(async () => {
    // The guest keeps writing: a copy must carry the checkpoint, not the disk as it is later.
    a = await startTestLab(smallEstate({ writeRate: 200, disks: [{ id: 'os', size: '4MiB' }] }));
    b = await startTestLab({ sites: [{ name: 'dr-far', role: 'dr', hosts: [{ name: FAR }, { name: DR }] }] });
    router = new RoutedHypervisor({
      hosts: new Map([
        [PROD, a.port],
        [DR, a.port],
        [FAR, b.port],
      ]),
      backups: a.port,
    });
    await a.control.guestWrite('vm1', 'os', randomBlocks(30, DISK.sizeBytes / BLOCK_SIZE - 2));
    await router.createCheckpoint(src, 'cp');
    // Written after the checkpoint: a copy of the disk as it is now would differ from it.
    await a.control.guestWrite('vm1', 'os', [0, 1, 2]);
  });
  after(async () => {
    await a.close();
    await b.close();
  });

  const atCheckpoint = () => assemble(a.port.readExtents({ ...src, disk: 'os' }, 'cp', whole), DISK.sizeBytes);
  const atPoint = (port: HostApiHypervisor, ref: typeof far, pointId: string) =>
    assemble(port.readReplicaExtents({ ...ref, disk: 'os' }, { pointId }, whole), DISK.sizeBytes);
  const send = (target: typeof far, pointId: string, extents = whole, checkpointId = 'cp') =>
    router.sendToRestorePoint({ ...src, disk: 'os', checkpointId }, { ...target, disk: 'os', pointId }, extents);

  test('each host is served by its own lab', async () => {
    assert.deepEqual(
      (await router.listVms(PROD)).map((v) => v.name),
      ['vm1'],
    );
    await router.createReplica(far, { sourceVm: 'vm1', disks: [DISK] });
    await router.createReplica(near, { sourceVm: 'vm1', disks: [DISK] });
    assert.equal((await b.port.getReplica(far)).sourceVm, 'vm1');
    // Lab a does not play FAR: its certificate does not name it, so no call about FAR is even sent to it.
    await assert.rejects(a.port.getReplica(far), HostIdentityError);
    assert.equal((await a.port.getReplica(near)).sourceVm, 'vm1');
    await assert.rejects(b.port.getReplica(near), NotFoundError);
  });

  test('lists the hosts of both labs, each from the lab it is routed to, in the configured order', async () => {
    assert.deepEqual(await router.listHosts(), [
      { name: PROD, site: 'production', role: 'production' },
      { name: DR, site: 'dr', role: 'dr' },
      { name: FAR, site: 'dr-far', role: 'dr' },
    ]);
  });

  test('an unknown host is not found, named in the error, for calls and block streams alike', async () => {
    const named = (e: unknown) => e instanceof NotFoundError && e.host === 'nowhere' && /nowhere/.test(e.message);
    await assert.rejects(router.getVm({ host: 'nowhere', vm: 'vm1' }), named);
    await assert.rejects(collect(router.readExtents({ host: 'nowhere', vm: 'vm1', disk: 'os' }, 'cp', whole)), named);
    await assert.rejects(send({ host: 'nowhere', replica: 'r' }, 'p'), named);
  });

  test('a send across the labs fills the far point with exactly the checkpoint, sent in halves', async () => {
    await router.beginRestorePoint(far, 'p1', spec);
    const half = DISK.sizeBytes / 2;
    let progress = 0;
    const first = await router.sendToRestorePoint(
      { ...src, disk: 'os', checkpointId: 'cp' },
      { ...far, disk: 'os', pointId: 'p1' },
      [{ offset: 0, length: half }],
      { onProgress: (bytes) => (progress = bytes) },
    );
    assert.equal(first.bytesWritten, half);
    assert.ok(progress >= half, `progress reported ${progress} bytes`);
    assert.equal((await send(far, 'p1', [{ offset: half, length: half }])).bytesWritten, half);
    await router.sealRestorePoint(far, 'p1');

    const expected = await atCheckpoint();
    assert.ok(
      expected.some((byte) => byte !== 0),
      'the checkpoint holds data',
    );
    const now = await a.control.readBlock('vm1', 'os', 0);
    assert.ok(!now.equals(expected.subarray(0, BLOCK_SIZE)), 'the disk changed since the checkpoint');
    assert.ok((await atPoint(b.port, far, 'p1')).equals(expected));
    const blocks = { startBlock: 0, count: DISK.sizeBytes / BLOCK_SIZE };
    assert.deepEqual(
      (await router.replicaBlockDigests({ ...far, disk: 'os' }, { pointId: 'p1' }, blocks)).digests,
      (await router.blockDigests({ ...src, disk: 'os' }, 'cp', blocks)).digests,
    );
  });

  test("a send across the labs reports the source's and the far end's failures as their own", async () => {
    await router.beginRestorePoint(far, 'p2', spec);
    await assert.rejects(send(far, 'p2', whole, 'nope'), (e: unknown) => e instanceof NotFoundError && e.host === PROD);
    await b.control.setFault(FAR, { kind: 'cut', afterBytes: MiB });
    await assert.rejects(send(far, 'p2'), (e: unknown) => e instanceof TransferInterruptedError && e.retryable);
    await b.control.clearFaults(FAR);
    // Sent again once the fault is gone, the point is whole.
    assert.equal((await send(far, 'p2')).bytesWritten, DISK.sizeBytes);
    await router.sealRestorePoint(far, 'p2');
    assert.ok((await atPoint(b.port, far, 'p2')).equals(await atCheckpoint()));
  });

  test('hosts on one lab still send host to host; hosts on two labs copy through the caller', async () => {
    // Refuses the lab's own host-to-host send, and nothing else: only a send that takes the fast path fails.
    await a.control.setFault(PROD, { kind: 'fail', status: 409, method: 'POST', path: '/disks/os/send$' });
    await router.beginRestorePoint(near, 'n1', spec);
    await router.beginRestorePoint(far, 'p3', spec);
    await assert.rejects(send(near, 'n1'), (e: unknown) => e instanceof ConflictError && /injected/.test(e.message));
    assert.equal((await send(far, 'p3')).bytesWritten, DISK.sizeBytes);
    await a.control.clearFaults(PROD);
    assert.equal((await send(near, 'n1')).bytesWritten, DISK.sizeBytes);
    await router.sealRestorePoint(near, 'n1');
    assert.ok((await atPoint(a.port, near, 'n1')).equals(await atCheckpoint()));
  });

  test('backups come from the backup repository, and without one they are not found', async () => {
    const backup = await a.control.takeBackup('vm1');
    assert.deepEqual(
      (await router.listBackups('vm1')).map((p) => p.id),
      [backup.id],
    );
    const none = new RoutedHypervisor({ hosts: new Map([[PROD, a.port]]) });
    const missing = (e: unknown) => e instanceof NotFoundError && /backup repository/.test(e.message);
    await assert.rejects(none.listBackups('vm1'), missing);
    await assert.rejects(collect(none.readBackupExtents({ backupId: backup.id, disk: 'os' }, whole)), missing);
  });

  test('connectHypervisor routes a configuration naming both labs', async () => {
    const port = connectHypervisor(
      parseConfiguration(`
hosts:
  - { name: ${PROD}, role: production, adapter: { type: lab, url: '${a.lab.url}' } }
  - { name: ${FAR}, role: dr, adapter: { type: kvm, url: '${b.lab.url}' } }
proxies: [{ name: p1, slots: 1 }]
users: [{ name: alice, roles: [BackupAdministrator] }]
tls: ${JSON.stringify(testClientTls())}
`),
    );
    try {
      assert.ok(port instanceof RoutedHypervisor);
      assert.deepEqual(
        (await port.listHosts()).map((h) => [h.name, h.site]),
        [
          [PROD, 'production'],
          [FAR, 'dr-far'],
        ],
      );
      assert.equal((await port.getReplica(far)).sourceVm, 'vm1');
    } finally {
      port.close();
    }
  });

  test('close closes each server once, however many hosts it serves', () => {
    const closed: string[] = [];
    const counted = (name: string) =>
      Object.assign(new HostApiHypervisor({ url: 'http://127.0.0.1:9' }), { close: () => closed.push(name) });
    const [one, two] = [counted('one'), counted('two')];
    new RoutedHypervisor({
      hosts: new Map([
        ['h1', one],
        ['h2', one],
        ['h3', two],
      ]),
      backups: one,
    }).close();
    assert.deepEqual(closed.sort(), ['one', 'two']);
  });
});
