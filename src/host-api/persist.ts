// Durable files for a host's own state (the lab's and a KVM host process's): whole or not at all, and still there after
// a power loss.
import { access, mkdir, open, readFile, rename, unlink } from 'node:fs/promises';
import { dirname } from 'node:path';

/** Whether the path exists (any error reaching it counts as no). */
export const exists = (path: string): Promise<boolean> =>
  access(path).then(
    () => true,
    () => false,
  );

/** Makes the directory's entries (files created, renamed or removed in it) durable. */
export async function fsyncDir(dir: string): Promise<void> {
  const h = await open(dir, 'r');
  try {
    await h.sync();
  } finally {
    await h.close();
  }
}

/** Write tmp, fsync, rename over, fsync the directory: readers see the old or the new file, whole. */
export async function writeFileAtomic(path: string, data: string, mode = 0o666): Promise<void> {
  await mkdir(dirname(path), { recursive: true });
  const tmp = `${path}.tmp`;
  if (mode !== 0o666) await removeFile(tmp); // one left by a crash keeps the mode it was created with
  const h = await open(tmp, 'w', mode);
  try {
    await h.writeFile(data);
    await h.sync();
  } finally {
    await h.close();
  }
  await rename(tmp, path);
  await fsyncDir(dirname(path));
}

/** Unlinks a file; one that is gone already is fine. */
export async function removeFile(path: string): Promise<void> {
  await unlink(path).catch((e: NodeJS.ErrnoException) => {
    if (e.code !== 'ENOENT') throw e;
  });
}

export async function removeDurably(path: string): Promise<void> {
  await removeFile(path);
  await fsyncDir(dirname(path));
}

export async function readJson<T>(path: string): Promise<T | null> {
  try {
    return JSON.parse(await readFile(path, 'utf8')) as T;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw e;
  }
}
