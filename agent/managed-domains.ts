// The libvirt domains the agent may act on as source VMs: those its operator listed in its domains file (one name a
// line; `#` starts a comment), and those it made itself (failback to a new VM, recorded in its state). Every other
// domain of the host is invisible to it: not listed, not read, not powered, not written. The file is read again when
// it changes, so a VM is put under the agent's care without a restart.
import { readFile, stat } from 'node:fs/promises';
import { id } from '../src/host-api/schemas';
import { ambiguousDomainName } from './libvirt/virsh';

/** The names of a domains file's text; throws naming the line of a name that is not a valid VM name. */
export function parseDomainsFile(text: string, file: string): Set<string> {
  const names = new Set<string>();
  text.split('\n').forEach((raw, i) => {
    const line = raw.replace(/#.*/, '').trim();
    if (line === '') return;
    if (!id.safeParse(line).success) throw new Error(`${file}:${i + 1}: '${line}' is not a domain name`);
    const ambiguous = ambiguousDomainName(line);
    if (ambiguous) throw new Error(`${file}:${i + 1}: '${line}': ${ambiguous}; rename the domain`);
    names.add(line);
  });
  return names;
}

export class ManagedDomains {
  private cached: { key: string; names: Set<string> } | null = null;

  /** `file` null: no source domain is listed (a DR host, which acts on its replicas only). */
  private constructor(
    private readonly file: string | null,
    private readonly log: (message: string) => void,
  ) {}

  /** Reads the file once now, so that a missing or malformed one stops the agent at start-up. */
  static async open(file: string | null, log: (message: string) => void): Promise<ManagedDomains> {
    const managed = new ManagedDomains(file, log);
    await managed.names();
    return managed;
  }

  /** The listed names, as the file holds them now; a file that became unreadable or malformed keeps the last list. */
  async names(): Promise<ReadonlySet<string>> {
    if (this.file === null) return new Set();
    const s = await stat(this.file).catch((e: unknown) => {
      if (this.cached) return null;
      throw e;
    });
    if (s === null) return this.cached!.names;
    const key = `${s.mtimeMs}/${s.size}/${s.ino}`;
    if (this.cached?.key === key) return this.cached.names;
    try {
      this.cached = { key, names: parseDomainsFile(await readFile(this.file, 'utf8'), this.file) };
      this.log(`domains file read: ${[...this.cached.names].join(', ') || 'none'}`);
    } catch (e) {
      if (!this.cached) throw e;
      this.log(`domains file not read again, the last list stays: ${e instanceof Error ? e.message : String(e)}`);
      this.cached.key = key; // said once, until the file changes again
    }
    return this.cached.names;
  }

  async has(domain: string): Promise<boolean> {
    return (await this.names()).has(domain);
  }
}
