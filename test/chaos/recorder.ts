// The workers reach the hosts (the lab, or each KVM host process) through this recorder, in the suite's own process:
// it forwards every call and writes down what the host was told to do, so that the invariants rest on what happened on the host, not on what the
// workflows report. It records
//  - every power call and the host's answer;
//  - the image of every checkpoint a session takes, read before the answer goes back (a checkpoint never
//    changes, so each restore point copied from it can later be compared with it, byte for byte);
//  - a production VM's image when it goes off and again just before it is powered on: nothing may change it
//    while it is off, except a failback, and then it must boot exactly its failback-protective point.
// When a host is down it answers 502, as a dead host behind a load balancer would. It listens once per host server
// (one for the lab, one per KVM host process), so that it knows where each call goes.
import type http from 'node:http';
import type https from 'node:https';
import { type AddressInfo } from 'node:net';
import { replicaNameOf } from '../../src/activities/inventory';
import type { ServerTlsFiles } from '../../src/host-api/certificates';
import type { HypervisorPort } from '../../src/hypervisor/port';
import { forwardTo, labAgent, standInForLab } from '../forward';
import { pointDigest, sourceDigest, type DiskShape } from './images';

export interface PowerRecord {
  at: number;
  host: string;
  vm: string;
  action: string;
  status: number;
  outcome?: string;
  state?: string;
  already?: boolean;
}

/** A host server behind the recorder, over mutual TLS. */
export interface Upstream {
  url: string;
  /** The name its certificate proves (`lab`, or the KVM host's). */
  servername: string;
  /** What the recorder serves the workers with in its place: a certificate naming the hosts it serves. */
  tls: ServerTlsFiles;
}

export interface RecorderOptions {
  /** Each host's server (the same for hosts one server serves). */
  upstreams: Record<string, Upstream>;
  productionHost: string;
  drHost: string;
  disksOf: (vm: string) => readonly DiskShape[];
  /** The hosts past the recorder: what it reads images with. */
  direct: HypervisorPort;
  /** The production VM's disks now (it is off), as a digest; null when they cannot be read. */
  sourceImage: (vm: string) => Promise<string | null>;
  /** Told of every power-on the hosts answered (the KVM hosts follow the replica's guest from there). */
  poweredOn?: (host: string, vm: string) => void;
  /** Told of every replica whose running data a point replaced (what its guest said before no longer counts). */
  runningReplaced?: (host: string, replica: string) => void;
}

const POWER = /^\/v1\/hosts\/([^/]+)\/vms\/([^/]+)\/power$/;
const CHECKPOINT = /^\/v1\/hosts\/([^/]+)\/vms\/([^/]+)\/checkpoints\/([^/]+)$/;
const SOURCE_WRITE = /^\/v1\/hosts\/([^/]+)\/vms\/([^/]+)\/disks\/[^/]+\/write$/;
/** A replica's running data replaced by a point: reverted to one (regular failover), or its running layer discarded. */
const RUNNING_REPLACED = /^\/v1\/hosts\/([^/]+)\/replicas\/([^/]+)\/(revert|running-layer)$/;

async function bodyOf(stream: NodeJS.ReadableStream): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(Buffer.from(chunk as Buffer));
  return Buffer.concat(chunks);
}

export class Recorder {
  readonly power: PowerRecord[] = [];
  /**
   * Checkpoint id → digests of the VM's disks at that checkpoint: more than one when a workflow took the same id
   * again after deleting it (a reset replays its steps).
   */
  readonly checkpoints = new Map<string, { vm: string; digests: string[] }>();
  /**
   * Checkpoints taken and not deleted, each with the count of writes into its VM's disk when it was taken: taking one
   * again must show the same data, unless the VM's disk was written since (a failback's writes into the powered-off
   * VM, which a view of it taken again shows, and its retried copy reads).
   */
  private readonly liveCheckpoints = new Map<string, number>();
  /** Write requests into each production VM's disk so far. */
  private readonly writesInto = new Map<string, number>();
  /** What the recorder compared as it happened, and whether it held; the round's invariants collect them. */
  private readonly results: { name: string; ok: boolean; detail: string }[] = [];
  private readonly offImage = new Map<string, string | null>();
  private readonly writtenWhileOff = new Set<string>();
  private readonly direct: HypervisorPort;
  private readonly servers: https.Server[] = [];
  private readonly agent = labAgent({ keepAlive: false });

  constructor(private readonly o: RecorderOptions) {
    this.direct = o.direct;
  }

  /** Listens for each host server; returns, per host, the URL its calls go to. */
  async listen(): Promise<Record<string, string>> {
    const byUpstream = new Map<string, string>();
    const urls: Record<string, string> = {};
    for (const [host, upstream] of Object.entries(this.o.upstreams)) {
      let url = byUpstream.get(upstream.url);
      if (!url) {
        const target = new URL(upstream.url);
        const server = standInForLab(upstream.tls, (req, res) => {
          this.forward(target, upstream.servername, req, res).catch(() => {
            if (!res.headersSent && !res.destroyed) res.writeHead(502).end();
            else res.destroy();
          });
        });
        this.servers.push(server);
        await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
        url = `https://127.0.0.1:${(server.address() as AddressInfo).port}`;
        byUpstream.set(upstream.url, url);
      }
      urls[host] = url;
    }
    return urls;
  }

  async close(): Promise<void> {
    for (const server of this.servers) {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    }
    this.agent.destroy();
  }

  /** Takes the comparisons so far (each is reported once). */
  takeResults(): { name: string; ok: boolean; detail: string }[] {
    return this.results.splice(0);
  }

  private result(name: string, ok: boolean, detail: string): void {
    this.results.push({ name, ok, detail });
  }

  private async forward(
    target: URL,
    servername: string,
    req: http.IncomingMessage,
    res: http.ServerResponse,
  ): Promise<void> {
    const path = decodeURIComponent(new URL(req.url ?? '/', target).pathname);
    const method = req.method ?? 'GET';
    const power = method === 'POST' ? POWER.exec(path) : null;
    const checkpoint = method === 'PUT' ? CHECKPOINT.exec(path) : null;
    const deleted = method === 'DELETE' ? CHECKPOINT.exec(path) : null;
    const sourceWrite = method === 'POST' ? SOURCE_WRITE.exec(path) : null;
    const replaced = method === 'POST' || method === 'DELETE' ? RUNNING_REPLACED.exec(path) : null;
    const body = power ? await bodyOf(req) : undefined;
    const action = body ? ((JSON.parse(body.toString() || '{}') as { action?: string }).action ?? '?') : undefined;
    const production = (host: string | undefined) => host === this.o.productionHost;

    if (sourceWrite && production(sourceWrite[1])) {
      this.writtenWhileOff.add(sourceWrite[2]!);
      this.writesInto.set(sourceWrite[2]!, (this.writesInto.get(sourceWrite[2]!) ?? 0) + 1);
    }
    if (power && action === 'on' && production(power[1])) await this.beforeBoot(power[2]!);

    const { upstream, answered } = forwardTo(target, this.agent, req, res, servername);
    if (body) upstream.end(body);
    else req.pipe(upstream);
    const answer = await answered;
    const status = answer.statusCode ?? 502;
    if (deleted && (status < 300 || status === 404)) this.liveCheckpoints.delete(deleted[3]!);
    if (replaced && status < 300) this.o.runningReplaced?.(replaced[1]!, replaced[2]!);
    if (!power && !(checkpoint && status < 300)) {
      res.writeHead(status, answer.headers);
      answer.pipe(res);
      return;
    }
    const data = await bodyOf(answer);
    if (power) {
      const parsed = JSON.parse(data.toString() || '{}') as {
        outcome?: string;
        state?: string;
        alreadyInState?: boolean;
      };
      const [, host, vm] = power as unknown as [string, string, string];
      this.power.push({
        at: Date.now(),
        host,
        vm,
        action: action!,
        status,
        outcome: parsed.outcome,
        state: parsed.state,
        already: parsed.alreadyInState,
      });
      if (status < 300 && action !== 'on' && production(host) && parsed.state === 'Off') await this.afterOff(vm);
      if (status < 300 && action === 'on') this.o.poweredOn?.(host, vm);
    }
    if (checkpoint) await this.recordCheckpoint(checkpoint[1]!, checkpoint[2]!, checkpoint[3]!);
    if (res.destroyed) return;
    res.writeHead(status, answer.headers).end(data);
  }

  private async recordCheckpoint(host: string, vm: string, id: string): Promise<void> {
    let digest: string;
    try {
      digest = await sourceDigest(this.direct, host, vm, this.o.disksOf(vm), id);
    } catch {
      return; // the lab died under the read: points copied from this checkpoint go unchecked
    }
    const known = this.checkpoints.get(id) ?? { vm, digests: [] };
    const writes = this.writesInto.get(vm) ?? 0;
    if (this.liveCheckpoints.get(id) === writes)
      this.result('a checkpoint never changes', known.digests.includes(digest), `${vm}: checkpoint ${id} taken again`);
    if (!known.digests.includes(digest)) known.digests.push(digest);
    this.checkpoints.set(id, known);
    this.liveCheckpoints.set(id, writes);
  }

  private async afterOff(vm: string): Promise<void> {
    if (this.offImage.has(vm)) return; // Off already: a repeated off changes nothing.
    this.writtenWhileOff.delete(vm);
    this.offImage.set(vm, await this.imageNow(vm));
  }

  private async beforeBoot(vm: string): Promise<void> {
    const info = await this.direct.getVm({ host: this.o.productionHost, vm }).catch(() => undefined);
    if (info?.powerState !== 'Off') return;
    const offImage = this.offImage.get(vm);
    this.offImage.delete(vm);
    const written = this.writtenWhileOff.delete(vm);
    const now = await this.imageNow(vm);
    if (now === null) return;
    if (!written) {
      if (offImage === undefined || offImage === null) return;
      this.result('production boots with the data it had when it went off', now === offImage, vm);
      return;
    }
    const replica = await this.direct
      .getReplica({ host: this.o.drHost, replica: replicaNameOf(vm) })
      .catch(() => undefined);
    if (!replica) return; // the DR host did not answer (the lab may be down): nothing to compare with
    const protective = replica.points.filter((p) => p.sealed && p.kind === 'failback-protective').at(-1);
    if (!protective) {
      this.result('production written while off boots its failback-protective point', false, `${vm}: no such point`);
      return;
    }
    const expected = await pointDigest(this.direct, this.o.drHost, vm, this.o.disksOf(vm), protective.id).catch(
      () => null,
    );
    if (expected === null) return;
    this.result(
      'production written while off boots its failback-protective point',
      now === expected,
      `${vm}: ${protective.id}`,
    );
  }

  /** True when a production VM was written while off (a failback) and has not booted since. */
  writtenSinceOff(vm: string): boolean {
    return this.writtenWhileOff.has(vm);
  }

  private imageNow(vm: string): Promise<string | null> {
    return this.o.sourceImage(vm).catch(() => null);
  }
}
