import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import {
  BadRequestError,
  HostFailureError,
  HostTimeoutError,
  HostUnreachableError,
  HypervisorError,
  TransferInterruptedError,
} from '../../src/hypervisor/errors';
import { labPort, rawRequest } from '../tls';
import { collect, DR, MiB, PROD, single, sleep, smallEstate, startTestLab, type TestLab } from './helpers';

const src = { host: PROD, vm: 'vm1' };
const rep = { host: DR, replica: 'r-faults' };
const DISK = { id: 'os', sizeBytes: 4 * MiB };

function isKind<E extends HypervisorError>(cls: abstract new (...args: never[]) => E, retryable: boolean) {
  return (e: unknown): boolean => {
    assert.ok(e instanceof cls, `expected ${cls.name}, got ${String(e)}`);
    assert.equal(e.retryable, retryable);
    return true;
  };
}

describe('faults on demand surface as the right error classes', () => {
  let t: TestLab;
  before(async () => {
    t = await startTestLab(smallEstate({ writeRate: 100, disks: [{ id: 'os', size: '4MiB' }] }));
    await t.port.createCheckpoint(src, 'cp');
    await t.port.createReplica(rep, { sourceVm: 'vm1', disks: [DISK] });
    await t.port.beginRestorePoint(rep, 'p1', { kind: 'regular', crashConsistent: true });
  });
  after(async () => t.close());

  const whole = [{ offset: 0, length: DISK.sizeBytes }];

  test('unreachable host, cleared by API; other hosts unaffected', async () => {
    await t.control.setFault(PROD, { kind: 'unreachable' });
    await assert.rejects(t.port.getVm(src), isKind(HostUnreachableError, true));
    await assert.rejects(
      collect(t.port.readExtents({ ...src, disk: 'os' }, 'cp', whole)),
      isKind(HostUnreachableError, true),
    );
    assert.equal((await t.port.getReplica(rep)).name, rep.replica, 'the DR host still answers');
    await t.control.clearFaults(PROD);
    assert.equal((await t.port.getVm(src)).name, 'vm1');
  });

  test('failing calls (5xx), cleared after their duration', async () => {
    await t.control.setFault(PROD, { kind: 'fail', status: 503, durationMs: 300 });
    await assert.rejects(t.port.listVms(PROD), isKind(HostFailureError, true));
    await sleep(350);
    assert.equal((await t.port.listVms(PROD)).length, 1);
  });

  test('slow calls add latency; past the caller deadline they time out', async () => {
    await t.control.setFault(PROD, { kind: 'slow', latencyMs: 250 });
    const started = Date.now();
    await t.port.getVm(src);
    assert.ok(Date.now() - started >= 240, 'the call took the added latency');
    const impatient = labPort(t.lab.url, { timeoutMs: 100 });
    try {
      await assert.rejects(impatient.getVm(src), isKind(HostTimeoutError, true));
    } finally {
      impatient.close();
    }
    await t.control.clearFaults(PROD, 'slow');
  });

  test('a read transfer cut after N bytes is a TransferInterruptedError', async () => {
    await t.control.setFault(PROD, { kind: 'cut', afterBytes: 300_000 });
    let received = 0;
    await assert.rejects(
      async () => {
        for await (const e of t.port.readExtents({ ...src, disk: 'os' }, 'cp', whole)) received += e.data.length;
      },
      isKind(TransferInterruptedError, true),
    );
    assert.ok(received < DISK.sizeBytes);
    await t.control.clearFaults(PROD);
    const full = await collect(t.port.readExtents({ ...src, disk: 'os' }, 'cp', whole));
    assert.equal(
      full.reduce((n, e) => n + e.data.length, 0),
      DISK.sizeBytes,
    );
  });

  test('a write transfer cut after N bytes is a TransferInterruptedError; the retry completes', async () => {
    const data = Buffer.concat(
      (await collect(t.port.readExtents({ ...src, disk: 'os' }, 'cp', [{ offset: 0, length: 2 * MiB }]))).map(
        (e) => e.data,
      ),
    );
    await t.control.setFault(DR, { kind: 'cut', afterBytes: 500_000 });
    await assert.rejects(
      t.port.writeRestorePoint({ ...rep, disk: 'os' }, 'p1', single(0, data)),
      isKind(TransferInterruptedError, true),
    );
    await t.control.clearFaults(DR);
    const r = await t.port.writeRestorePoint({ ...rep, disk: 'os' }, 'p1', single(0, data));
    assert.equal(r.bytesWritten, data.length);
    const sealed = await t.port.sealRestorePoint(rep, 'p1');
    assert.equal(sealed.bytesWritten, data.length, 'the cut attempt and the retry count once');
  });

  test('a forwarded copy (read stream straight into a write) cut on either side is interrupted; a retry is exact', async () => {
    await t.port.beginRestorePoint(rep, 'p2', { kind: 'regular', crashConsistent: true });
    const target = { ...rep, disk: 'os' };
    const copy = (onProgress?: (n: number) => void) =>
      t.port.writeRestorePoint(target, 'p2', t.port.readExtents({ ...src, disk: 'os' }, 'cp', whole), { onProgress });
    for (const host of [PROD, DR]) {
      await t.control.setFault(host, { kind: 'cut', afterBytes: 700_000 });
      await assert.rejects(copy(), isKind(TransferInterruptedError, true), `cut on ${host}`);
      await t.control.clearFaults(host);
    }
    let progress = 0;
    const r = await copy((n) => (progress = n));
    assert.equal(r.bytesWritten, DISK.sizeBytes);
    assert.ok(progress >= DISK.sizeBytes, 'progress reported every byte sent');
    const source = Buffer.concat(
      (await collect(t.port.readExtents({ ...src, disk: 'os' }, 'cp', whole))).map((e) => e.data),
    );
    const copied = Buffer.concat(
      (await collect(t.port.readReplicaExtents(target, { pointId: 'p2' }, whole))).map((e) => e.data),
    );
    assert.ok(copied.equals(source), 'the replica point holds the checkpoint bytes');
  });

  test('a read of a missing checkpoint forwarded into a write fails as NotFound before any upload', async () => {
    await assert.rejects(
      t.port.writeRestorePoint({ ...rep, disk: 'os' }, 'p2', t.port.readExtents({ ...src, disk: 'os' }, 'nope', whole)),
      { name: 'NotFoundError' },
    );
  });

  test('faults scoped to a method or a path hit only those calls; several of one kind add up', async () => {
    const other = { host: DR, replica: 'r-faults-2' };
    await t.port.createReplica(other, { sourceVm: 'vm1', disks: [DISK] });
    const spec = { kind: 'regular', crashConsistent: true };
    await t.control.setFault(DR, { kind: 'fail', path: `/vms/${rep.replica}/power$` });
    await t.control.setFault(DR, { kind: 'fail', status: 500, path: '/points/p-scoped$' });
    await t.control.setFault(DR, { kind: 'unreachable', method: 'DELETE' });
    const listed = (await rawRequest(`${t.lab.url}/v1/lab/faults`)).json<Record<string, unknown[]>>()[DR];
    assert.equal(listed?.length, 3, 'the three faults are listed');

    await assert.rejects(t.port.powerOn({ host: DR, vm: rep.replica }), isKind(HostFailureError, true));
    await assert.rejects(t.port.beginRestorePoint(rep, 'p-scoped', spec), isKind(HostFailureError, true));
    await assert.rejects(t.port.discardRestorePoint(rep, 'p-none'), isKind(HostUnreachableError, true));
    // Calls outside every scope go through.
    assert.equal((await t.port.powerOn({ host: DR, vm: other.replica })).state, 'Running');
    await t.port.powerOff({ host: DR, vm: other.replica });
    assert.equal((await t.port.getReplica(rep)).powerState, 'Off');
    await t.port.beginRestorePoint(rep, 'p-other', spec);

    await t.control.clearFaults(DR, 'fail');
    await t.port.beginRestorePoint(rep, 'p-scoped', spec);
    await assert.rejects(t.port.discardRestorePoint(rep, 'p-scoped'), isKind(HostUnreachableError, true));
    await t.control.clearFaults(DR);
    await t.port.discardRestorePoint(rep, 'p-scoped');

    await assert.rejects(
      t.control.setFault(DR, { kind: 'fail', path: '(' }),
      (e: unknown) => e instanceof BadRequestError && e.field === 'body.path',
    );
  });

  test('a stopped lab is unreachable', async () => {
    const gone = labPort('https://127.0.0.1:9', { timeoutMs: 2000 });
    try {
      await assert.rejects(gone.listHosts(), isKind(HostUnreachableError, true));
    } finally {
      gone.close();
    }
  });
});
