import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { EstateError, loadEstate, parseEstate } from '../../lab/estate';
import { BadRequestError } from '../../src/hypervisor/errors';
import { rawRequest } from '../tls';
import { DR, MiB, PROD, single, smallEstate, startTestLab, type TestLab } from './helpers';

const src = { host: PROD, vm: 'vm1' };
const rep = { host: DR, replica: 'r-val' };

function badField(field: string) {
  return (e: unknown): boolean => {
    assert.ok(e instanceof BadRequestError, `expected BadRequestError, got ${String(e)}`);
    assert.equal(e.field, field);
    assert.ok(e.message.includes(field), `message names ${field}: ${e.message}`);
    assert.equal(e.retryable, false);
    return true;
  };
}

describe('bad requests get a 4xx naming the field and change nothing', () => {
  let t: TestLab;
  before(async () => {
    t = await startTestLab(smallEstate({ writeRate: 0 }));
    await t.port.createReplica(rep, { sourceVm: 'vm1', disks: [{ id: 'os', sizeBytes: 4 * MiB }] });
  });
  after(async () => t.close());

  async function snapshot(): Promise<string> {
    const res = await rawRequest(`${t.lab.url}/v1/hosts/${PROD}/vms`);
    // The test power-cycles vm1 itself to write to it: how it last stopped is not the bad requests' doing.
    const vms = res.json<{ lastStop?: unknown }[]>().map(({ lastStop: _, ...v }) => v);
    const replica = await t.port.getReplica(rep);
    const refs = await t.port.listReferencePoints(src);
    return JSON.stringify([vms, replica, refs]);
  }

  test('through the adapter', async () => {
    const before1 = await snapshot();
    await assert.rejects(
      t.port.createReplica({ host: DR, replica: 'r2' }, { sourceVm: 'vm1', disks: [{ id: 'os', sizeBytes: 1000 }] }),
      badField('body.disks.0.sizeBytes'),
    );
    await assert.rejects(t.port.createCheckpoint(src, 'bad/id'), badField('params.checkpointId'));
    await assert.rejects(t.port.createCheckpoint(src, 'bad id!'), badField('params.checkpointId'));
    await assert.rejects(t.port.shutdownGuest(src, -5), badField('body.timeoutMs'));
    await assert.rejects(
      t.port.beginRestorePoint(rep, 'p1', { kind: '', crashConsistent: true }),
      badField('body.kind'),
    );
    await assert.rejects(t.port.createReferencePoint(src, 'rp', ''), badField('body.checkpointId'));
    await assert.rejects(
      t.port.blockDigests({ ...src, disk: 'os' }, 'nope', { startBlock: -1, count: 4 }),
      badField('query.startBlock'),
    );
    await assert.rejects(
      t.port.replicaBlockDigests({ ...rep, disk: 'os' }, { running: true }, { startBlock: 0, count: 0 }),
      badField('query.count'),
    );
    await t.port.createCheckpoint(src, 'cp');
    await assert.rejects(
      (async () => {
        for await (const _ of t.port.readExtents({ ...src, disk: 'os' }, 'cp', [{ offset: 100, length: 65536 }]));
      })(),
      badField('body.extents.0.offset'),
    );
    await assert.rejects(
      (async () => {
        for await (const _ of t.port.readExtents({ ...src, disk: 'os' }, 'cp', [{ offset: 0, length: 64 * MiB }]));
      })(),
      badField('body.extents.0'),
    );
    await t.port.deleteCheckpoint(src, 'cp');
    await t.port.powerOff(src);
    await assert.rejects(
      t.port.writeExtents({ ...src, disk: 'os' }, single(4096, Buffer.alloc(65536, 1))),
      badField('frames.0.offset'),
    );
    await t.port.powerOn(src);
    assert.equal(await snapshot(), before1, 'nothing changed');
  });

  test('raw HTTP: wrong types, unknown fields, malformed JSON', async () => {
    const before1 = await snapshot();
    const call = async (method: string, path: string, body?: string) => {
      const res = await rawRequest(`${t.lab.url}${path}`, {
        method,
        headers: body ? { 'content-type': 'application/json' } : {},
        ...(body !== undefined ? { body } : {}),
      });
      return { status: res.status, body: res.json<{ error: { field?: string; message: string } }>() };
    };
    let r = await call('POST', `/v1/hosts/${PROD}/vms/vm1/power`, JSON.stringify({ action: 'reboot' }));
    assert.equal(r.status, 400);
    assert.equal(r.body.error.field, 'body.action');
    r = await call(
      'PUT',
      `/v1/hosts/${DR}/replicas/r3`,
      JSON.stringify({ sourceVm: 'vm1', disks: [{ id: 'os', sizeBytes: 65536 }], extra: 1 }),
    );
    assert.equal(r.status, 400);
    assert.match(r.body.error.message, /extra/);
    r = await call('PUT', `/v1/hosts/${DR}/replicas/r3`, '{"sourceVm": ');
    assert.equal(r.status, 400);
    assert.equal(r.body.error.field, 'body');
    r = await call('GET', `/v1/hosts/${PROD}/vms/vm1/disks/os/changes?referencePointId=rp&checkpointId=cp&limit=0`);
    assert.equal(r.status, 400);
    assert.equal(r.body.error.field, 'query.limit');
    r = await call('PUT', `/v1/lab/faults/${PROD}`, JSON.stringify({ kind: 'slow' }));
    assert.equal(r.status, 400);
    assert.equal(r.body.error.field, 'body.latencyMs');
    assert.equal(await snapshot(), before1, 'nothing changed');
    assert.deepEqual((await rawRequest(`${t.lab.url}/v1/lab/faults`)).json(), {});
  });

  test('the demo estate loads: two production hosts, six VMs, one DR host', async () => {
    const estate = await loadEstate('config/estate.yaml');
    const hosts = estate.sites.flatMap((s) => s.hosts.map((h) => ({ role: s.role, ...h })));
    assert.deepEqual(
      hosts.map((h) => [h.role, h.name]),
      [
        ['production', 'prod-hv01'],
        ['production', 'prod-hv02'],
        ['dr', 'dr-hv01'],
      ],
    );
    assert.deepEqual(hosts.flatMap((h) => h.vms.map((v) => v.name)).sort(), [
      'app01',
      'app02',
      'sql01',
      'sql02',
      'web01',
      'web02',
    ]);
  });

  test('the estate file: errors name the path', () => {
    assert.throws(
      () =>
        parseEstate({
          sites: [
            {
              name: 'p',
              role: 'production',
              hosts: [{ name: 'h', vms: [{ name: 'a', disks: [{ id: 'd', size: '3KiB' }] }] }],
            },
          ],
        }),
      (e) => e instanceof EstateError && e.message.includes('sites.0.hosts.0.vms.0.disks.0.size'),
    );
    assert.throws(
      () =>
        parseEstate({
          sites: [
            {
              name: 'p',
              role: 'production',
              hosts: [{ name: 'h', vms: [{ name: 'a', disks: [{ id: 'd', size: '1MiB' }], writeRate: 'fast' }] }],
            },
          ],
        }),
      (e) => e instanceof EstateError && e.message.includes('sites.0.hosts.0.vms.0.writeRate'),
    );
    const ok = parseEstate(smallEstate());
    assert.equal(ok.sites[0]!.hosts[0]!.vms[0]!.disks[0]!.size, 4 * MiB);
  });
});
