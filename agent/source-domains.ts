// The source side of the port on a KVM host, through its libvirt: power, checkpoints and change tracking,
// consistent reads of the guests' disks, and what a failback needs of a production host: fenced writes into a
// powered-off domain's disks and new VMs.
//
// A checkpoint of the port is a libvirt pull backup: `backup-begin` creates the libvirt checkpoint of the same name
// and exports the disks as they were at that instant over NBD (a scratch file absorbs the guest's later writes),
// with the blocks changed since the newest reference point's checkpoint as a dirty-bitmap context. A reference
// point names the libvirt checkpoint of a copy that really completed, so the next backup counts changes from there.
// libvirt runs one backup job per domain: a new checkpoint ends an older view first (its session is gone: the
// replica's sessions run one at a time). libvirt 9.0 backs up no shut-off domain: the view of a domain that is off
// (the final sync's, after the guest shut down) is taken offline, as libvirt's backup would take it, without
// starting the domain (`beginOfflineView`).
import { createHash } from 'node:crypto';
import { execFile } from 'node:child_process';
import { mkdir, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { CANARY_BYTES, parseCanary } from './canary';
import { lines, Virsh, VirshError } from './libvirt/virsh';
import { digestsOf } from '../src/host-api/digests';
import type { FramePiece } from '../src/host-api/frames';
import { badRequest, conflict, HostApiError, notFound, trackingLost } from '../src/host-api/errors';
import { exists, fsyncPath, writeFileAtomic } from '../src/host-api/persist';
import {
  BLOCK_SIZE,
  type BlockDigests,
  type CheckpointInfo,
  type DiskInfo,
  type Extent,
  type ExtentData,
  type PowerResult,
  type ReferencePointInfo,
  type ShutdownResult,
  type VmDefinition,
  type VmInfo,
  type VmSpec,
} from '../src/hypervisor/port';
import { NbdClient } from './nbd/client';
import { BASE_ALLOCATION, dirtyBitmapContext, STATE_DIRTY, STATE_ZERO } from './nbd/protocol';
import { acpiShutdown, destroyDomain, isNoSuchDomain, parseDomState, powerStateOf } from './power';
import { domainXmlOfRequest, escapeXml, fileDisksOf } from './definition';
import type { ManagedDomains } from './managed-domains';
import type { CheckpointRecord, HostState, ReferenceRecord } from './state';
import {
  connectImageExport,
  exportImage,
  NBD_REPLY_TIMEOUT_MS,
  stopStaleExport,
  type ImageExport,
} from './storage-daemon';

/** Block reads go out in pieces of this size (each one frame of the host API). */
export const READ_PIECE_BYTES = 4 * 1024 * 1024;
const bitmapExport = (disk: string) => `backup-${disk}`;
/** How libvirt reports a checkpoint's bitmap that QEMU no longer trusts or has (it was killed while tracking). */
const BITMAP_LOST = /inconsistent|not found in backing chain/i;

const run = promisify(execFile);

/** Extents cut into the pieces reads are served in. */
export function* readPieces(extents: Extent[]): Generator<Extent> {
  for (const e of extents)
    for (let at = e.offset; at < e.offset + e.length; at += READ_PIECE_BYTES)
      yield { offset: at, length: Math.min(READ_PIECE_BYTES, e.offset + e.length - at) };
}

/** Extents widened to whole BLOCK_SIZE blocks and merged where they touch. */
export function toBlocks(extents: Extent[]): Extent[] {
  const out: Extent[] = [];
  for (const e of extents) {
    const start = Math.floor(e.offset / BLOCK_SIZE) * BLOCK_SIZE;
    const end = Math.ceil((e.offset + e.length) / BLOCK_SIZE) * BLOCK_SIZE;
    const last = out.at(-1);
    if (last && start <= last.offset + last.length) last.length = Math.max(last.length, end - last.offset);
    else out.push({ offset: start, length: end - start });
  }
  return out;
}

interface DomainDisk {
  target: string;
  source: string;
}

/** A domain's disk with what its image's header says: the guest's size and the dirty bitmaps. */
interface DiskImage extends DomainDisk {
  sizeBytes: number;
  bitmaps: ImageBitmap[];
}

/** A dirty bitmap of a qcow2 image, as `qemu-img info` gives it. */
interface ImageBitmap {
  name: string;
  /** `auto`: recording (enabled); `in-use`: inconsistent (its QEMU stopped without storing it). */
  flags: string[];
}

/** Whether a bitmap holds every change since its checkpoint: there, recording, and stored whole. */
const recordsEveryChange = (b: ImageBitmap | undefined): boolean =>
  b !== undefined && b.flags.includes('auto') && !b.flags.includes('in-use');

/** The state libvirt reports (`domstate --reason`): `running (booted)`, `shut off (shutdown)`, … */

export interface KvmSourceOptions {
  /** This host's name in the estate. */
  host: string;
  virsh: Virsh;
  /** Where the host process keeps its state, sockets and scratch files. */
  stateDir: string;
  state: HostState;
  /** The domains its operator put under the agent's care. */
  managed: ManagedDomains;
  /** Where the firmware and kernels that new VMs' definitions name may come from. */
  bootFileDirs: readonly string[];
  log: (message: string) => void;
}

export class KvmSourceDomains {
  private readonly virsh: Virsh;
  private readonly locks = new Map<string, Promise<unknown>>();
  /** Open NBD connections to checkpoint views, by `<domain>/<checkpoint>/<disk>`; rebuilt on demand. */
  private readonly exports = new Map<string, Promise<NbdClient>>();
  /** The export daemons of offline views this process started, by `<domain>/<checkpoint>`. */
  private readonly offlineExports = new Map<string, ImageExport[]>();

  private readonly state: HostState;

  private constructor(private readonly options: KvmSourceOptions) {
    this.virsh = options.virsh;
    this.state = options.state;
  }

  static async open(options: KvmSourceOptions): Promise<KvmSourceDomains> {
    for (const sub of ['run', 'scratch', 'xml', 'replicas'])
      await mkdir(join(options.stateDir, sub), { recursive: true });
    if (Buffer.byteLength(socketPath(options.stateDir, '')) > 107)
      throw new Error(`state directory ${options.stateDir} is too long for unix sockets in it`);
    return new KvmSourceDomains(options);
  }

  async close(): Promise<void> {
    const clients = await Promise.allSettled(this.exports.values());
    this.exports.clear();
    for (const c of clients) if (c.status === 'fulfilled') c.value.destroy();
    for (const daemons of this.offlineExports.values()) await Promise.all(daemons.map((d) => d.stop()));
    this.offlineExports.clear();
  }

  /** One change at a time per domain (libvirt itself serializes backup jobs by a lock that hangs the second). */
  private exclusive<T>(domain: string, fn: () => Promise<T>): Promise<T> {
    const previous = this.locks.get(domain) ?? Promise.resolve();
    const run = previous.then(fn, fn);
    const tail = run.catch(() => undefined);
    this.locks.set(domain, tail);
    void tail.then(() => {
      if (this.locks.get(domain) === tail) this.locks.delete(domain);
    });
    return run;
  }

  private async virshOr404<T>(domain: string, call: () => Promise<T>): Promise<T> {
    try {
      return await call();
    } catch (e) {
      if (isNoSuchDomain(e)) throw notFound(`VM ${domain}`, 'vm');
      throw e;
    }
  }

  // Inventory -----------------------------------------------------------------------------------

  /** Whether the agent may act on the domain as a source VM: listed in its domains file, or made by it. */
  async isManaged(domain: string): Promise<boolean> {
    return this.state.domain(domain).created || (await this.options.managed.has(domain));
  }

  /** The source domains under the agent's care (the replicas it runs are not among them). */
  async listVms(): Promise<VmInfo[]> {
    const out: VmInfo[] = [];
    for (const name of await this.virsh.domains()) {
      if (this.state.replica(name) || !(await this.isManaged(name))) continue;
      try {
        out.push(await this.getVm(name));
      } catch (e) {
        if (!(e instanceof HostApiError && e.status === 404)) throw e; // undefined meanwhile
      }
    }
    return out;
  }

  async getVm(domain: string): Promise<VmInfo> {
    const { state, reason } = await this.domState(domain);
    const record = this.state.domain(domain);
    // A paused start of ours for a view is not the guest running, also while it ends (libvirt shows a destroyed
    // QEMU "in shutdown" until it exits).
    const paused = (state === 'paused' || state === 'in shutdown') && record.checkpoints.some((c) => c.pausedStart);
    return {
      name: domain,
      host: this.options.host,
      kind: 'source',
      powerState: paused ? 'Off' : powerStateOf(state),
      disks: await this.disks(domain),
      lastStop: record.lastStop ?? lastStopFromReason(state, reason),
    };
  }

  /**
   * A new VM (failback to a new VM): a libvirt domain made from the given definition (its replica's, which is the
   * source's) under the new name, with a UUID of its own from libvirt, empty qcow2 disks of the given sizes and its
   * own NVRAM in the host process's state directory, and MAC addresses of its own (the original may run beside it).
   * The same name with the same disks again is the VM made before.
   */
  createVm(domain: string, spec: VmSpec): Promise<VmInfo> {
    return this.exclusive(domain, async () => {
      const dir = join(this.options.stateDir, 'vms', domain);
      const images = new Map(spec.disks.map((d) => [d.id, join(dir, `${d.id}.qcow2`)]));
      if ((await this.virsh.domains()).includes(domain)) {
        // Another tool's (or the operator's) domain of that name is not ours to take over.
        if (!this.state.domain(domain).created)
          throw conflict(`a domain named ${domain} already exists on ${this.options.host}`);
        const vm = await this.getVm(domain);
        const have = await this.domainDisks(domain);
        const same =
          have.length === images.size &&
          have.every((d) => images.get(d.target) === d.source) &&
          spec.disks.every((d) => vm.disks.some((x) => x.id === d.id && x.sizeBytes === d.sizeBytes));
        if (same) return vm;
        throw conflict(`a domain named ${domain} already exists on ${this.options.host}`);
      }
      if (!spec.definition)
        throw badRequest('body.definition', `a KVM host makes a new VM from a libvirt domain definition, and got none`);
      const xml = domainXmlOfRequest(spec.definition.text, {
        name: domain,
        disks: images,
        consoleLog: join(dir, 'console.log'),
        nvram: join(dir, 'nvram.fd'),
        bootFileDirs: this.options.bootFileDirs,
        macs: 'own',
      });
      await mkdir(dir, { recursive: true });
      for (const d of spec.disks) {
        const image = images.get(d.id)!;
        // Nothing writes to the images before their domain exists: one a crash left behind is as good as new.
        if (!(await exists(image)))
          await run('qemu-img', ['create', '-q', '-f', 'qcow2', `${image}.new`, String(d.sizeBytes)]).then(() =>
            rename(`${image}.new`, image),
          );
      }
      await fsyncPath(dir);
      const file = join(this.options.stateDir, 'xml', `${domain}.xml`);
      await writeFileAtomic(file, xml);
      // Recorded first: a crash after the define leaves a domain the agent knows as its own.
      await this.state.update(domain, (d) => void (d.created = true));
      await this.virsh.run(['define', file]);
      return this.getVm(domain);
    });
  }

  /** The domain's persistent XML, as its replica is to be defined from it. */
  async definition(domain: string): Promise<VmDefinition> {
    const text = await this.virshOr404(domain, () => this.virsh.run(['dumpxml', '--inactive', domain]));
    return { format: 'libvirt-domain-xml', text };
  }

  private async domainDisks(domain: string): Promise<DomainDisk[]> {
    return fileDisksOf(await this.virshOr404(domain, () => this.virsh.run(['dumpxml', domain])));
  }

  private async disks(domain: string): Promise<DiskInfo[]> {
    return diskInfos(await this.diskImages(domain));
  }

  private async diskImages(domain: string): Promise<DiskImage[]> {
    return Promise.all((await this.domainDisks(domain)).map(async (d) => ({ ...d, ...(await imageInfo(d.source)) })));
  }

  /**
   * A disk's size as its guest sees it, from its image's header (shared with the QEMU that has it open). Not libvirt's
   * domblkinfo: that queries every block node of the running QEMU, and QEMU 7.2 aborts
   * (qcow2_get_specific_info: Assertion `false' failed) when the query meets a backup job's scratch node going away.
   */
  private async capacity(image: string): Promise<number> {
    return (await imageInfo(image)).sizeBytes;
  }

  private async domState(domain: string): Promise<{ state: string; reason: string }> {
    return parseDomState(await this.virshOr404(domain, () => this.virsh.run(['domstate', '--reason', domain])));
  }

  // Power -----------------------------------------------------------------------------------------

  /** ACPI power button, then waits for the guest to stop; `timed-out` leaves the forced power-off to the caller. */
  shutdownGuest(domain: string, timeoutMs: number, signal?: AbortSignal): Promise<ShutdownResult> {
    return this.exclusive(domain, async () => {
      await this.closeViewsOfStoppedDomain(domain, 'pausedStart');
      if ((await this.domState(domain)).state === 'shut off') return { outcome: 'already-off', state: 'Off' };
      const end = await acpiShutdown(this.virsh, domain, timeoutMs, () => this.domState(domain), signal);
      if (!end.off) return { outcome: 'timed-out', state: end.state };
      await this.state.update(domain, (d) => void (d.lastStop = 'guest-shutdown'));
      return { outcome: 'off', state: 'Off' };
    });
  }

  powerOff(domain: string): Promise<PowerResult> {
    return this.exclusive(domain, async () => {
      await this.closeViewsOfStoppedDomain(domain, 'pausedStart');
      if ((await this.domState(domain)).state === 'shut off') return { state: 'Off', alreadyInState: true };
      await destroyDomain(this.virsh, domain);
      await this.state.update(domain, (d) => void (d.lastStop = 'forced-off'));
      return { state: 'Off', alreadyInState: false };
    });
  }

  powerOn(domain: string): Promise<PowerResult> {
    return this.exclusive(domain, async () => {
      await this.closeViewsOfStoppedDomain(domain, 'all');
      const { state } = await this.domState(domain);
      if (state === 'running') return { state: 'Running', alreadyInState: true };
      if (state === 'paused') await this.virsh.run(['resume', domain]);
      else await this.virsh.run(['start', domain]);
      await this.state.update(domain, (d) => void (d.lastStop = null));
      return { state: 'Running', alreadyInState: false };
    });
  }

  // Checkpoints and change tracking -------------------------------------------------------------

  createCheckpoint(domain: string, checkpointId: string): Promise<CheckpointInfo> {
    return this.exclusive(domain, async () => {
      const known = this.state.domain(domain).checkpoints.find((c) => c.id === checkpointId);
      if (known?.status === 'open' && (await this.viewServed(domain, known)))
        return { id: known.id, vm: domain, createdAt: known.createdAt };
      // Whatever view is left (another session's, or this one's begun and lost in a crash) ends here.
      for (const old of this.state.domain(domain).checkpoints) await this.closeView(domain, old);

      // Change tracking goes on from the newest reference point whose tracking is still whole.
      const base = [...this.state.domain(domain).referencePoints].reverse().find((r) => r.trackingValid);
      // Read once: the final sync's offline view needs the same images (the domain's changes wait for this one).
      const images = await this.diskImages(domain);
      const disks = diskInfos(images);
      // Copies move whole 64 KiB blocks: a disk of another size is said so here, before anything starts.
      for (const d of disks)
        if (d.sizeBytes % BLOCK_SIZE !== 0)
          throw conflict(
            `disk ${d.id} of ${domain} is ${d.sizeBytes} bytes, not a whole number of 64 KiB blocks; grow it to ` +
              `${Math.ceil(d.sizeBytes / BLOCK_SIZE) * BLOCK_SIZE} bytes (qemu-img resize, the VM off) to replicate it`,
          );
      const checkpoint: CheckpointRecord = {
        id: checkpointId,
        createdAt: new Date().toISOString(),
        incrementalFrom: base?.checkpointId ?? null,
        pausedStart: false,
        offline: false,
        disks,
        status: 'beginning',
      };
      await this.beginView(domain, checkpoint, images);
      return { id: checkpointId, vm: domain, createdAt: checkpoint.createdAt };
    });
  }

  /**
   * Starts a view: the backup job of a running domain, which creates (or, for an interrupted view, creates again) the
   * libvirt checkpoint of its name, or the offline view of a domain that is off. Recorded as beginning first, then as
   * open. `images`: the domain's disk images as just read, if they were.
   */
  private async beginView(domain: string, checkpoint: CheckpointRecord, images?: DiskImage[]): Promise<void> {
    checkpoint.offline = (await this.domState(domain)).state === 'shut off';
    checkpoint.pausedStart = false;
    checkpoint.status = 'beginning';
    await this.state.update(domain, (d) => {
      d.checkpoints = [...d.checkpoints.filter((c) => c.id !== checkpoint.id), checkpoint];
      if (!d.ownCheckpoints.includes(checkpoint.id)) d.ownCheckpoints.push(checkpoint.id);
    });
    await this.dropCheckpointsWithoutReference(domain);
    const loseTracking = async (why: string) => {
      this.options.log(`${domain}: change tracking lost (${why}); the view has no changed extents`);
      await this.state.update(domain, (d) => {
        for (const r of d.referencePoints) r.trackingValid = false;
      });
      checkpoint.incrementalFrom = null;
    };
    // The reference point's libvirt checkpoint may be gone (deleted by an operator, or libvirt's metadata lost).
    const libvirtCheckpoints = await this.libvirtCheckpoints(domain);
    if (checkpoint.incrementalFrom && !libvirtCheckpoints.includes(checkpoint.incrementalFrom))
      await loseTracking(`libvirt has no checkpoint ${checkpoint.incrementalFrom} any more`);
    if (checkpoint.offline)
      await this.beginOfflineView(
        domain,
        checkpoint,
        images ?? (await this.diskImages(domain)),
        libvirtCheckpoints,
        loseTracking,
      );
    else
      try {
        await this.beginBackup(domain, checkpoint);
      } catch (e) {
        if (!(checkpoint.incrementalFrom && e instanceof VirshError && BITMAP_LOST.test(e.detail))) throw e;
        // QEMU stopped without writing its bitmaps back: nothing since the reference point can be trusted.
        await loseTracking(e.detail);
        await this.beginBackup(domain, checkpoint);
      }
    checkpoint.status = 'open';
    await this.state.update(domain, (d) => {
      const c = d.checkpoints.find((x) => x.id === checkpoint.id);
      if (c) Object.assign(c, { status: 'open', incrementalFrom: checkpoint.incrementalFrom });
    });
  }

  /**
   * The view of a domain that is off, taken as libvirt's backup would take it, without starting the domain (a paused
   * start cost over a second, and its destroy as much again). libvirt keeps every checkpoint's bitmap recording, so
   * the reference point's bitmap alone holds every change since; the new checkpoint is redefined to libvirt and then
   * its recording bitmap added to each image (a crash between the two leaves a checkpoint whose bitmap is missing,
   * which libvirt reports as inconsistent: tracking lost, never wrong). The images are exported read-only with both
   * bitmaps, by daemons that hold the images' locks: nobody starts the domain while the view is read.
   */
  private async beginOfflineView(
    domain: string,
    checkpoint: CheckpointRecord,
    disks: DiskImage[],
    libvirtCheckpoints: string[],
    loseTracking: (why: string) => Promise<void>,
  ): Promise<void> {
    const from = checkpoint.incrementalFrom;
    const broken = from && disks.find((d) => !recordsEveryChange(d.bitmaps.find((b) => b.name === from)));
    if (broken)
      await loseTracking(`the bitmap of checkpoint ${from} in disk ${broken.target} does not hold every change`);
    if (!libvirtCheckpoints.includes(checkpoint.id))
      await this.redefineCheckpoint(domain, checkpoint, libvirtCheckpoints.at(-1), disks);
    // The checkpoint's bitmap starts now (the view shows the disk as it is now): one a crash or an earlier view of the
    // same checkpoint left is made again.
    await Promise.all(
      disks.map((d) =>
        run('qemu-img', [
          'bitmap',
          ...(d.bitmaps.some((b) => b.name === checkpoint.id) ? ['--remove'] : []),
          '--add',
          d.source,
          checkpoint.id,
        ]),
      ),
    );
    await this.startOfflineExports(domain, checkpoint, disks);
  }

  /** Makes a checkpoint libvirt did not create known to it, as if it had (its bitmap named after it in each disk). */
  private async redefineCheckpoint(
    domain: string,
    checkpoint: CheckpointRecord,
    parent: string | undefined,
    disks: DomainDisk[],
  ): Promise<void> {
    const x = escapeXml;
    const xml =
      `<domaincheckpoint><name>${x(checkpoint.id)}</name>` +
      (parent ? `<parent><name>${x(parent)}</name></parent>` : '') +
      `<creationTime>${Math.floor(Date.parse(checkpoint.createdAt) / 1000)}</creationTime><disks>` +
      disks.map((d) => `<disk name='${x(d.target)}' checkpoint='bitmap' bitmap='${x(checkpoint.id)}'/>`).join('') +
      `</disks></domaincheckpoint>`;
    const file = join(this.options.stateDir, 'xml', `${domain}.checkpoint.xml`);
    await writeFile(file, xml);
    await this.virsh.run(['checkpoint-create', domain, file, '--redefine']);
  }

  /**
   * A file of the run directory for one disk of a domain, named by a hash (a unix socket path holds 107 bytes): the
   * sockets and pid files of its export daemons (a leftover `*.nbd.pid` one is stopped at start).
   */
  private diskRunFile(domain: string, disk: string, suffix: string): string {
    const key = createHash('sha256').update(`${domain}/${disk}`).digest('hex').slice(0, 16);
    return join(this.options.stateDir, 'run', `${key}.${suffix}`);
  }

  /** Where an offline view's export of one disk listens, and its daemon's pid file. */
  private offlineExportOf(domain: string, disk: string): { socket: string; pidFile: string } {
    return {
      socket: this.diskRunFile(domain, disk, 'view.sock'),
      pidFile: this.diskRunFile(domain, disk, 'view.nbd.pid'),
    };
  }

  private async startOfflineExports(domain: string, c: CheckpointRecord, disks: DomainDisk[]): Promise<void> {
    await this.stopOfflineExports(domain, c.id);
    const started = await Promise.allSettled(
      disks.map((d) =>
        exportImage({
          image: d.source,
          ...this.offlineExportOf(domain, d.target),
          writable: false,
          excludeWriters: true,
          bitmaps: [...(c.incrementalFrom ? [c.incrementalFrom] : []), c.id],
        }),
      ),
    );
    const daemons = started.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []));
    this.offlineExports.set(`${domain}/${c.id}`, daemons);
    const failed = started.find((r) => r.status === 'rejected');
    if (failed) {
      await this.stopOfflineExports(domain, c.id);
      throw failed.reason;
    }
  }

  /** Stops an offline view's export daemons: this process's, or ones a previous run left (proven by their pid files). */
  private async stopOfflineExports(domain: string, checkpointId: string): Promise<void> {
    const daemons = this.offlineExports.get(`${domain}/${checkpointId}`) ?? [];
    this.offlineExports.delete(`${domain}/${checkpointId}`);
    await Promise.all(daemons.map((d) => d.stop()));
    const disks = this.state.domain(domain).checkpoints.find((c) => c.id === checkpointId)?.disks ?? [];
    for (const d of disks) await stopStaleExport(this.offlineExportOf(domain, d.id).pidFile);
  }

  /** Whether a view is still served: the backup job of ours runs, or the offline view's exports do. */
  private async viewServed(domain: string, c: CheckpointRecord): Promise<boolean> {
    if (!c.offline) return (await this.backupRunning(domain)) === 'ours';
    return this.offlineExports.get(`${domain}/${c.id}`)?.every((d) => d.running) ?? false;
  }

  /**
   * The exports of an offline view, started again when they are gone (the agent restarted, or a daemon was killed) if
   * the images are still as the view showed them: the domain is off and the checkpoint's own bitmaps, which record
   * every write since the view began, are clean. Otherwise the view is gone, and the checkpoint must be taken again.
   */
  private async serveOfflineView(domain: string, checkpointId: string): Promise<void> {
    const gone = (why: string) =>
      conflict(`the view of checkpoint ${domain}/${checkpointId} is gone: ${why}; create the checkpoint again`);
    await this.exclusive(domain, async () => {
      const c = this.openView(domain, checkpointId);
      if (!c.offline || c.status !== 'open' || (await this.viewServed(domain, c))) return;
      this.dropViewExports(domain, c.id);
      if ((await this.domState(domain)).state !== 'shut off') throw gone(`${domain} has started since`);
      const disks = await this.domainDisks(domain);
      await this.startOfflineExports(domain, c, disks);
      for (const d of disks) {
        const nbd = await NbdClient.connect({
          path: this.offlineExportOf(domain, d.target).socket,
          exportName: 'disk',
          metaContexts: [dirtyBitmapContext(c.id)],
          replyTimeoutMs: NBD_REPLY_TIMEOUT_MS,
        });
        try {
          const map = await nbd.blockStatus(dirtyBitmapContext(c.id), 0, nbd.size);
          if (map.some((e) => (e.flags & STATE_DIRTY) !== 0)) {
            await this.stopOfflineExports(domain, c.id);
            throw gone(`disk ${d.target} was written since`);
          }
        } finally {
          nbd.destroy();
        }
      }
    });
  }

  private socketOf(domain: string): string {
    return socketPath(this.options.stateDir, domain);
  }

  private scratchOf(domain: string, disk: string): string {
    return join(this.options.stateDir, 'scratch', `${domain}.${disk}.qcow2`);
  }

  private async beginBackup(domain: string, checkpoint: CheckpointRecord): Promise<void> {
    const disks = await this.domainDisks(domain);
    const x = escapeXml;
    const backupXml =
      `<domainbackup mode='pull'>` +
      (checkpoint.incrementalFrom ? `<incremental>${x(checkpoint.incrementalFrom)}</incremental>` : '') +
      `<server transport='unix' socket='${x(this.socketOf(domain))}'/><disks>` +
      disks
        .map(
          (d) =>
            `<disk name='${x(d.target)}' backup='yes' type='file'><scratch file='${x(this.scratchOf(domain, d.target))}'/></disk>`,
        )
        .join('') +
      `</disks></domainbackup>`;
    const checkpointXml =
      `<domaincheckpoint><name>${x(checkpoint.id)}</name><disks>` +
      disks.map((d) => `<disk name='${x(d.target)}' checkpoint='bitmap'/>`).join('') +
      `</disks></domaincheckpoint>`;
    const dir = join(this.options.stateDir, 'xml');
    const backupFile = join(dir, `${domain}.backup.xml`);
    const checkpointFile = join(dir, `${domain}.checkpoint.xml`);
    await writeFile(backupFile, backupXml);
    await writeFile(checkpointFile, checkpointXml);
    for (const d of disks) await rm(this.scratchOf(domain, d.target), { force: true });
    await this.deleteLibvirtCheckpoint(domain, checkpoint.id); // one a failed begin of ours left behind (recorded)
    // libvirt runs one backup job per domain: another tool's makes ours wait (a conflict), not fail as a 500.
    if ((await this.backupRunning(domain)) === 'foreign') throw foreignBackup(domain);
    await this.virsh.run(['backup-begin', domain, backupFile, checkpointFile]);
  }

  /**
   * Whether a backup job of the domain runs, and whether it is ours (it exports on our socket) or another tool's.
   * `strict`: libvirt not answering is thrown, not taken for no job.
   */
  private async backupRunning(domain: string, strict = false): Promise<'none' | 'ours' | 'foreign'> {
    const info = await this.virsh.run(['domjobinfo', domain]).catch((e: unknown) => {
      if (strict) throw e;
      return '';
    });
    if (!(/Job type:\s+(Unbounded|Bounded)/.test(info) && /Operation:\s+Backup/.test(info))) return 'none';
    const xml = await this.virsh.run(['backup-dumpxml', domain]).catch(() => '');
    const socket = /<server\b[^>]*\ssocket=(['"])([^'"]*)\1/.exec(xml)?.[2];
    return socket === this.socketOf(domain) ? 'ours' : 'foreign';
  }

  /**
   * Whether the domain runs no backup job of ours: it is off, or its QEMU runs without one. libvirt not answering
   * is a failure to retry, not a verdict.
   */
  private async backupJobGone(domain: string): Promise<boolean> {
    if ((await this.domState(domain)).state === 'shut off') return true;
    return (await this.backupRunning(domain, true)) !== 'ours';
  }

  /**
   * Ends a view: its backup job or offline exports, its record, the libvirt checkpoints nothing stands for any more,
   * and, for an older agent's paused start, the domain's run.
   */
  private async closeView(domain: string, c: CheckpointRecord): Promise<void> {
    this.dropViewExports(domain, c.id);
    if (c.offline) await this.stopOfflineExports(domain, c.id);
    else await this.abortBackup(domain);
    // An older agent's paused start: its checkpoint goes while it still runs, and its record last, so that the
    // domain shows Off until the paused start has ended.
    await this.dropCheckpointsWithoutReference(domain, c.id);
    await this.endPausedStart(domain, c.pausedStart);
    await this.state.update(domain, (d) => void (d.checkpoints = d.checkpoints.filter((x) => x.id !== c.id)));
  }

  /** Ends our backup job of the domain; another tool's is never aborted (the caller waits for it: a conflict). */
  private async abortBackup(domain: string): Promise<void> {
    const running = await this.backupRunning(domain);
    if (running === 'foreign') throw foreignBackup(domain);
    if (running === 'ours') await this.virsh.run(['domjobabort', domain]).catch(() => undefined);
  }

  /** The domain's paused run for a view (if it had one and it still runs) ends, and the views' scratch files go. */
  private async endPausedStart(domain: string, pausedStart: boolean): Promise<void> {
    if (pausedStart && (await this.domState(domain)).state === 'paused') await this.virsh.run(['destroy', domain]);
    for (const d of await this.domainDisks(domain)) await rm(this.scratchOf(domain, d.target), { force: true });
  }

  private dropViewExports(domain: string, checkpointId: string): void {
    for (const [key, client] of this.exports)
      if (key.startsWith(`${domain}/${checkpointId}/`)) {
        this.exports.delete(key);
        void client.then((x) => x.destroy()).catch(() => undefined);
      }
  }

  /**
   * A write into the disk of a domain that is off ends its views (their exports hold the images): recorded as
   * interrupted first, so that a read after the write takes the view again.
   */
  private async interruptViews(domain: string): Promise<void> {
    const views = this.state.domain(domain).checkpoints;
    if (views.length === 0) return;
    await this.state.update(domain, (d) => {
      for (const c of d.checkpoints) if (c.status === 'open') c.status = 'interrupted';
    });
    for (const c of views) {
      this.dropViewExports(domain, c.id);
      if (c.offline) await this.stopOfflineExports(domain, c.id);
    }
    await this.abortBackup(domain);
    await this.endPausedStart(
      domain,
      views.some((c) => c.pausedStart),
    );
  }

  /**
   * Before anyone powers a domain on or off, an older agent's paused start for a view ends, and before it powers on,
   * the offline views (their exports keep it from starting); each view goes with them.
   */
  private async closeViewsOfStoppedDomain(domain: string, which: 'pausedStart' | 'all'): Promise<void> {
    for (const c of this.state.domain(domain).checkpoints)
      if (c.pausedStart || (which === 'all' && c.offline)) await this.closeView(domain, c);
  }

  private async libvirtCheckpoints(domain: string): Promise<string[]> {
    return lines(await this.virsh.run(['checkpoint-list', domain, '--name', '--topological']));
  }

  /**
   * Deletes a libvirt checkpoint and its bitmaps. libvirt keeps every checkpoint's bitmap recording, so the others
   * still count every change since their own instants. libvirt deletes checkpoints only of a running domain: of one
   * that is off, the agent removes the bitmaps from the images itself, then libvirt's record (a crash between leaves a
   * checkpoint without its bitmap, which libvirt reports as inconsistent: never silently wrong).
   */
  private async deleteLibvirtCheckpoint(domain: string, name: string): Promise<void> {
    if (!(await this.libvirtCheckpoints(domain)).includes(name)) return;
    if ((await this.domState(domain)).state === 'shut off') {
      for (const d of await this.domainDisks(domain))
        if ((await imageInfo(d.source)).bitmaps.some((b) => b.name === name))
          await run('qemu-img', ['bitmap', '--remove', d.source, name]);
      await this.virsh.run(['checkpoint-delete', '--metadata', domain, name]);
      return;
    }
    // A bitmap QEMU dropped (inconsistent after a kill) leaves only libvirt's record of it to delete.
    await this.virsh.run(['checkpoint-delete', domain, name]).catch(async (e: unknown) => {
      if (!(e instanceof VirshError && BITMAP_LOST.test(e.detail))) throw e;
      await this.virsh.run(['checkpoint-delete', '--metadata', domain, name]);
    });
  }

  /**
   * The agent's own libvirt checkpoints that neither a reference point nor an open view (but `closing`, the one being
   * closed) stands for (failed copies) go; other tools' checkpoints stay.
   */
  private async dropCheckpointsWithoutReference(domain: string, closing?: string): Promise<void> {
    const record = this.state.domain(domain);
    // An open offline view's exports hold the images (a bitmap is removed only with the image's lock): later.
    if (record.checkpoints.some((c) => c.offline && c.id !== closing)) return;
    const kept = new Set([
      ...record.referencePoints.map((r) => r.checkpointId),
      ...record.checkpoints.filter((c) => c.id !== closing).map((c) => c.id),
    ]);
    const unused = record.ownCheckpoints.filter((name) => !kept.has(name));
    if (unused.length === 0) return;
    const existing = await this.libvirtCheckpoints(domain);
    for (const name of unused) if (existing.includes(name)) await this.deleteLibvirtCheckpoint(domain, name);
    await this.state.update(
      domain,
      (d) => void (d.ownCheckpoints = d.ownCheckpoints.filter((n) => !unused.includes(n))),
    );
  }

  deleteCheckpoint(domain: string, checkpointId: string): Promise<void> {
    return this.exclusive(domain, async () => {
      const c = this.state.domain(domain).checkpoints.find((x) => x.id === checkpointId);
      if (!c) throw notFound(`checkpoint ${domain}/${checkpointId}`, 'checkpointId');
      await this.closeView(domain, c);
    });
  }

  createReferencePoint(domain: string, referencePointId: string, checkpointId: string): Promise<ReferencePointInfo> {
    return this.exclusive(domain, async () => {
      const record = this.state.domain(domain);
      const known = record.referencePoints.find((r) => r.id === referencePointId);
      if (known) return this.referenceInfo(domain, known);
      const c = record.checkpoints.find((x) => x.id === checkpointId);
      if (!c || c.status !== 'open') throw notFound(`checkpoint ${domain}/${checkpointId}`, 'checkpointId');
      const next = await this.state.update(domain, (d) => {
        d.referencePoints.push({
          id: referencePointId,
          checkpointId,
          createdAt: new Date().toISOString(),
          trackingValid: true,
        });
      });
      return this.referenceInfo(domain, next.referencePoints.at(-1)!);
    });
  }

  private referenceInfo(domain: string, r: ReferenceRecord): ReferencePointInfo {
    return {
      id: r.id,
      vm: domain,
      checkpointId: r.checkpointId,
      createdAt: r.createdAt,
      trackingValid: r.trackingValid,
    };
  }

  async listReferencePoints(domain: string): Promise<ReferencePointInfo[]> {
    await this.domState(domain); // 404 for an unknown domain
    return this.state.domain(domain).referencePoints.map((r) => this.referenceInfo(domain, r));
  }

  deleteReferencePoint(domain: string, referencePointId: string): Promise<void> {
    return this.exclusive(domain, async () => {
      const r = this.state.domain(domain).referencePoints.find((x) => x.id === referencePointId);
      if (!r) throw notFound(`reference point ${domain}/${referencePointId}`, 'referencePointId');
      await this.state.update(domain, (d) => {
        d.referencePoints = d.referencePoints.filter((x) => x.id !== referencePointId);
      });
      await this.dropCheckpointsWithoutReference(domain);
    });
  }

  // Writes into a powered-off disk (failback) ---------------------------------------------------------

  /** From now on only writes that carry this token land; it returns once no write under an older one is in flight. */
  fenceWrites(domain: string, token: string): Promise<void> {
    return this.exclusive(domain, async () => {
      await this.domState(domain); // 404 for an unknown domain
      await this.state.update(domain, (d) => void (d.writeFence = token));
    });
  }

  /**
   * One write request into a powered-off domain's disk. libvirt writes no disk, so a qemu-storage-daemon of ours
   * opens the image for the request: the checkpoints' bitmaps in it count the writes as they would a guest's. The
   * first piece that arrives checks the fence and the power state and ends the domain's views; the domain's other
   * changes wait for the request to end, so a fence set meanwhile waits for it too.
   */
  writeDisk(
    domain: string,
    disk: string,
    fence: string | undefined,
    receive: (sizeBytes: number, write: (piece: FramePiece) => Promise<void>) => Promise<number>,
  ): Promise<number> {
    return this.exclusive(domain, async () => {
      const source = (await this.domainDisks(domain)).find((d) => d.target === disk);
      if (!source) throw notFound(`disk ${domain}/${disk}`, 'disk');
      const size = await this.capacity(source.source);
      let writer: Promise<{ daemon: ImageExport; nbd: NbdClient }> | undefined;
      const open = async () => {
        const record = this.state.domain(domain);
        if (record.writeFence !== null && fence !== record.writeFence)
          throw conflict(`writes to ${domain} are fenced: this writer's fence token is not the current one`);
        const { state } = await this.domState(domain);
        const ourPausedStart = state === 'paused' && record.checkpoints.some((c) => c.pausedStart);
        if (state !== 'shut off' && !ourPausedStart)
          throw conflict(`${domain} is ${powerStateOf(state)}; writes need it Off`);
        await this.interruptViews(domain);
        // Named like the DR side's export daemons, so a restarted host process stops one a kill left running.
        return connectImageExport({
          image: source.source,
          socket: this.diskRunFile(domain, disk, 'write.sock'),
          pidFile: this.diskRunFile(domain, disk, 'nbd.pid'),
          writable: true,
        });
      };
      try {
        const bytes = await receive(size, async (piece) => {
          writer ??= open();
          const { nbd } = await writer;
          await nbd.write(piece.offset, piece.parts.length === 1 ? piece.parts[0]! : Buffer.concat(piece.parts));
        });
        if (writer) await (await writer).nbd.flush();
        return bytes;
      } finally {
        const w = await writer?.catch(() => null);
        if (w) {
          await w.nbd.close().catch(() => w.nbd.destroy());
          await w.daemon.stop(); // the daemon stores the bitmaps back as it exits
        }
      }
    });
  }

  // Reads of a checkpoint view --------------------------------------------------------------------

  private openView(domain: string, checkpointId: string): CheckpointRecord {
    const c = this.state.domain(domain).checkpoints.find((x) => x.id === checkpointId);
    if (!c) throw notFound(`checkpoint ${domain}/${checkpointId}`, 'checkpointId');
    if (c.status === 'beginning') throw conflict(`checkpoint ${domain}/${checkpointId} is not open: create it again`);
    return c;
  }

  /**
   * The view, its backup job running: one a write into the powered-off disk interrupted is taken again first, so
   * it shows the disk with those writes (a failback reads each disk before it writes it).
   */
  private async liveView(domain: string, checkpointId: string): Promise<CheckpointRecord> {
    if (this.openView(domain, checkpointId).status === 'interrupted')
      await this.exclusive(domain, async () => {
        const c = this.openView(domain, checkpointId);
        if (c.status !== 'interrupted') return;
        await this.interruptViews(domain); // one a crash cut short
        if ((await this.domState(domain)).state !== 'shut off')
          throw conflict(`checkpoint ${domain}/${checkpointId} was interrupted and ${domain} runs: create it again`);
        await this.beginView(domain, c);
      });
    return this.openView(domain, checkpointId);
  }

  /** The NBD export of one disk of an open view (one connection, shared by concurrent reads). */
  async viewExport(domain: string, checkpointId: string, disk: string): Promise<NbdClient> {
    const c = await this.liveView(domain, checkpointId);
    this.viewDiskSize(domain, checkpointId, disk);
    if (c.offline && !(await this.viewServed(domain, c))) await this.serveOfflineView(domain, checkpointId);
    const key = `${domain}/${checkpointId}/${disk}`;
    let client = this.exports.get(key);
    if (!client) {
      const changes = changesContext(c, disk);
      client = NbdClient.connect({
        ...(c.offline
          ? { path: this.offlineExportOf(domain, disk).socket, exportName: 'disk' }
          : { path: this.socketOf(domain), exportName: disk }),
        metaContexts: [BASE_ALLOCATION, ...(changes ? [changes] : [])],
        replyTimeoutMs: NBD_REPLY_TIMEOUT_MS,
      }).catch(async (e: unknown) => {
        // The QEMU that served the view stopped (killed, or restarted since): no retry brings it back.
        if (!c.offline && (await this.backupJobGone(domain)))
          throw conflict(
            `the view of checkpoint ${domain}/${checkpointId} is gone: the QEMU of ${domain} that served it has ` +
              `stopped since; create the checkpoint again`,
          );
        throw e;
      });
      this.exports.set(key, client);
      client.catch(() => this.exports.delete(key));
    }
    const ready = await client;
    if (ready.closed) {
      this.exports.delete(key);
      return this.viewExport(domain, checkpointId, disk);
    }
    return ready;
  }

  /** A disk's size in an open view (what reads are checked against). */
  viewDiskSize(domain: string, checkpointId: string, disk: string): number {
    const d = this.openView(domain, checkpointId).disks.find((x) => x.id === disk);
    if (!d) throw notFound(`disk ${domain}/${disk}`, 'disk');
    return d.sizeBytes;
  }

  /** Blocks changed since the reference point, as the backup's dirty bitmap has them. */
  async changedExtents(
    domain: string,
    disk: string,
    referencePointId: string,
    checkpointId: string,
  ): Promise<Extent[]> {
    const reference = this.state.domain(domain).referencePoints.find((r) => r.id === referencePointId);
    if (!reference) throw notFound(`reference point ${domain}/${referencePointId}`, 'referencePointId');
    const c = await this.liveView(domain, checkpointId);
    if (!reference.trackingValid) throw trackingLost(`change tracking of ${domain} since ${referencePointId} was lost`);
    if (c.incrementalFrom !== reference.checkpointId)
      throw trackingLost(`checkpoint ${checkpointId} counts no changes since ${referencePointId}`);
    const nbd = await this.viewExport(domain, checkpointId, disk);
    const map = await nbd.blockStatus(changesContext(c, disk)!, 0, nbd.size);
    return toBlocks(map.filter((e) => (e.flags & STATE_DIRTY) !== 0));
  }

  /** Blocks that may hold data at the checkpoint: all but those that read as zeroes. */
  async allocatedExtents(domain: string, disk: string, checkpointId: string): Promise<Extent[]> {
    const nbd = await this.viewExport(domain, checkpointId, disk);
    const map = await nbd.blockStatus(BASE_ALLOCATION, 0, nbd.size);
    return toBlocks(map.filter((e) => (e.flags & STATE_ZERO) === 0));
  }

  async *readExtents(
    domain: string,
    disk: string,
    checkpointId: string,
    extents: Extent[],
  ): AsyncGenerator<ExtentData> {
    const nbd = await this.viewExport(domain, checkpointId, disk);
    for await (const piece of nbd.readExtents([...readPieces(extents)], { pieceSize: READ_PIECE_BYTES }))
      yield { offset: piece.offset, data: piece.data };
  }

  async blockDigests(
    domain: string,
    disk: string,
    checkpointId: string,
    range: { startBlock: number; count: number },
  ): Promise<BlockDigests> {
    const whole = [{ offset: range.startBlock * BLOCK_SIZE, length: range.count * BLOCK_SIZE }];
    return digestsOf(this.readExtents(domain, disk, checkpointId, whole), range.startBlock);
  }

  /** The guest's write sequence on its first disk at the checkpoint (0 for a guest that keeps none). */
  async readCanary(domain: string, checkpointId: string): Promise<number> {
    const [first] = this.openView(domain, checkpointId).disks;
    if (!first) return 0;
    const nbd = await this.viewExport(domain, checkpointId, first.id);
    try {
      return parseCanary(await nbd.read(0, CANARY_BYTES));
    } catch (e) {
      if (e instanceof Error && /corrupt canary/.test(e.message)) return 0;
      throw e;
    }
  }
}

/**
 * The NBD meta context of a view's changes since its reference point: the backup job's bitmap of the disk, or, for an
 * offline view, the reference point's own bitmap. None for a view without a reference point.
 */
function changesContext(c: CheckpointRecord, disk: string): string | undefined {
  if (!c.incrementalFrom) return undefined;
  return dirtyBitmapContext(c.offline ? c.incrementalFrom : bitmapExport(disk));
}

const diskInfos = (images: DiskImage[]): DiskInfo[] => images.map((d) => ({ id: d.target, sizeBytes: d.sizeBytes }));

/** A qcow2 image's size as its guest sees it and its dirty bitmaps, from its header (shared with a QEMU that runs). */
async function imageInfo(image: string): Promise<{ sizeBytes: number; bitmaps: ImageBitmap[] }> {
  const { stdout } = await run('qemu-img', ['info', '-U', '--output=json', image]);
  const info = JSON.parse(stdout) as {
    'virtual-size'?: unknown;
    'format-specific'?: { data?: { bitmaps?: ImageBitmap[] } };
  };
  const size = info['virtual-size'];
  if (typeof size !== 'number') throw new Error(`no virtual size for ${image}: ${stdout}`);
  return { sizeBytes: size, bitmaps: info['format-specific']?.data?.bitmaps ?? [] };
}

/** Another tool's backup job runs on the domain: never aborted by the agent, which waits for it to end. */
const foreignBackup = (domain: string): HostApiError =>
  conflict(`another tool's backup job runs on ${domain}; the agent does not abort it: try again after it`);

/** A view's NBD socket: named by a hash, as a unix socket path holds 107 bytes and a domain name up to 128. */
function socketPath(stateDir: string, domain: string): string {
  return join(stateDir, 'run', `${createHash('sha256').update(domain).digest('hex').slice(0, 16)}.sock`);
}

function lastStopFromReason(state: string, reason: string): VmInfo['lastStop'] {
  if (state !== 'shut off') return null;
  if (reason === 'shutdown') return 'guest-shutdown';
  if (reason === 'destroyed' || reason === 'crashed') return 'forced-off';
  return null;
}
