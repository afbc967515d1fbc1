// What a KVM host process keeps beside libvirt: which libvirt checkpoint each reference point stands for (the last
// one whose copy really completed), the checkpoint views it has open, and how each domain last stopped when libvirt
// cannot say. One JSON file, rewritten atomically after every change, so a restart of the process finds it whole.
import { join } from 'node:path';
import { z } from 'zod';
import { readJson, writeFileAtomic } from '../../src/host-api/persist';

const checkpointRecord = z.strictObject({
  id: z.string(),
  createdAt: z.string(),
  /** The libvirt checkpoint the view's changes are counted from (a reference point's); null: no changes known. */
  incrementalFrom: z.string().nullable(),
  /** The domain was off: it was started paused for the backup and is destroyed again when the view closes. */
  pausedStart: z.boolean(),
  /** The disks the view exports, as they were at its start: reads need nothing from libvirtd (it may restart). */
  disks: z.array(z.strictObject({ id: z.string(), sizeBytes: z.number() })),
  /** `beginning` is written before the backup job starts, so a crash between the two is found and cleaned up. */
  status: z.enum(['beginning', 'open']),
});
const referenceRecord = z.strictObject({
  id: z.string(),
  checkpointId: z.string(),
  createdAt: z.string(),
  /** False once change tracking since it was lost (QEMU killed, its bitmaps inconsistent). */
  trackingValid: z.boolean(),
});
const domainRecord = z.strictObject({
  checkpoints: z.array(checkpointRecord),
  referencePoints: z.array(referenceRecord),
  /** How the domain last stopped by this host's hand; null: ask libvirt (it stopped by itself or an operator). */
  lastStop: z.enum(['guest-shutdown', 'forced-off']).nullable(),
});
const stateFile = z.strictObject({ version: z.literal(1), domains: z.record(z.string(), domainRecord) });

export type CheckpointRecord = z.infer<typeof checkpointRecord>;
export type ReferenceRecord = z.infer<typeof referenceRecord>;
export type DomainRecord = z.infer<typeof domainRecord>;

const emptyDomain = (): DomainRecord => ({ checkpoints: [], referencePoints: [], lastStop: null });

export class HostState {
  private constructor(
    private readonly path: string,
    private readonly file: z.infer<typeof stateFile>,
  ) {}

  static async load(stateDir: string): Promise<HostState> {
    const path = join(stateDir, 'host-state.json');
    const raw = await readJson<unknown>(path);
    if (raw === null) return new HostState(path, { version: 1, domains: {} });
    const parsed = stateFile.safeParse(raw);
    if (!parsed.success) throw new Error(`${path}: not a host state file: ${parsed.error.issues[0]?.message ?? ''}`);
    return new HostState(path, parsed.data);
  }

  /** A copy: change it through update(). */
  domain(name: string): DomainRecord {
    return structuredClone(this.file.domains[name] ?? emptyDomain());
  }

  /** Applies the change and writes the file before it returns; a failed write leaves the old state in force. */
  async update(name: string, change: (d: DomainRecord) => void): Promise<DomainRecord> {
    const next = this.domain(name);
    change(next);
    const domains = { ...this.file.domains, [name]: next };
    await writeFileAtomic(this.path, `${JSON.stringify({ version: 1, domains }, null, 2)}\n`);
    this.file.domains = domains;
    return structuredClone(next);
  }
}
