// libvirt through `virsh`: the one client every KVM operator already has, with machine-readable output for what
// the host needs (the npm bindings cover no checkpoints, backups or events). Each call is its own process, 17–40 ms.
import { execFile } from 'node:child_process';

export class VirshError extends Error {
  constructor(
    readonly args: readonly string[],
    /** libvirt's own message, without virsh's "error: " prefixes. */
    readonly detail: string,
    readonly exitCode: number | null,
  ) {
    super(`virsh ${args.join(' ')}: ${detail}`);
    this.name = 'VirshError';
  }
}

export interface VirshOptions {
  /** Deadline of the call; virsh is killed after it. Default 60 s. */
  timeoutMs?: number;
  signal?: AbortSignal;
}

/** libvirt's message from virsh's stderr: the "error: " lines, joined. */
function messageOf(stderr: string): string {
  const lines = stderr
    .split('\n')
    .map((l) => l.replace(/^error:\s*/, '').trim())
    .filter((l) => l !== '');
  return lines.join('; ') || 'failed without a message';
}

/** A libvirt connection, by its URI (`qemu:///system`, `qemu+unix:///system?socket=…`, `qemu+tcp://host/system`). */
export class Virsh {
  constructor(readonly uri: string) {}

  /** Runs `virsh -c <uri> <args>` and returns its standard output. */
  run(args: readonly string[], options: VirshOptions = {}): Promise<string> {
    return new Promise((resolve, reject) => {
      execFile(
        'virsh',
        ['-q', '-c', this.uri, ...args],
        { timeout: options.timeoutMs ?? 60_000, signal: options.signal, maxBuffer: 64 * 1024 * 1024 },
        (error, stdout, stderr) => {
          if (error) {
            const code = typeof error.code === 'number' ? error.code : null;
            const detail = error.killed ? `no answer within ${options.timeoutMs ?? 60_000} ms` : messageOf(stderr);
            reject(new VirshError(args, detail, code));
          } else resolve(stdout);
        },
      );
    });
  }

  /** Names of the domains defined on this connection, running or not. */
  async domains(): Promise<string[]> {
    return lines(await this.run(['list', '--all', '--name']));
  }

  /** The domain's state as libvirt says it: `running`, `shut off`, `paused`, … */
  async domainState(domain: string): Promise<string> {
    return (await this.run(['domstate', domain])).trim();
  }
}

/**
 * Why virsh could take the name for another domain's, or null: virsh looks a domain up by ID first, then by UUID, then
 * by name, so a domain named `101` or like a UUID may be resolved to another one.
 */
export function ambiguousDomainName(name: string): string | null {
  if (/^\d+$/.test(name)) return 'virsh would take an all-digit name for a domain ID';
  if (/^[0-9a-f]{32}$/i.test(name.replace(/-/g, ''))) return 'virsh would take a UUID-shaped name for a domain UUID';
  return null;
}

export const lines = (text: string): string[] =>
  text
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '');
