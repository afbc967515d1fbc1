// The host process of a KVM host: the host API (src/host-api/) served for this one host, over its local libvirt.
// The orchestrator reaches it with the same adapter as the lab.
import { resolve } from 'node:path';
import type { FastifyInstance, FastifyReply } from 'fastify';
import { z } from 'zod';
import { badRequest, conflict, notFound } from '../src/host-api/errors';
import {
  blockRange,
  checkBlockRange,
  checkExtents,
  extents,
  fenceToken,
  type HostJobRunning,
  id,
  page,
  params as P,
  parse,
  pointMetadata,
  pointSpec,
  powerAction,
  replicaSpec,
  view,
  viewQuery,
  vmSpec,
} from '../src/host-api/schemas';
import {
  hostApiHttps,
  hostApiServer,
  listenHostApi,
  receiveFrames,
  streamFrames,
  type HostApiTransportSecurity,
} from '../src/host-api/server';
import type { Extent, HostInfo, ReplicaInfo, ReplicaView, SiteRole } from '../src/hypervisor/port';
import { DEFAULT_BOOT_FILE_DIRS } from './definition';
import { ambiguousDomainName, Virsh } from './libvirt/virsh';
import { ManagedDomains } from './managed-domains';
import { KvmReplicas, notOnKvmYet } from './replicas';
import { KvmSourceDomains, readPieces } from './source-domains';
import { HostState } from './state';

/** `tls`: this host's certificate (its name in subjectAltName) and key, and the site's CA for its callers. */
export interface KvmHostOptions extends HostApiTransportSecurity {
  name: string;
  site: string;
  role: SiteRole;
  /** libvirt's connection URI on this host (`qemu:///system` for the host's own daemon). */
  libvirtUri: string;
  stateDir: string;
  /**
   * The file that lists the libvirt domains the agent may act on as source VMs (one name a line; read again when it
   * changes); none: no source domain (a DR host, whose replicas are its own).
   */
  domainsFile?: string;
  /** An upload that sends nothing for this long is cut off, letting go of what it holds. Default 60 s. */
  uploadStallMs?: number;
  /** How long a request waits for a long operation (merge, consolidation) before it answers 202. Default 2 s. */
  jobWaitMs?: number;
  /** A live commit's rate limit in MiB/s (tests make a commit last); none: as fast as the storage goes. */
  commitBandwidthMiBps?: number;
  /** Where the firmware and kernels that domain definitions name may come from (DEFAULT_BOOT_FILE_DIRS). */
  bootFileDirs?: readonly string[];
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

export async function startKvmHost(options: KvmHostOptions): Promise<RunningKvmHost> {
  const log = options.log ?? (() => undefined);
  const listen = options.listen ?? '127.0.0.1';
  // Refused before anything is touched: a root API reachable without a client certificate must not start.
  const https = hostApiHttps(options, listen);
  // qcow2 backing names and libvirt's socket and scratch paths are absolute: a relative directory would break them.
  const stateDir = resolve(options.stateDir);
  const state = await HostState.load(stateDir);
  const virsh = new Virsh(options.libvirtUri);
  const managed = await ManagedDomains.open(options.domainsFile ?? null, log);
  const bootFileDirs = options.bootFileDirs ?? DEFAULT_BOOT_FILE_DIRS;
  const domains = await KvmSourceDomains.open({
    managed,
    host: options.name,
    virsh,
    stateDir,
    state,
    bootFileDirs,
    log,
  });
  const replicas = new KvmReplicas({
    host: options.name,
    stateDir,
    state,
    virsh,
    bootFileDirs,
    ...(options.jobWaitMs !== undefined ? { jobWaitMs: options.jobWaitMs } : {}),
    ...(options.commitBandwidthMiBps !== undefined ? { commitBandwidthMiBps: options.commitBandwidthMiBps } : {}),
  });
  await replicas.stopLeftoverExports();
  replicas.resumeRecordedOperations();
  const app = buildApp(options, https, domains, replicas, log);
  const url = await listenHostApi(app, { host: listen, port: options.port ?? 0 }, log);
  return {
    url,
    async stop() {
      app.server.closeAllConnections();
      await app.close();
      await domains.close();
      await replicas.close();
    },
  };
}

function buildApp(
  options: KvmHostOptions,
  https: ReturnType<typeof hostApiHttps>,
  domains: KvmSourceDomains,
  replicas: KvmReplicas,
  log: (m: string) => void,
): FastifyInstance {
  const app = hostApiServer({ log, https });
  const self: HostInfo = { name: options.name, site: options.site, role: options.role };
  /** Path parameters, checked, for this host only: a call for another host reached the wrong process. */
  const at = <S extends z.ZodType<{ host: string }>>(schema: S, value: unknown): z.output<S> => {
    const p = parse(schema, value, 'params');
    if (p.host !== options.name) throw notFound(`host ${p.host} (this is ${options.name})`, 'params.host');
    return p;
  };

  // The agent acts only on what it manages: a source domain under its care or one of its replicas. Any other domain of
  // the host is answered as unknown, whatever the route; a new VM (PUT) is checked by createVm itself.
  app.addHook('preHandler', async (req) => {
    const vm = (req.params as { vm?: unknown } | undefined)?.vm;
    if (typeof vm !== 'string' || (req.method === 'PUT' && req.routeOptions.url === '/v1/hosts/:host/vms/:vm')) return;
    if (!replicas.has(vm) && !(await domains.isManaged(vm))) throw notFound(`VM ${vm}`, 'vm');
  });

  app.get('/v1/hosts', () => [self]);
  // A replica is a VM of its DR host too (powered on at failover); its domain carries the replica's name.
  app.get('/v1/hosts/:host/vms', async (req) => {
    at(P.host, req.params);
    const sources = await domains.listVms();
    const replicaVms = await Promise.all(replicas.names().map((r) => replicas.vmInfo(r)));
    return [...sources, ...replicaVms];
  });
  app.get('/v1/hosts/:host/vms/:vm', (req) => {
    const { vm } = at(P.vm, req.params);
    return replicas.has(vm) ? replicas.vmInfo(vm) : domains.getVm(vm);
  });
  app.put('/v1/hosts/:host/vms/:vm', (req) => {
    const { vm } = at(P.vm, req.params);
    if (options.role !== 'production') throw conflict(`host ${options.name} is not a production host`);
    const ambiguous = ambiguousDomainName(vm);
    if (ambiguous) throw badRequest('params.vm', ambiguous);
    return domains.createVm(vm, parse(vmSpec, req.body, 'body'));
  });
  app.get('/v1/hosts/:host/vms/:vm/definition', async (req) => {
    const { vm } = at(P.vm, req.params);
    return { definition: replicas.has(vm) ? replicas.definition(vm) : await domains.definition(vm) };
  });
  app.post('/v1/hosts/:host/vms/:vm/power', async (req) => {
    const { vm } = at(P.vm, req.params);
    const body = parse(powerAction, req.body, 'body');
    const target = replicas.has(vm) ? replicas : domains;
    if (body.action === 'shutdown') return target.shutdownGuest(vm, body.timeoutMs);
    if (body.action === 'off') return target.powerOff(vm);
    // A source domain is the machine itself: only a replica's domain is made anew, with or without its MACs.
    return target === replicas ? replicas.powerOn(vm, { sourceOff: body.sourceOff }) : domains.powerOn(vm);
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
    const body = parse(
      z.strictObject({ checkpointId: id, extents, digests: z.boolean().optional() }),
      req.body,
      'body',
    );
    checkExtents(body.extents, domains.viewDiskSize(p.vm, body.checkpointId, p.disk), 'body.extents');
    // Connected before the answer starts, so a view that is gone is an error and not a short stream.
    await domains.viewExport(p.vm, body.checkpointId, p.disk);
    return streamFrames(req, reply, { pieces: readPieces(body.extents), digests: body.digests }, () =>
      domains.readExtents(p.vm, p.disk, body.checkpointId, body.extents),
    );
  });
  app.post('/v1/hosts/:host/vms/:vm/disks/:disk/write', async (req) => {
    const p = at(P.disk, req.params);
    const q = parse(z.strictObject({ fence: fenceToken.optional() }), req.query, 'query');
    const bytesWritten = await domains.writeDisk(p.vm, p.disk, q.fence, (sizeBytes, write) =>
      receiveFrames(req, sizeBytes, write, { stallMs: options.uploadStallMs ?? 60_000 }),
    );
    return { bytesWritten };
  });
  app.put('/v1/hosts/:host/vms/:vm/write-fence', async (req, reply) => {
    const p = at(P.vm, req.params);
    await domains.fenceWrites(p.vm, parse(z.strictObject({ token: fenceToken }), req.body, 'body').token);
    return reply.code(204).send();
  });
  app.get('/v1/hosts/:host/vms/:vm/canary', async (req) => {
    const p = at(P.vm, req.params);
    const q = parse(z.strictObject({ checkpointId: id }), req.query, 'query');
    return { sequence: await domains.readCanary(p.vm, q.checkpointId) };
  });

  // Replica side: restore points as qcow2 chains ---------------------------------------------------
  const viewOf = (q: { pointId?: string | undefined }): ReplicaView =>
    q.pointId !== undefined ? { pointId: q.pointId } : { running: true };
  app.put('/v1/hosts/:host/replicas/:replica', (req) => {
    const p = at(P.replica, req.params);
    const body = parse(replicaSpec, req.body, 'body');
    const ambiguous = ambiguousDomainName(p.replica);
    if (ambiguous) throw badRequest('params.replica', ambiguous);
    // A point's file of a disk is `<point>.<disk>.qcow2`: a disk id with a dot could name another point's file.
    body.disks.forEach((d, i) => {
      if (d.id.includes('.')) throw badRequest(`body.disks.${i}.id`, 'a disk id of a KVM replica has no "."');
    });
    return replicas.createReplica(p.replica, body.sourceVm, body.disks, body.definition);
  });
  app.get('/v1/hosts/:host/replicas/:replica', (req) => replicas.getReplica(at(P.replica, req.params).replica));
  app.get('/v1/hosts/:host/replicas/:replica/points', (req) =>
    replicas.listRestorePoints(at(P.replica, req.params).replica),
  );
  app.put('/v1/hosts/:host/replicas/:replica/points/:pointId', (req) => {
    const p = at(P.point, req.params);
    return replicas.beginRestorePoint(p.replica, p.pointId, parse(pointSpec, req.body, 'body'));
  });
  app.post('/v1/hosts/:host/replicas/:replica/points/:pointId/disks/:disk/write', async (req) => {
    const p = at(P.pointDisk, req.params);
    return replicas.writePoint(p.replica, p.pointId, p.disk, (sizeBytes, write, onDigests) =>
      receiveFrames(req, sizeBytes, write, { stallMs: options.uploadStallMs ?? 60_000, onDigests }),
    );
  });
  app.post('/v1/hosts/:host/replicas/:replica/points/:pointId/seal', (req) => {
    const p = at(P.point, req.params);
    const body = parse(z.strictObject({ metadata: pointMetadata.optional() }), req.body, 'body');
    return replicas.sealRestorePoint(p.replica, p.pointId, body.metadata);
  });
  app.delete('/v1/hosts/:host/replicas/:replica/points/:pointId', async (req, reply) => {
    const p = at(P.point, req.params);
    await replicas.discardRestorePoint(p.replica, p.pointId);
    return reply.code(204).send();
  });
  // Long operations: the result once they end within a short wait, else 202 and what runs (asked again, followed).
  const resultOrRunning = (reply: FastifyReply, out: ReplicaInfo | HostJobRunning) =>
    'job' in out ? reply.code(202).send(out) : out;
  app.post('/v1/hosts/:host/replicas/:replica/points/:pointId/merge', async (req, reply) => {
    const p = at(P.point, req.params);
    return resultOrRunning(reply, await replicas.mergeOldest(p.replica, p.pointId));
  });
  app.get('/v1/hosts/:host/replicas/:replica/disks/:disk/allocated', async (req) => {
    const p = at(P.replicaDisk, req.params);
    const q = parse(page.extend({ pointId: id.optional(), running: z.enum(['true']).optional() }), req.query, 'query');
    return pageOf(await replicas.allocatedExtents(p.replica, viewOf(q), p.disk), q);
  });
  app.get('/v1/hosts/:host/replicas/:replica/points/:pointId/disks/:disk/extents', async (req) => {
    const p = at(P.pointDisk, req.params);
    return pageOf(await replicas.pointExtents(p.replica, p.pointId, p.disk), parse(page, req.query, 'query'));
  });
  app.post('/v1/hosts/:host/replicas/:replica/disks/:disk/read', (req, reply) => {
    const p = at(P.replicaDisk, req.params);
    const body = parse(z.strictObject({ view, extents }), req.body, 'body');
    checkExtents(body.extents, replicas.viewDiskSize(p.replica, body.view, p.disk), 'body.extents');
    return streamFrames(req, reply, { pieces: readPieces(body.extents) }, () =>
      replicas.readExtents(p.replica, body.view, p.disk, body.extents),
    );
  });
  app.get('/v1/hosts/:host/replicas/:replica/disks/:disk/digests', (req) => {
    const p = at(P.replicaDisk, req.params);
    const q = parse(
      z.strictObject({ pointId: id.optional(), running: z.enum(['true']).optional(), ...blockRange }),
      req.query,
      'query',
    );
    checkBlockRange(q, replicas.viewDiskSize(p.replica, viewOf(q), p.disk));
    return replicas.blockDigests(p.replica, viewOf(q), p.disk, q);
  });
  app.get('/v1/hosts/:host/replicas/:replica/canary', async (req) => {
    const p = at(P.replica, req.params);
    const q = parse(viewQuery, req.query, 'query');
    return { sequence: await replicas.readCanary(p.replica, viewOf(q)) };
  });
  app.post('/v1/hosts/:host/replicas/:replica/revert', (req) => {
    const p = at(P.replica, req.params);
    return replicas.revert(p.replica, parse(z.strictObject({ pointId: id }), req.body, 'body').pointId);
  });
  app.post('/v1/hosts/:host/replicas/:replica/consolidate', async (req, reply) =>
    resultOrRunning(reply, await replicas.consolidate(at(P.replica, req.params).replica)),
  );
  app.delete('/v1/hosts/:host/replicas/:replica/running-layer', (req) =>
    replicas.discardRunningLayer(at(P.replica, req.params).replica),
  );
  app.post('/v1/hosts/:host/replicas/:replica/running-layer/seal', (req) => {
    const p = at(P.replica, req.params);
    const { pointId, ...spec } = parse(pointSpec.extend({ pointId: id }), req.body, 'body');
    return replicas.sealRunningLayer(p.replica, pointId, spec);
  });
  app.get('/v1/hosts/:host/replicas/:replica/disks/:disk/running-extents', async (req) => {
    const p = at(P.replicaDisk, req.params);
    return pageOf(await replicas.runningLayerExtents(p.replica, p.disk), parse(page, req.query, 'query'));
  });
  // What KVM hosts do not serve yet: answered as such, never as a success or a plain 404 a caller could ignore.
  const later: [string, string, string][] = [
    ['POST', '/v1/hosts/:host/vms/:vm/disks/:disk/send', 'sending host to host'],
    ['GET', '/v1/backups', 'a backup repository'],
  ];
  for (const [method, url, what] of later)
    app.route({
      method,
      url,
      handler: () => {
        throw notOnKvmYet(what);
      },
    });
  return app;
}
