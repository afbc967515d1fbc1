// Toxiproxy (built by scripts/install-chaos-tools.sh) between the proxy workers and each KVM host process: a TCP proxy
// per host whose connections the suite cuts, stalls or slows through Toxiproxy's HTTP API.
import { spawn, type ChildProcess } from 'node:child_process';
import { setTimeout as delay } from 'node:timers/promises';

export type ToxicType = 'latency' | 'bandwidth' | 'slicer' | 'timeout' | 'reset_peer' | 'limit_data';

export interface Toxic {
  type: ToxicType;
  /** upstream: from the worker to the host; downstream: the host's answers. */
  stream: 'upstream' | 'downstream';
  attributes: Record<string, number>;
}

export class Toxiproxy {
  private constructor(
    private readonly child: ChildProcess,
    private readonly api: string,
  ) {}

  static async start(binary: string, apiPort: number): Promise<Toxiproxy> {
    const child = spawn(binary, ['-host', '127.0.0.1', '-port', String(apiPort)], { stdio: 'ignore' });
    const t = new Toxiproxy(child, `http://127.0.0.1:${apiPort}`);
    for (let i = 0; i < 200; i++) {
      if (child.exitCode !== null) throw new Error(`toxiproxy-server exited (${child.exitCode})`);
      if (
        await fetch(`${t.api}/version`).then(
          (r) => r.ok,
          () => false,
        )
      )
        return t;
      await delay(50);
    }
    child.kill('SIGKILL');
    throw new Error('toxiproxy-server did not answer within 10 s');
  }

  private async call(method: string, path: string, body?: object): Promise<unknown> {
    const r = await fetch(`${this.api}${path}`, {
      method,
      ...(body ? { body: JSON.stringify(body), headers: { 'content-type': 'application/json' } } : {}),
    });
    const text = await r.text();
    if (!r.ok) throw new Error(`toxiproxy ${method} ${path}: ${r.status} ${text}`);
    return text ? (JSON.parse(text) as unknown) : undefined;
  }

  /** A proxy listening on 127.0.0.1:`listenPort` for `upstream` (host:port). */
  async createProxy(name: string, listenPort: number, upstream: string): Promise<void> {
    await this.call('POST', '/proxies', { name, listen: `127.0.0.1:${listenPort}`, upstream, enabled: true });
  }

  /** Applies to the proxy's open connections too: that is what cuts or stalls a transfer in flight. */
  async addToxic(proxy: string, name: string, toxic: Toxic): Promise<void> {
    await this.call('POST', `/proxies/${proxy}/toxics`, { name, toxicity: 1, ...toxic });
  }

  async removeToxic(proxy: string, name: string): Promise<void> {
    await this.call('DELETE', `/proxies/${proxy}/toxics/${name}`).catch(() => undefined); // gone already
  }

  /** Disabled: every connection closed at once and new ones refused (the host's network gone). */
  async setEnabled(proxy: string, enabled: boolean): Promise<void> {
    await this.call('POST', `/proxies/${proxy}`, { enabled });
  }

  /** Every proxy enabled, every toxic gone. */
  async reset(): Promise<void> {
    await this.call('POST', '/reset');
  }

  close(): void {
    this.child.kill('SIGKILL');
  }
}
