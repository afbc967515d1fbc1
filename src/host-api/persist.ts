// Durable files for a host's own state (the lab's and a KVM host process's): whole or not at all, and still there after
// a power loss.
import { randomBytes } from 'node:crypto';
import { access, mkdir, open, readdir, readFile, rename, unlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';

/** Whether the path exists (any error reaching it counts as no). */
export const exists = (path: string): Promise<boolean> =>
  access(path).then(
    () => true,
    () => false,
  );

/**
 * Makes a file's data, or a directory's entries (files created, renamed or removed in it), durable: an fsync of that
 * one path, not of its whole filesystem.
 */
export async function fsyncPath(path: string): Promise<void> {
  const h = await open(path, 'r');
  try {
    await h.sync();
  } finally {
    await h.close();
  }
}

/** The temporary files of writeFileAtomic for `path`: `<name>.<random>.tmp` beside it. */
const TMP_SUFFIX = /\.[0-9a-f]{16}\.tmp$/;

/**
 * Write a temporary file of a name of its own, fsync, rename over, fsync the directory: readers see the old or the
 * new file, whole. Concurrent writers of one path never share a temporary file (the last rename wins, whole).
 */
export async function writeFileAtomic(path: string, data: string, mode = 0o666): Promise<void> {
  await mkdir(dirname(path), { recursive: true });
  const tmp = `${path}.${randomBytes(8).toString('hex')}.tmp`;
  const h = await open(tmp, 'wx', mode);
  try {
    await h.writeFile(data);
    await h.sync();
  } finally {
    await h.close();
  }
  await rename(tmp, path).catch(async (e: unknown) => {
    await removeFile(tmp);
    throw e;
  });
  await fsyncPath(dirname(path));
}

/** Removes the temporary files that writes of `path` cut short by a crash left beside it. */
export async function removeLeftoverTemporaries(path: string): Promise<void> {
  const name = basename(path);
  for (const f of await readdir(dirname(path)).catch(() => []))
    if (f.startsWith(`${name}.`) && TMP_SUFFIX.test(f.slice(name.length))) await removeFile(join(dirname(path), f));
}

interface QueuedChange<T> {
  apply(draft: T): unknown;
  resolve(result: unknown): void;
  reject(error: unknown): void;
}

/**
 * A JSON state file with one writer: changes are queued, applied in order to a copy of the saved state, and written
 * together by the one save in flight; each caller's promise settles once its change is on disk (or failed with the
 * batch, which leaves the saved state, and what `saved` shows, as it was). What `saved` shows is always what the file
 * holds.
 */
export class JsonStateFile<T> {
  private queue: QueuedChange<T>[] = [];
  private saving: Promise<void> | null = null;

  private constructor(
    readonly path: string,
    private state: T,
  ) {}

  /** The file's state, or `empty` when there is none yet; `parse` checks what it holds. */
  static async load<T>(path: string, parse: (raw: unknown) => T, empty: () => T): Promise<JsonStateFile<T>> {
    await removeLeftoverTemporaries(path);
    const raw = await readJson<unknown>(path);
    return new JsonStateFile(path, raw === null ? empty() : parse(raw));
  }

  /** The saved state; a copy is taken by whoever wants to change it (through change()). */
  get saved(): Readonly<T> {
    return this.state;
  }

  /** Applies `apply` to the state and resolves with its result once the state with it is on disk. */
  change<R>(apply: (draft: T) => R): Promise<R> {
    return new Promise<R>((resolve, reject) => {
      this.queue.push({ apply, resolve: resolve, reject });
      this.saving ??= this.saveQueued();
    });
  }

  private async saveQueued(): Promise<void> {
    while (this.queue.length > 0) {
      const batch = this.queue;
      this.queue = [];
      const { next, results } = this.draft(batch);
      if (batch.length === 0) continue;
      try {
        await writeFileAtomic(this.path, `${JSON.stringify(next, null, 2)}\n`);
      } catch (e) {
        for (const c of batch) c.reject(e);
        continue;
      }
      this.state = next;
      batch.forEach((c, i) => c.resolve(results[i]));
    }
    this.saving = null;
  }

  /** The saved state with the batch's changes; a change that throws is refused alone (removed from the batch). */
  private draft(batch: QueuedChange<T>[]): { next: T; results: unknown[] } {
    for (;;) {
      const next = structuredClone(this.state);
      const results: unknown[] = [];
      const failed = batch.findIndex((c) => {
        try {
          results.push(c.apply(next));
          return false;
        } catch (e) {
          c.reject(e);
          return true;
        }
      });
      if (failed < 0) return { next, results };
      batch.splice(failed, 1); // it may have changed the draft half-way: drafted again without it
    }
  }
}

/** Unlinks a file; one that is gone already is fine. */
export async function removeFile(path: string): Promise<void> {
  await unlink(path).catch((e: NodeJS.ErrnoException) => {
    if (e.code !== 'ENOENT') throw e;
  });
}

export async function removeDurably(path: string): Promise<void> {
  await removeFile(path);
  await fsyncPath(dirname(path));
}

export async function readJson<T>(path: string): Promise<T | null> {
  try {
    return JSON.parse(await readFile(path, 'utf8')) as T;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw e;
  }
}
