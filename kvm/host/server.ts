// The host process of a KVM host: the host API (src/host-api/) served for this one host, over its local libvirt.
// The orchestrator reaches it with the same adapter as the lab.
import type { FastifyInstance } from 'fastify';
import { z } from 'zod';
import { HostApiError, notFound } from '../../src/host-api/errors';
import { framedLength } from '../../src/host-api/frames';
import {
  blockRange,
  checkBlockRange,
  checkExtents,
  extents,
  id,
  page,
  params as P,
  parse,
  powerAction,
} from '../../src/host-api/schemas';
import { hostApiServer, streamFrames } from '../../src/host-api/server';
import type { Extent, HostInfo, SiteRole } from '../../src/hypervisor/port';
import { Virsh } from '../libvirt/virsh';
import { KvmSourceDomains, readPieces } from './source-domains';

export interface KvmHostOptions {
  name: string;
  site: string;
  role: SiteRole;
  /** libvirt's connection URI on this host (`qemu:///system` for the host's own daemon). */
  libvirtUri: string;
  stateDir: string;
  port?: number;
  listen?: string;
  log?: (message: string) => void;
}

export interface RunningKvmHost {
  url: string;
  stop(): Promise<void>;
}

/** A page of extents in the host API's form; the cursor is the byte offset the next page starts at. */
function pageOf(all: Extent[], q: { cursor?: string | undefined; limit: number }) {
  const from = q.cursor ? Number(q.cursor) : 0;
  const rest = all.filter((e) => e.offset + e.length > from);
  const extents = rest
    .slice(0, q.limit)
    .map((e) => (e.offset < from ? { offset: from, length: e.offset + e.length - from } : e));
  if (rest.length <= q.limit) return { extents };
  const last = extents.at(-1)!;
  return { extents, nextCursor: String(last.offset + last.length) };
}

const notOnKvmYet = (what: string) =>
  new HostApiError(501, 'not_implemented', `${what} is not served by KVM hosts yet (only by the lab)`);

export async function startKvmHost(options: KvmHostOptions): Promise<RunningKvmHost> {
  const log = options.log ?? (() => undefined);
  const domains = await KvmSourceDomains.open({
    host: options.name,
    virsh: new Virsh(options.libvirtUri),
    stateDir: options.stateDir,
    log,
  });
  const app = buildApp(options, domains, log);
  await app.listen({ port: options.port ?? 0, host: options.listen ?? '127.0.0.1' });
  const address = app.server.address();
  if (address === null || typeof address === 'string') throw new Error('no TCP address');
  return {
    url: `http://${options.listen ?? '127.0.0.1'}:${address.port}`,
    async stop() {
      app.server.closeAllConnections();
      await app.close();
      await domains.close();
    },
  };
}

function buildApp(options: KvmHostOptions, domains: KvmSourceDomains, log: (m: string) => void): FastifyInstance {
  const app = hostApiServer({ log });
  const self: HostInfo = { name: options.name, site: options.site, role: options.role };
  /** Path parameters, checked, for this host only: a call for another host reached the wrong process. */
  const at = <S extends z.ZodType<{ host: string }>>(schema: S, value: unknown): z.output<S> => {
    const p = parse(schema, value, 'params');
    if (p.host !== options.name) throw notFound(`host ${p.host} (this is ${options.name})`, 'params.host');
    return p;
  };

  app.get('/v1/hosts', () => [self]);
  app.get('/v1/hosts/:host/vms', (req) => {
    at(P.host, req.params);
    return domains.listVms();
  });
  app.get('/v1/hosts/:host/vms/:vm', (req) => domains.getVm(at(P.vm, req.params).vm));
  app.post('/v1/hosts/:host/vms/:vm/power', async (req) => {
    const { vm } = at(P.vm, req.params);
    const body = parse(powerAction, req.body, 'body');
    if (body.action === 'shutdown') return domains.shutdownGuest(vm, body.timeoutMs);
    return body.action === 'off' ? domains.powerOff(vm) : domains.powerOn(vm);
  });

  app.put('/v1/hosts/:host/vms/:vm/checkpoints/:checkpointId', (req) => {
    const p = at(P.checkpoint, req.params);
    return domains.createCheckpoint(p.vm, p.checkpointId);
  });
  app.delete('/v1/hosts/:host/vms/:vm/checkpoints/:checkpointId', async (req, reply) => {
    const p = at(P.checkpoint, req.params);
    await domains.deleteCheckpoint(p.vm, p.checkpointId);
    return reply.code(204).send();
  });
  app.put('/v1/hosts/:host/vms/:vm/reference-points/:referencePointId', (req) => {
    const p = at(P.reference, req.params);
    const body = parse(z.strictObject({ checkpointId: id }), req.body, 'body');
    return domains.createReferencePoint(p.vm, p.referencePointId, body.checkpointId);
  });
  app.get('/v1/hosts/:host/vms/:vm/reference-points', (req) => domains.listReferencePoints(at(P.vm, req.params).vm));
  app.delete('/v1/hosts/:host/vms/:vm/reference-points/:referencePointId', async (req, reply) => {
    const p = at(P.reference, req.params);
    await domains.deleteReferencePoint(p.vm, p.referencePointId);
    return reply.code(204).send();
  });
  app.get('/v1/hosts/:host/vms/:vm/disks/:disk/changes', async (req) => {
    const p = at(P.disk, req.params);
    const q = parse(page.extend({ referencePointId: id, checkpointId: id }), req.query, 'query');
    return pageOf(await domains.changedExtents(p.vm, p.disk, q.referencePointId, q.checkpointId), q);
  });
  app.get('/v1/hosts/:host/vms/:vm/disks/:disk/allocated', async (req) => {
    const p = at(P.disk, req.params);
    const q = parse(page.extend({ checkpointId: id }), req.query, 'query');
    return pageOf(await domains.allocatedExtents(p.vm, p.disk, q.checkpointId), q);
  });
  app.get('/v1/hosts/:host/vms/:vm/disks/:disk/digests', async (req) => {
    const p = at(P.disk, req.params);
    const q = parse(z.strictObject({ checkpointId: id, ...blockRange }), req.query, 'query');
    checkBlockRange(q, domains.viewDiskSize(p.vm, q.checkpointId, p.disk));
    return domains.blockDigests(p.vm, p.disk, q.checkpointId, q);
  });
  app.post('/v1/hosts/:host/vms/:vm/disks/:disk/read', async (req, reply) => {
    const p = at(P.disk, req.params);
    const body = parse(z.strictObject({ checkpointId: id, extents }), req.body, 'body');
    checkExtents(body.extents, domains.viewDiskSize(p.vm, body.checkpointId, p.disk), 'body.extents');
    // Connected before the answer starts, so a view that is gone is an error and not a short stream.
    await domains.viewExport(p.vm, body.checkpointId, p.disk);
    return streamFrames(req, reply, framedLength(readPieces(body.extents)), () =>
      domains.readExtents(p.vm, p.disk, body.checkpointId, body.extents),
    );
  });
  app.get('/v1/hosts/:host/vms/:vm/canary', async (req) => {
    const p = at(P.vm, req.params);
    const q = parse(z.strictObject({ checkpointId: id }), req.query, 'query');
    return { sequence: await domains.readCanary(p.vm, q.checkpointId) };
  });

  // What KVM hosts do not serve yet: answered as such, never as a success or a plain 404 a caller could ignore.
  const later: [string, string, string][] = [
    ['PUT', '/v1/hosts/:host/vms/:vm', 'creating a VM'],
    ['POST', '/v1/hosts/:host/vms/:vm/disks/:disk/write', 'writing a powered-off disk'],
    ['PUT', '/v1/hosts/:host/vms/:vm/write-fence', 'a write fence'],
    ['POST', '/v1/hosts/:host/vms/:vm/disks/:disk/send', 'sending host to host'],
    ['GET', '/v1/backups', 'a backup repository'],
  ];
  for (const [method, url, what] of later)
    app.route({
      method: method,
      url,
      handler: () => {
        throw notOnKvmYet(what);
      },
    });
  app.all('/v1/hosts/:host/replicas/*', () => {
    throw notOnKvmYet('the replica side');
  });
  return app;
}
