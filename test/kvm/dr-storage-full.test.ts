import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { request } from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { startKvmHost, type RunningKvmHost } from '../../agent/server';
import { CAPABILITIES_CACHE, LibvirtInstance } from '../../kvm/libvirt/instance';
import { blockDigest } from '../../src/host-api/digests';
import { encodeFrames } from '../../src/host-api/frames';
import type { HostApiHypervisor } from '../../src/hypervisor/host-api-adapter';
import { BLOCK_SIZE, type ExtentData } from '../../src/hypervisor/port';
import { chaosTools, LoopFilesystem, PowerCutLayer } from '../chaos/storage';
import { kvmPort, testClientTls, testServerTls } from '../tls';

const HOST = 'kvm-dr-full';
const replica = { host: HOST, replica: 'vm7_replica' };
const disk = { ...replica, disk: 'vda' };
const DISK_BYTES = 16 * 1024 * 1024;
const DATA = randomBytes(8 * 1024 * 1024);

async function* one(data: Buffer): AsyncGenerator<ExtentData> {
  yield { offset: 0, data };
}

/** An upload that stops before its END frame until `beforeEnd` has run: the agent has the writes, not the flush. */
async function uploadHeldBeforeEnd(url: string, pointId: string, beforeEnd: () => Promise<void>): Promise<number> {
  const frames: Buffer[] = [];
  for await (const f of encodeFrames(one(DATA))) frames.push(f);
  const end = frames.pop()!;
  const tls = testClientTls();
  const req = request(`${url}/v1/hosts/${HOST}/replicas/${replica.replica}/points/${pointId}/disks/vda/write`, {
    method: 'POST',
    headers: { 'content-type': 'application/octet-stream' },
    ca: readFileSync(tls.ca),
    cert: readFileSync(tls.cert),
    key: readFileSync(tls.key),
    checkServerIdentity: () => undefined,
  });
  const status = new Promise<number>((resolve, reject) => {
    req.on('response', (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode ?? 0));
    });
    req.on('error', reject);
  });
  for (const f of frames) req.write(f);
  // The agent writes what arrives as it arrives; the flush waits for the END frame.
  await new Promise((r) => setTimeout(r, 1500));
  await beforeEnd();
  req.end(end);
  return status;
}

// The DR storage fills up between a write and its flush (the fault suite's "DR storage full", seed 1669140388):
// QEMU then fails every later flush of that image, also once the space is back, so the agent must not keep the
// writer daemon that failed.
describe('a KVM DR host whose storage filled up between a write and its flush', () => {
  let dir: string;
  let fs: LoopFilesystem;
  let layer: PowerCutLayer;
  let libvirt: LibvirtInstance;
  let host: RunningKvmHost;
  let port: HostApiHypervisor;

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'pf-drfull-'));
    // The state on storage that behaves like a disk with a write cache: writes held until flushed, as on ext4.
    fs = await LoopFilesystem.create({
      image: join(dir, 'storage.img'),
      mountPoint: join(dir, 'storage'),
      sizeMiB: 48,
    });
    mkdirSync(join(fs.mountPoint, 'state'));
    layer = await PowerCutLayer.mount({
      binary: chaosTools().powercut,
      backing: join(fs.mountPoint, 'state'),
      mountPoint: join(dir, 'state'),
    });
    libvirt = await LibvirtInstance.start({ dir: join(dir, 'libvirt'), capabilitiesCache: CAPABILITIES_CACHE });
    host = await startKvmHost({
      name: HOST,
      site: 'dr',
      role: 'dr',
      libvirtUri: libvirt.virsh.uri,
      stateDir: layer.mountPoint,
      tls: await testServerTls([HOST]),
    });
    port = kvmPort(host.url, HOST);
    await port.createReplica(replica, { sourceVm: 'vm7', disks: [{ id: 'vda', sizeBytes: DISK_BYTES }] });
    await port.beginRestorePoint(replica, 'p1', { kind: 'regular', crashConsistent: true });
  });

  after(async () => {
    port?.close();
    await host?.stop();
    await libvirt?.stop();
    await layer?.unmount();
    await fs?.unmount();
    rmSync(dir, { recursive: true, force: true });
  });

  test('the failed flush is an error, and once the space is back the same writes are stored without a restart', async () => {
    const status = await uploadHeldBeforeEnd(host.url, 'p1', () => fs.fill().then(() => undefined));
    assert.equal(status, 500, 'a flush that found no room is not an acknowledged write');
    await fs.free();
    // The sender repeats its writes, as a copy retries its batch.
    assert.deepEqual(await port.writeRestorePoint(disk, 'p1', one(DATA)), { bytesWritten: DATA.length });
    await port.sealRestorePoint(replica, 'p1');
    const blocks = DATA.length / BLOCK_SIZE;
    const { digests } = await port.replicaBlockDigests(disk, { pointId: 'p1' }, { startBlock: 0, count: blocks });
    assert.deepEqual(
      digests,
      Array.from({ length: blocks }, (_, b) => blockDigest(DATA.subarray(b * BLOCK_SIZE, (b + 1) * BLOCK_SIZE))),
    );
  });
});
