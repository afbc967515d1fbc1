// The lab as the suite's hosts: one lab process serving the production and the DR host (and the backup repository),
// whose faults are its death and the faults it injects into its own answers (unreachable, failing, slow, transfers
// cut), short or aimed at a planned failover's critical window.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { HostApiHypervisor, LabControl, LabFault } from '../../src/hypervisor/host-api-adapter';
import type { ServerTlsFiles } from '../../src/host-api/certificates';
import { labControl, labPort, labServerTls } from '../tls';
import { labEstateInput, LAB_ESTATE } from './estate';
import { type ChaosHosts, type FaultContext, type HostFaultKind, LAB_FAULTS, SUITE_FAULTS } from './hosts';
import { sourceDigest } from './images';
import { ManagedProcess } from './processes';
import type { Upstream } from './recorder';

export class LabHosts implements ChaosHosts {
  readonly estate = LAB_ESTATE;
  // The order of the original suite, so that a seed replays as it did.
  readonly faultKinds = [
    'workflowWorkerKill',
    'proxyWorkerKill',
    'labKill',
    'serverRestart',
    'terminate',
    'reset',
    'proxyOffline',
    'hostUnreachable',
    'hostFail',
    'hostSlow',
    'transferCut',
  ] as const satisfies readonly ((typeof SUITE_FAULTS)[number] | (typeof LAB_FAULTS)[number])[];
  readonly timing = { faultWindowMs: 9_000, runForMs: 25_000 };
  private lab!: ManagedProcess;
  private port: HostApiHypervisor | undefined;
  private control!: LabControl;
  private tls!: ServerTlsFiles;
  private readonly url: string;

  constructor(private readonly o: { workDir: string; port: number }) {
    this.url = `https://127.0.0.1:${o.port}`;
  }

  get direct(): HostApiHypervisor {
    if (!this.port) throw new Error('the lab is not started');
    return this.port;
  }

  /** The lab over mutual TLS, with a certificate naming every host it plays (the run's site: test/tls.ts). */
  async start(): Promise<void> {
    const { workDir, port } = this.o;
    const estate = labEstateInput(this.estate);
    const estatePath = join(workDir, 'estate.json');
    writeFileSync(estatePath, JSON.stringify(estate));
    this.tls = await labServerTls(estate);
    this.lab = new ManagedProcess(
      'lab',
      [
        ...['--import', 'tsx', 'lab/main.ts', '--estate', estatePath, '--data', join(workDir, 'lab')],
        ...['--port', String(port), '--tls-cert', this.tls.cert, '--tls-key', this.tls.key],
        ...['--client-ca', this.tls.clientCa],
      ],
      {},
      /listening on https/,
    );
    this.port = labPort(this.url);
    this.control = labControl(this.url);
    await this.lab.ensureRunning();
  }

  async upstreams(): Promise<Record<string, Upstream>> {
    const lab: Upstream = { url: this.url, servername: 'lab', tls: this.tls };
    return { [this.estate.productionHost]: lab, [this.estate.drHost]: lab };
  }

  async workerUrls(recorderUrls: Record<string, string>): Promise<Record<string, string>> {
    return recorderUrls;
  }

  sourceImage(vm: string): Promise<string> {
    return sourceDigest(this.direct, this.estate.productionHost, vm, this.estate.vmDisks[vm]!);
  }

  poweredOn(): void {}

  runningReplaced(): void {}

  async inject(kind: HostFaultKind, ctx: FaultContext): Promise<boolean> {
    if (kind === 'labKill') {
      const down = ctx.downMs / 2;
      ctx.note(`SIGKILL lab, restart after ${down} ms`);
      await this.lab.bounce(down);
      return true;
    }
    return this.hostFault(kind, ctx);
  }

  /**
   * A host fault: short (1–6 s, often outlasted by the steps' retries), or aimed at a planned failover's critical
   * window and long enough (8–20 s) to exhaust a step's attempts there, so that the session halts.
   */
  private async hostFault(kind: HostFaultKind, { chance: c, note, sessionInWindow }: FaultContext): Promise<boolean> {
    const host = c.pick([this.estate.productionHost, this.estate.drHost]);
    const aimed = c.chance(0.5);
    let durationMs = c.int(1_000, 6_000);
    const transfer = '/(write|send|read)$';
    let fault: LabFault;
    if (kind === 'hostUnreachable') fault = { kind: 'unreachable', durationMs };
    else if (kind === 'hostFail') fault = { kind: 'fail', status: c.pick([500, 503, 503, 409]), durationMs };
    else if (kind === 'hostSlow') fault = { kind: 'slow', latencyMs: c.int(200, 3_000), durationMs };
    else fault = { kind: 'cut', afterBytes: c.int(0, 1024 * 1024), path: transfer, durationMs };
    if (kind !== 'transferCut' && c.chance(0.4))
      fault.path = c.pick([transfer, '/power$', '/points/', '/checkpoints/']);
    let at = '';
    if (aimed) {
      const session = await sessionInWindow(15_000);
      if (session) {
        durationMs = c.int(8_000, 20_000);
        fault.durationMs = durationMs;
        if (kind === 'hostSlow' && fault.kind === 'slow') fault.latencyMs = c.int(5_000, 15_000);
        at = ` aimed at ${session}`;
      }
    }
    note(`${host}: ${JSON.stringify(fault)}${at}`);
    await this.control.setFault(host, fault);
    return true;
  }

  async heal(): Promise<string[]> {
    const started = (await this.lab.ensureRunning()) ? [this.lab.name] : [];
    for (const host of [this.estate.productionHost, this.estate.drHost]) await this.control.clearFaults(host);
    return started;
  }

  async afterSettle(): Promise<void> {}

  async check(): Promise<void> {}

  async evidence(dir: string): Promise<void> {
    writeFileSync(join(dir, 'lab.log'), this.lab.output);
  }

  async close(): Promise<void> {
    await this.lab?.close();
    this.port?.close();
    this.control?.close();
  }
}
