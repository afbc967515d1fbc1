// Where and when a restore point's data came from, and choosing points by time. Pure: workflows and activities
// share these rules.

/** Metadata keys every restore point carries, so that the DR host alone tells where its data came from. */
export const PointMetadata = {
  session: 'session',
  /** What the data was read from: a checkpoint of a VM, a backup point, or the replica's own running state. */
  sourceKind: 'sourceKind',
  sourceHost: 'sourceHost',
  sourceVm: 'sourceVm',
  /** The instant the data shows (ISO time on the host that took it): a checkpoint's or a backup's creation. */
  sourceTime: 'sourceTime',
  sourceCheckpoint: 'sourceCheckpoint',
  /** The source reference point taken at the same instant: the base of the next incremental run. */
  sourceReferencePoint: 'sourceReferencePoint',
  sourceBackup: 'sourceBackup',
  /** Kept for points written before sourceTime existed (0.1.0): the backup's creation time. */
  sourceBackupTime: 'sourceBackupTime',
  /** Failback: the production VM the point's data was shipped to. */
  productionVm: 'productionVm',
  productionHost: 'productionHost',
} as const;

export type SourceKind = 'checkpoint' | 'backup' | 'replica';

/** The provenance of a point copied from a checkpoint of a VM, with the reference point taken with it. */
export function checkpointProvenance(
  source: { host: string; vm: string },
  checkpoint: { id: string; createdAt: string },
  referencePointId: string,
): Record<string, string> {
  return {
    [PointMetadata.sourceKind]: 'checkpoint',
    [PointMetadata.sourceHost]: source.host,
    [PointMetadata.sourceVm]: source.vm,
    [PointMetadata.sourceCheckpoint]: checkpoint.id,
    [PointMetadata.sourceTime]: checkpoint.createdAt,
    [PointMetadata.sourceReferencePoint]: referencePointId,
  };
}

/** A point's provenance as the state query and the CLI show it. */
export interface PointSource {
  kind: SourceKind | 'unknown';
  host?: string;
  vm?: string;
  /** The instant the data shows. */
  at?: string;
  backupId?: string;
}

export function sourceOf(metadata: Readonly<Record<string, string>>): PointSource {
  const kind = metadata[PointMetadata.sourceKind];
  const out: PointSource = {
    kind: kind === 'checkpoint' || kind === 'backup' || kind === 'replica' ? kind : 'unknown',
  };
  const host = metadata[PointMetadata.sourceHost];
  const vm = metadata[PointMetadata.sourceVm];
  const at = metadata[PointMetadata.sourceTime] ?? metadata[PointMetadata.sourceBackupTime];
  const backupId = metadata[PointMetadata.sourceBackup];
  if (host) out.host = host;
  if (vm) out.vm = vm;
  if (at) out.at = at;
  if (backupId) out.backupId = backupId;
  if (out.kind === 'unknown' && backupId) out.kind = 'backup';
  return out;
}

/**
 * The instant a point's data shows, in epoch milliseconds. A point without provenance (written by 0.1.0) can
 * show no instant later than its own creation, so that is what it is taken for: a backup older than it is
 * never copied over it.
 */
export function dataInstantOf(point: { createdAt: string; metadata: Readonly<Record<string, string>> }): number {
  const at = sourceOf(point.metadata).at;
  const parsed = at === undefined ? Number.NaN : Date.parse(at);
  return Number.isNaN(parsed) ? Date.parse(point.createdAt) : parsed;
}

/** The newest backup whose data is newer than `instantMs` (the replica's head), or undefined. */
export function newestBackupAfter<B extends { createdAt: string }>(
  backups: readonly B[],
  instantMs: number | null,
): B | undefined {
  let newest: B | undefined;
  for (const b of backups)
    if (newest === undefined || Date.parse(b.createdAt) > Date.parse(newest.createdAt)) newest = b;
  if (newest === undefined) return undefined;
  return instantMs === null || Date.parse(newest.createdAt) > instantMs ? newest : undefined;
}

/**
 * The newest point created at or before `at`. Times are compared as instants, never as text: '10:00+02:00' is
 * 08:00Z, and fractions of a second count.
 */
export function pointAtOrBefore<P extends { createdAt: string }>(points: readonly P[], at: string): P | undefined {
  const limit = Date.parse(at);
  if (Number.isNaN(limit)) return undefined;
  let best: P | undefined;
  for (const p of points) {
    const t = Date.parse(p.createdAt);
    if (t <= limit && (best === undefined || t >= Date.parse(best.createdAt))) best = p;
  }
  return best;
}

/**
 * The points a failback drops: those newer than the head when the replica was failed over to an older point. The
 * running layer stands on the head, and sealing it as the protective point leaves the later points on a branch
 * nothing continues (both hosts drop them); the operation says so in its result.
 */
export function pointsAfterHead<P extends { id: string }>(points: readonly P[], headPointId: string | null): P[] {
  const head = points.findIndex((p) => p.id === headPointId);
  return head < 0 ? [] : points.slice(head + 1);
}
