// The lab's HTTP API. JSON for control; framed binary streams (src/host-api/frames.ts)
// for block data. Every parameter and body is checked with zod before anything changes.

import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { z } from 'zod';
import { DIGEST_ALGORITHM, digestsOfBlocks, verifyStored } from '../src/host-api/digests';
import { badRequest, conflict, HostApiError } from '../src/host-api/errors';
import type { DigestsFrame, FramePiece } from '../src/host-api/frames';
import {
  blockRange,
  checkBlockRange,
  checkExtents,
  extents,
  fenceToken,
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
import { BLOCK_SIZE, type Extent, type ExtentData, type ReplicaView } from '../src/hypervisor/port';
import { loadEstate, parseEstate, type Estate, type EstateInput } from './estate';
import { faultSchema, Faults, type FaultCall } from './faults';
import { BufferRing, LabSite, readChunks, type LabVm } from './site';
import { blocksToExtents, type Layer } from './storage/layer';
import { digestView, readView, viewAllocatedBlocks, type View } from './storage/view';

/**
 * `tls`: the lab's certificate (every host of its estate and `lab` in its subjectAltName) and key, and the site's
 * CA for its callers.
 */
export interface LabOptions extends HostApiTransportSecurity {
  estatePath?: string;
  estate?: EstateInput;
  dataDir: string;
  port?: number;
  host?: string;
  log?: (message: string) => void;
}

export interface RunningLab {
  url: string;
  site: LabSite;
  /** Clean stop: tracking and a clean-shutdown marker are saved. */
  stop(): Promise<void>;
  /** Unclean stop, as if the host lost power: nothing more is saved. */
  kill(): Promise<void>;
}

export async function startLab(options: LabOptions): Promise<RunningLab> {
  const log = options.log ?? (() => undefined);
  const host = options.host ?? '127.0.0.1';
  const https = hostApiHttps(options, host);
  let estate: Estate;
  if (options.estate) estate = parseEstate(options.estate);
  else if (options.estatePath) estate = await loadEstate(options.estatePath);
  else throw new Error('startLab needs estate or estatePath');
  const site = await LabSite.open(estate, options.dataDir, log);
  const faults = new Faults();
  const app = buildApp(site, faults, https);
  const url = await listenHostApi(app, { host, port: options.port ?? 0 }, log);
  let stopped = false;
  return {
    url,
    site,
    async stop() {
      if (stopped) return;
      stopped = true;
      await app.close();
      await site.stop(true);
    },
    async kill() {
      if (stopped) return;
      stopped = true;
      app.server.closeAllConnections();
      await app.close();
      await site.stop(false);
    },
  };
}

/** Calls that change the estate; block reads are POSTs too, and faults are the lab's own controls. */
function changesState(method: string, url: string): boolean {
  const path = url.split('?', 1)[0]!;
  return method !== 'GET' && !path.endsWith('/read') && !path.startsWith('/v1/lab/faults');
}

/** A request as faults see it: its method and decoded path (ids hold no '/', so decoding is unambiguous). */
function faultCall(request: FastifyRequest): FaultCall {
  return { method: request.method, path: decodeURIComponent(request.url.split('?', 1)[0]!) };
}

function hostOf(url: string): string | null {
  const m = /^\/v1\/hosts\/([^/?]+)/.exec(url);
  return m ? decodeURIComponent(m[1]!) : null;
}

/** Streams a read in the lab's pieces (readChunks), whose buffers the reader reuses from a BufferRing. */
function serveRead(
  request: FastifyRequest,
  reply: FastifyReply,
  extents: Extent[],
  read: (ring: BufferRing) => AsyncIterable<ExtentData>,
  cutAfter?: number,
  digests?: boolean,
): Promise<void> {
  const ring = new BufferRing(extents);
  return streamFrames(request, reply, { pieces: readChunks(extents), digests }, () => read(ring), cutAfter);
}

function buildApp(site: LabSite, faults: Faults, https: ReturnType<typeof hostApiHttps>): FastifyInstance {
  const app = hostApiServer({ log: (message) => site.log(message), https });

  /**
   * A host's injected faults, applied to a call that reaches it: `slow` delays the call, `fail` throws the
   * injected failure; an unreachable host is returned, for the caller to act on as it can.
   */
  const injectedFaults = async (host: string, call: FaultCall): Promise<'unreachable' | 'reachable'> => {
    for (const f of faults.active(host, call)) {
      if (f.kind === 'unreachable') return 'unreachable';
      if (f.kind === 'slow') await new Promise((r) => setTimeout(r, f.latencyMs));
      if (f.kind === 'fail')
        throw new HostApiError(
          f.status,
          f.status === 409 ? 'conflict' : 'host_failure',
          `host ${host} failed (injected fault)`,
        );
    }
    return 'reachable';
  };

  app.addHook('onRequest', async (request, reply) => {
    const host = hostOf(request.url);
    if (host !== null && (await injectedFaults(host, faultCall(request))) === 'unreachable') {
      request.raw.socket.destroy();
      return reply;
    }
    const refused = site.storeRefusal();
    if (refused && changesState(request.method, request.url)) throw refused;
  });

  const cutOf = (host: string, call: FaultCall): number | undefined => faults.get(host, 'cut', call)?.afterBytes;
  const vmOf = (p: { host: string; vm: string }): LabVm => site.vm(p.host, p.vm);
  const replicaOf = (p: { host: string; replica: string }): LabVm => {
    const vm = site.vm(p.host, p.replica);
    if (vm.meta.kind !== 'replica') throw conflict(`${vm.name} is not a replica`);
    return vm;
  };
  /** A read of a source disk at a checkpoint, checked (checkpoint known, extents within the disk) before it starts. */
  const checkpointRead = (
    p: { host: string; vm: string; disk: string },
    body: { checkpointId: string; extents: Extent[] },
  ) => {
    const vm = vmOf(p);
    const at = () => vm.checkpointView(p.disk, body.checkpointId);
    at();
    const disk = vm.sourceDisk(p.disk);
    checkExtents(body.extents, disk.sizeBytes, 'body.extents');
    return { disk, at };
  };
  const replicaView = (vm: LabVm, disk: string, v: ReplicaView): View => vm.replicaView(disk, v);
  /** Reads a restore point's disk as it is now, under the disk's lock (a write's proof reads back what it wrote). */
  const pointReader = (vm: LabVm, disk: string, pointId: string) => {
    const view = replicaView(vm, disk, { pointId });
    const { lock } = vm.replicaDisk(disk);
    return (e: Extent) => lock.run(() => readView(view, e.offset, e.length));
  };
  const pageOf = (blocks: number[], q: { cursor?: string | undefined; limit: number }) => {
    const { extents: list, nextBlock } = blocksToExtents(blocks, q.cursor ? Number(q.cursor) : 0, q.limit);
    return nextBlock === null ? { extents: list } : { extents: list, nextCursor: String(nextBlock) };
  };
  const presentPage = (layer: Layer | null, q: { cursor?: string | undefined; limit: number }) =>
    pageOf(layer ? [...layer.present].sort((a, b) => a - b) : [], q);

  // Inventory ---------------------------------------------------------------------------------
  app.get('/v1/hosts', () => [...site.hosts.values()]);
  app.get('/v1/hosts/:host/vms', (req) => site.listVms(parse(P.host, req.params, 'params').host));
  app.get('/v1/hosts/:host/vms/:vm', (req) => vmOf(parse(P.vm, req.params, 'params')).info());
  app.get('/v1/hosts/:host/vms/:vm/definition', (req) => {
    vmOf(parse(P.vm, req.params, 'params'));
    return { definition: null }; // a lab VM is its metadata; a lab replica gets it from the lab itself
  });
  app.put('/v1/hosts/:host/vms/:vm', async (req) => {
    const p = parse(P.vm, req.params, 'params');
    // A definition is accepted and not needed: the lab makes its VMs itself.
    const body = parse(vmSpec, req.body, 'body');
    return site.exclusive(p.vm, () => site.createVm(p.host, p.vm, body.disks));
  });

  // Power ---------------------------------------------------------------------------------------
  app.post('/v1/hosts/:host/vms/:vm/power', async (req) => {
    const vm = vmOf(parse(P.vm, req.params, 'params'));
    const body = parse(powerAction, req.body, 'body');
    if (body.action === 'shutdown') return vm.shutdownGuest(body.timeoutMs);
    return body.action === 'off' ? vm.powerOff() : vm.powerOn();
  });

  // Checkpoints and change tracking ------------------------------------------------------------
  const cpInfo = (vm: LabVm, c: { id: string; createdAt: string }) => ({
    id: c.id,
    vm: vm.name,
    createdAt: c.createdAt,
  });
  const refInfo = (vm: LabVm, r: { id: string; checkpointId: string; createdAt: string; generation: number }) => ({
    id: r.id,
    vm: vm.name,
    checkpointId: r.checkpointId,
    createdAt: r.createdAt,
    trackingValid: site.trackingValid(r),
  });
  app.put('/v1/hosts/:host/vms/:vm/checkpoints/:checkpointId', async (req) => {
    const p = parse(P.checkpoint, req.params, 'params');
    const vm = vmOf(p);
    if (vm.meta.kind !== 'source') throw conflict(`${vm.name} is a replica`);
    return cpInfo(vm, await site.exclusive(vm.name, () => site.createCheckpoint(vm, p.checkpointId)));
  });
  app.delete('/v1/hosts/:host/vms/:vm/checkpoints/:checkpointId', async (req, reply) => {
    const p = parse(P.checkpoint, req.params, 'params');
    await site.exclusive(p.vm, () => site.deleteCheckpoint(vmOf(p), p.checkpointId));
    return reply.code(204).send();
  });
  app.put('/v1/hosts/:host/vms/:vm/reference-points/:referencePointId', async (req) => {
    const p = parse(P.reference, req.params, 'params');
    const body = parse(z.strictObject({ checkpointId: id }), req.body, 'body');
    const vm = vmOf(p);
    return refInfo(
      vm,
      await site.exclusive(vm.name, () => site.createReferencePoint(vm, p.referencePointId, body.checkpointId)),
    );
  });
  app.get('/v1/hosts/:host/vms/:vm/reference-points', (req) => {
    const vm = vmOf(parse(P.vm, req.params, 'params'));
    return vm.meta.referencePoints.map((r) => refInfo(vm, r));
  });
  app.delete('/v1/hosts/:host/vms/:vm/reference-points/:referencePointId', async (req, reply) => {
    const p = parse(P.reference, req.params, 'params');
    await site.exclusive(p.vm, () => site.deleteReferencePoint(vmOf(p), p.referencePointId));
    return reply.code(204).send();
  });
  app.get('/v1/hosts/:host/vms/:vm/disks/:disk/changes', (req) => {
    const p = parse(P.disk, req.params, 'params');
    const q = parse(page.extend({ referencePointId: id, checkpointId: id }), req.query, 'query');
    return pageOf(site.changedBlocks(vmOf(p), p.disk, q.referencePointId, q.checkpointId), q);
  });
  app.get('/v1/hosts/:host/vms/:vm/disks/:disk/allocated', (req) => {
    const p = parse(P.disk, req.params, 'params');
    const q = parse(page.extend({ checkpointId: id }), req.query, 'query');
    return pageOf(viewAllocatedBlocks(vmOf(p).checkpointView(p.disk, q.checkpointId)), q);
  });
  app.get('/v1/hosts/:host/vms/:vm/disks/:disk/digests', async (req) => {
    const p = parse(P.disk, req.params, 'params');
    const q = parse(z.strictObject({ checkpointId: id, ...blockRange }), req.query, 'query');
    const vm = vmOf(p);
    const v = vm.checkpointView(p.disk, q.checkpointId);
    const disk = vm.sourceDisk(p.disk);
    checkBlockRange(q, disk.sizeBytes);
    const digests = await disk.lock.run(() => digestView(v, q.startBlock, q.count));
    return { algorithm: DIGEST_ALGORITHM, startBlock: q.startBlock, digests };
  });
  app.post('/v1/hosts/:host/vms/:vm/disks/:disk/read', (req, reply) => {
    const p = parse(P.disk, req.params, 'params');
    const body = parse(
      z.strictObject({ checkpointId: id, extents, digests: z.boolean().optional() }),
      req.body,
      'body',
    );
    const { disk, at } = checkpointRead(p, body);
    return serveRead(
      req,
      reply,
      body.extents,
      (ring) => site.readExtents(disk.lock, at, body.extents, ring),
      cutOf(p.host, faultCall(req)),
      body.digests,
    );
  });
  app.get('/v1/hosts/:host/vms/:vm/canary', async (req) => {
    const vm = vmOf(parse(P.vm, req.params, 'params'));
    const q = parse(z.strictObject({ checkpointId: id }), req.query, 'query');
    return { sequence: await vm.canarySequence(vm.checkpointView(vm.meta.disks[0]!.id, q.checkpointId)) };
  });
  app.post('/v1/hosts/:host/vms/:vm/disks/:disk/write', async (req) => {
    const p = parse(P.disk, req.params, 'params');
    const q = parse(z.strictObject({ fence: fenceToken.optional() }), req.query, 'query');
    const vm = vmOf(p);
    const disk = vm.sourceDisk(p.disk);
    if (vm.meta.powerState !== 'Off') throw conflict(`${vm.name} is ${vm.meta.powerState}; writes need it Off`);
    // Source disk writes go through copy-on-write bookkeeping that takes one buffer per run.
    const write = (piece: FramePiece) =>
      site.writeSourceDisk(
        vm,
        p.disk,
        { offset: piece.offset, data: Buffer.concat(piece.parts, piece.length) },
        q.fence,
      );
    return {
      bytesWritten: await receiveFrames(req, disk.sizeBytes, write, { cutAfter: cutOf(p.host, faultCall(req)) }),
    };
  });
  app.put('/v1/hosts/:host/vms/:vm/write-fence', async (req, reply) => {
    const p = parse(P.vm, req.params, 'params');
    const body = parse(z.strictObject({ token: fenceToken }), req.body, 'body');
    await site.exclusive(p.vm, () => site.fenceWrites(vmOf(p), body.token));
    return reply.code(204).send();
  });

  // Replica side --------------------------------------------------------------------------------
  app.put('/v1/hosts/:host/replicas/:replica', async (req) => {
    const p = parse(P.replica, req.params, 'params');
    // A definition is accepted and not needed: the lab defines its replicas itself.
    const body = parse(replicaSpec, req.body, 'body');
    return site.exclusive(p.replica, () => site.createReplica(p.host, p.replica, body.sourceVm, body.disks));
  });
  app.get('/v1/hosts/:host/replicas/:replica', (req) =>
    replicaOf(parse(P.replica, req.params, 'params')).replicaInfo(),
  );
  app.get(
    '/v1/hosts/:host/replicas/:replica/points',
    (req) => replicaOf(parse(P.replica, req.params, 'params')).replicaInfo().points,
  );
  app.put('/v1/hosts/:host/replicas/:replica/points/:pointId', async (req) => {
    const p = parse(P.point, req.params, 'params');
    const body = parse(pointSpec, req.body, 'body');
    return site.exclusive(p.replica, () => site.beginPoint(replicaOf(p), p.pointId, body));
  });
  app.post('/v1/hosts/:host/replicas/:replica/points/:pointId/disks/:disk/write', async (req) => {
    const p = parse(P.pointDisk, req.params, 'params');
    const vm = replicaOf(p);
    const layer = site.openPointLayer(vm, p.pointId, p.disk);
    const write = (piece: FramePiece) => site.writePoint(vm, p.pointId, p.disk, piece.offset, piece.parts);
    const sent: DigestsFrame[] = [];
    const bytesWritten = await receiveFrames(req, layer.sizeBytes, write, {
      cutAfter: cutOf(p.host, faultCall(req)),
      onDigests: (d) => sent.push(d),
    });
    if (sent.length === 0) return { bytesWritten };
    // The source's digests came with the data: the blocks are read back from the point and compared.
    return { bytesWritten, verification: await verifyStored(sent, pointReader(vm, p.disk, p.pointId)) };
  });
  // Host to host: the source host sends a checkpoint's blocks straight into a restore point on a DR host (QEMU's
  // push-mode backup to an NBD export); the caller only orders it. Both hosts' faults apply.
  app.post('/v1/hosts/:host/vms/:vm/disks/:disk/send', async (req) => {
    const p = parse(P.disk, req.params, 'params');
    const body = parse(
      z.strictObject({ checkpointId: id, extents, target: P.pointDisk, verify: z.boolean().optional() }),
      req.body,
      'body',
    );
    const { disk, at } = checkpointRead(p, body);
    // The DR end is reached through the source host: an unreachable one is the source host's error to report. Its
    // faults see the send as the upload into the point that it stands for.
    const t = body.target;
    const drCall = {
      method: 'POST',
      path: `/v1/hosts/${t.host}/replicas/${t.replica}/points/${t.pointId}/disks/${t.disk}/write`,
    };
    if ((await injectedFaults(t.host, drCall)) === 'unreachable')
      throw new HostApiError(502, 'host_unreachable', `host ${t.host} unreachable (injected fault)`);
    const target = replicaOf(t);
    const layer = site.openPointLayer(target, t.pointId, t.disk);
    checkExtents(body.extents, layer.sizeBytes, 'body.target.disk');
    const cuts = [cutOf(p.host, faultCall(req)), cutOf(t.host, drCall)].filter((c): c is number => c !== undefined);
    const cutAfter = cuts.length > 0 ? Math.min(...cuts) : undefined;
    let bytesWritten = 0;
    const read: { offset: number; digests: Buffer }[] = [];
    for await (const piece of site.readExtents(disk.lock, at, body.extents, new BufferRing(body.extents))) {
      if (cutAfter !== undefined && bytesWritten + piece.data.length > cutAfter)
        throw new HostApiError(
          502,
          'transfer_interrupted',
          `transfer cut after ${bytesWritten} bytes (injected fault)`,
        );
      if (body.verify) read.push({ offset: piece.offset, digests: digestsOfBlocks(piece.data) });
      await site.writePoint(target, t.pointId, t.disk, piece.offset, piece.data);
      bytesWritten += piece.data.length;
    }
    if (!body.verify) return { bytesWritten };
    // What the source read, against what the point now holds.
    return { bytesWritten, verification: await verifyStored(read, pointReader(target, t.disk, t.pointId)) };
  });
  app.post('/v1/hosts/:host/replicas/:replica/points/:pointId/seal', async (req) => {
    const p = parse(P.point, req.params, 'params');
    const body = parse(z.strictObject({ metadata: pointMetadata.optional() }), req.body, 'body');
    return site.exclusive(p.replica, () => site.sealPoint(replicaOf(p), p.pointId, body.metadata));
  });
  app.delete('/v1/hosts/:host/replicas/:replica/points/:pointId', async (req, reply) => {
    const p = parse(P.point, req.params, 'params');
    await site.exclusive(p.replica, () => site.discardPoint(replicaOf(p), p.pointId));
    return reply.code(204).send();
  });
  app.post('/v1/hosts/:host/replicas/:replica/points/:pointId/merge', async (req) => {
    const p = parse(P.point, req.params, 'params');
    return site.exclusive(p.replica, () => site.mergeOldest(replicaOf(p), p.pointId));
  });
  app.post('/v1/hosts/:host/replicas/:replica/revert', async (req) => {
    const p = parse(P.replica, req.params, 'params');
    const body = parse(z.strictObject({ pointId: id }), req.body, 'body');
    return site.exclusive(p.replica, () => site.revert(replicaOf(p), body.pointId));
  });
  app.post('/v1/hosts/:host/replicas/:replica/consolidate', async (req) => {
    const p = parse(P.replica, req.params, 'params');
    return site.exclusive(p.replica, () => site.consolidate(replicaOf(p)));
  });
  app.delete('/v1/hosts/:host/replicas/:replica/running-layer', async (req) => {
    const p = parse(P.replica, req.params, 'params');
    return site.exclusive(p.replica, () => site.discardRunning(replicaOf(p)));
  });
  app.post('/v1/hosts/:host/replicas/:replica/running-layer/seal', async (req) => {
    const p = parse(P.replica, req.params, 'params');
    const body = parse(pointSpec.extend({ pointId: id }), req.body, 'body');
    const { pointId, ...spec } = body;
    return site.exclusive(p.replica, () => site.sealRunning(replicaOf(p), pointId, spec));
  });
  app.get('/v1/hosts/:host/replicas/:replica/disks/:disk/running-extents', (req) => {
    const p = parse(P.replicaDisk, req.params, 'params');
    const q = parse(page, req.query, 'query');
    return presentPage(replicaOf(p).replicaDisk(p.disk).running, q);
  });
  app.get('/v1/hosts/:host/replicas/:replica/disks/:disk/allocated', (req) => {
    const p = parse(P.replicaDisk, req.params, 'params');
    const q = parse(page.extend(viewQuery.shape), req.query, 'query');
    if ((q.pointId === undefined) === (q.running === undefined))
      throw badRequest('query.pointId', 'give exactly one of pointId or running=true');
    const vm = replicaOf(p);
    return pageOf(viewAllocatedBlocks(replicaView(vm, p.disk, viewFromQuery(q))), q);
  });
  app.get('/v1/hosts/:host/replicas/:replica/points/:pointId/disks/:disk/extents', (req) => {
    const p = parse(P.pointDisk, req.params, 'params');
    const q = parse(page, req.query, 'query');
    const vm = replicaOf(p);
    vm.chainTo(p.pointId);
    return presentPage(vm.replicaDisk(p.disk).points.get(p.pointId) ?? null, q);
  });
  app.post('/v1/hosts/:host/replicas/:replica/disks/:disk/read', (req, reply) => {
    const p = parse(P.replicaDisk, req.params, 'params');
    const body = parse(z.strictObject({ view, extents }), req.body, 'body');
    const vm = replicaOf(p);
    const disk = vm.replicaDisk(p.disk);
    replicaView(vm, p.disk, body.view);
    checkExtents(body.extents, disk.sizeBytes, 'body.extents');
    const at = () => replicaView(vm, p.disk, body.view);
    return serveRead(
      req,
      reply,
      body.extents,
      (ring) => site.readExtents(disk.lock, at, body.extents, ring),
      cutOf(p.host, faultCall(req)),
    );
  });
  const viewFromQuery = (q: { pointId?: string | undefined }): ReplicaView =>
    q.pointId !== undefined ? { pointId: q.pointId } : { running: true };
  app.get('/v1/hosts/:host/replicas/:replica/disks/:disk/digests', async (req) => {
    const p = parse(P.replicaDisk, req.params, 'params');
    const q = parse(
      z
        .strictObject({ pointId: id.optional(), running: z.enum(['true']).optional(), ...blockRange })
        .refine(
          (v) => (v.pointId === undefined) !== (v.running === undefined),
          'give exactly one of pointId or running=true',
        ),
      req.query,
      'query',
    );
    const vm = replicaOf(p);
    const disk = vm.replicaDisk(p.disk);
    checkBlockRange(q, disk.sizeBytes);
    const v = replicaView(vm, p.disk, viewFromQuery(q));
    const digests = await disk.lock.run(() => digestView(v, q.startBlock, q.count));
    return { algorithm: DIGEST_ALGORITHM, startBlock: q.startBlock, digests };
  });
  app.get('/v1/hosts/:host/replicas/:replica/canary', async (req) => {
    const p = parse(P.replica, req.params, 'params');
    const q = parse(viewQuery, req.query, 'query');
    const vm = replicaOf(p);
    return { sequence: await vm.canarySequence(replicaView(vm, vm.meta.disks[0]!.id, viewFromQuery(q))) };
  });

  // Backups -------------------------------------------------------------------------------------
  app.get('/v1/backups', (req) => {
    const q = parse(z.strictObject({ vm: id }), req.query, 'query');
    return [...site.backups.values()].map((b) => b.meta).filter((b) => b.vm === q.vm);
  });
  const B = z.strictObject({ backupId: id, disk: id });
  app.get('/v1/backups/:backupId/disks/:disk/extents', (req) => {
    const p = parse(B, req.params, 'params');
    const q = parse(page, req.query, 'query');
    return presentPage(site.backupLayer(p.backupId, p.disk), q);
  });
  app.post('/v1/backups/:backupId/disks/:disk/read', (req, reply) => {
    const p = parse(B, req.params, 'params');
    const body = parse(z.strictObject({ extents }), req.body, 'body');
    const layer = site.backupLayer(p.backupId, p.disk);
    checkExtents(body.extents, layer.sizeBytes, 'body.extents');
    const backupView: View = { layers: [], base: layer };
    const unlocked = { run: <T>(fn: () => Promise<T>) => fn() };
    return serveRead(req, reply, body.extents, (ring) =>
      site.readExtents(unlocked, () => backupView, body.extents, ring),
    );
  });

  // Lab control (tests, demo, benchmarks): not part of the hypervisor port -----------------------
  app.get('/v1/lab/status', () => ({
    generation: site.generation,
    trackingLostAtStart: site.trackingLostAtStart,
    storeFailure: site.storeRefusal()?.message ?? null,
  }));
  app.get('/v1/lab/faults', () => faults.list());
  app.put('/v1/lab/faults/:host', (req) => {
    const p = parse(P.host, req.params, 'params');
    site.host(p.host);
    const fault = parse(faultSchema, req.body, 'body');
    faults.set(p.host, fault);
    return faults.active(p.host);
  });
  app.delete('/v1/lab/faults/:host', (req, reply) => {
    const p = parse(P.host, req.params, 'params');
    const q = parse(
      z.strictObject({ kind: z.enum(['unreachable', 'fail', 'slow', 'cut']).optional() }),
      req.query,
      'query',
    );
    faults.clear(p.host, q.kind);
    return reply.code(204).send();
  });
  const labVm = (name: string): LabVm => {
    const vm = site.vms.get(name);
    if (!vm) throw new HostApiError(404, 'not_found', `VM ${name} not found`, 'vm');
    return vm;
  };
  app.post('/v1/lab/vms/:vm/guest-writes', async (req) => {
    const p = parse(z.strictObject({ vm: id }), req.params, 'params');
    const vm = labVm(p.vm);
    const disk = vm.meta.disks.find((d) => d.id === (req.body as { disk?: unknown } | undefined)?.disk);
    const body = parse(
      z.strictObject({
        disk: id,
        blocks: z
          .array(
            z
              .number()
              .int()
              .nonnegative()
              .max((disk?.sizeBytes ?? BLOCK_SIZE) / BLOCK_SIZE - 2),
          )
          .min(1)
          .max(4096),
      }),
      req.body,
      'body',
    );
    if (!disk) throw new HostApiError(404, 'not_found', `disk ${p.vm}/${body.disk} not found`, 'body.disk');
    if (!vm.guest || vm.meta.powerState !== 'Running')
      throw conflict(`${vm.name} is ${vm.meta.powerState}; its guest is not running`);
    return { sequence: await vm.guest.writeBlocks(body.disk, body.blocks) };
  });
  app.get('/v1/lab/vms/:vm/disks/:disk/blocks/:block', async (req, reply) => {
    const p = parse(
      z.strictObject({ vm: id, disk: id, block: z.coerce.number().int().nonnegative() }),
      req.params,
      'params',
    );
    const vm = labVm(p.vm);
    const v = vm.currentView(p.disk);
    if (p.block >= v.base.blocks) throw badRequest('params.block', 'past the end of the disk');
    const data = await readView(v, p.block * BLOCK_SIZE, BLOCK_SIZE);
    return reply.type('application/octet-stream').send(data);
  });
  app.post('/v1/lab/vms/:vm/disks/:disk/blocks/:block/corrupt', async (req, reply) => {
    const p = parse(
      z.strictObject({ vm: id, disk: id, block: z.coerce.number().int().nonnegative() }),
      req.params,
      'params',
    );
    const body = parse(
      z.strictObject({ layer: z.union([z.literal('base'), z.strictObject({ pointId: id })]) }),
      req.body,
      'body',
    );
    const vm = labVm(p.vm);
    const disk = vm.meta.disks.find((d) => d.id === p.disk);
    if (!disk) throw new HostApiError(404, 'not_found', `disk ${p.vm}/${p.disk} not found`, 'params.disk');
    if (p.block >= disk.sizeBytes / BLOCK_SIZE) throw badRequest('params.block', 'past the end of the disk');
    await site.corruptBlock(vm, p.disk, p.block, body.layer);
    return reply.code(204).send();
  });
  app.post('/v1/lab/vms/:vm/backups', async (req) => {
    const vm = labVm(parse(z.strictObject({ vm: id }), req.params, 'params').vm);
    if (vm.meta.kind !== 'source') throw conflict(`${vm.name} is a replica`);
    return site.exclusive(vm.name, () => site.takeBackup(vm));
  });

  return app;
}
