// Repairs of the data directory at start-up, and the one multi-file move of a running lab (a running layer's
// files becoming a restore point's). Creating and removing layers needs no repair log of its own: layer files are
// created before the metadata names them and removed after it stopped naming them, so after a crash the files
// the metadata does not name are exactly the unfinished steps' garbage, and sweepUnreferenced removes them.

import { copyFile, readdir, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { crashPoint } from './crash';
import { finishSealing, layerStems, stem, type BackupMeta, type VmMeta } from './metadata';
import { fsyncPath } from '../src/host-api/persist';

const EXTENSIONS = ['.img', '.map'] as const;

export const vmDir = (dataDir: string, vm: string): string => join(dataDir, 'vms', vm);
export const backupDir = (dataDir: string, backupId: string): string => join(dataDir, 'backups', backupId);

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    (e: NodeJS.ErrnoException) => {
      if (e.code === 'ENOENT') return false;
      throw e;
    },
  );
}

/**
 * Renames the running layer's files of every disk to the point's. Repeating it after a crash part-way finishes the
 * move: a file already moved is skipped, and a rename replaces whatever was left under the point's name.
 */
export async function moveRunningLayerFiles(dir: string, disks: string[], pointId: string): Promise<void> {
  let renamed = 0;
  for (const disk of disks)
    for (const ext of EXTENSIONS) {
      const from = join(dir, stem.running(disk) + ext);
      if (!(await exists(from))) continue;
      await rename(from, join(dir, stem.point(pointId, disk) + ext));
      if (++renamed === 1) crashPoint('seal-running:after-first-rename');
    }
  await fsyncPath(dir);
}

/** Finishes the seals of running layers that a crash interrupted (the metadata holds their intent). */
export async function finishInterruptedSeals(dataDir: string, metas: VmMeta[]): Promise<void> {
  for (const meta of metas) {
    if (!meta.replica?.sealing) continue;
    const disks = meta.disks.map((d) => d.id);
    await moveRunningLayerFiles(vmDir(dataDir, meta.name), disks, meta.replica.sealing.id);
    finishSealing(meta.replica);
  }
}

/**
 * Renames version-1 layer files (`cp-<id>-<disk>`, `pt-<id>-<disk>`) to today's names, as the metadata knows the
 * ids and disks. An old name two layers shared is copied to each: both read that one file until now.
 */
export async function migrateVersion1Names(dataDir: string, metas: VmMeta[], log: (m: string) => void): Promise<void> {
  for (const meta of metas) {
    const dir = vmDir(dataDir, meta.name);
    const targets = new Map<string, string[]>();
    const add = (old: string, now: string) => targets.set(old, [...(targets.get(old) ?? []), now]);
    for (const { id: disk } of meta.disks) {
      for (const cp of meta.checkpoints) add(`cp-${cp.id}-${disk}`, stem.checkpoint(cp.id, disk));
      for (const p of meta.replica?.points ?? []) add(`pt-${p.id}-${disk}`, stem.point(p.id, disk));
    }
    for (const [old, [first, ...others]] of targets) {
      if (others.length > 0 && (await exists(join(dir, `${old}.img`))))
        log(`${meta.name}: layer file ${old} was shared by ${[first, ...others].join(', ')}; each gets a copy`);
      for (const ext of EXTENSIONS) {
        const from = join(dir, old + ext);
        if (!(await exists(from))) continue;
        for (const other of others) await copyFile(from, join(dir, other + ext));
        await rename(from, join(dir, first! + ext));
      }
    }
    if (targets.size > 0) await fsyncPath(dir);
  }
}

/**
 * Removes every layer file the metadata does not name (the leftovers of steps a crash interrupted), and the
 * directories of VMs and backups it does not know.
 */
export async function sweepUnreferenced(
  dataDir: string,
  metas: VmMeta[],
  backups: BackupMeta[],
  log: (m: string) => void,
): Promise<void> {
  await sweep(join(dataDir, 'vms'), new Map(metas.map((m) => [m.name, layerStems(m)])), log);
  await sweep(join(dataDir, 'backups'), new Map(backups.map((b) => [b.id, b.disks.map((d) => d.id)])), log);
}

async function sweep(root: string, stems: Map<string, string[]>, log: (m: string) => void): Promise<void> {
  const entries = await readdir(root, { withFileTypes: true }).catch((e: NodeJS.ErrnoException) => {
    if (e.code === 'ENOENT') return [];
    throw e;
  });
  let removedHere = false;
  for (const entry of entries) {
    const path = join(root, entry.name);
    const keep = stems.get(entry.name);
    if (!keep || !entry.isDirectory()) {
      log(`start-up: removed ${path}, which no metadata refers to`);
      await rm(path, { recursive: true, force: true });
      removedHere = true;
      continue;
    }
    const files = new Set(keep.flatMap((s) => EXTENSIONS.map((ext) => s + ext)));
    let removed = false;
    for (const name of await readdir(path))
      if (!files.has(name)) {
        log(`start-up: removed ${join(path, name)}, which no metadata refers to`);
        await rm(join(path, name), { recursive: true, force: true });
        removed = true;
      }
    if (removed) await fsyncPath(path);
  }
  if (removedHere) await fsyncPath(root);
}
