// A KVM host for tests: a private libvirtd with one tiny guest defined as a domain, and our host process serving it.
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import {
  createGuestDisk,
  guestFiles,
  guestKernelCmdline,
  lastSeq,
  readGuestLines,
  waitForReady,
  waitForSeq,
  type ReadyLine,
  type GuestLine,
  type GuestWorkload,
} from '../../kvm/guest/guest';
import type { Virsh } from '../../agent/libvirt/virsh';
import { startKvmHost, type RunningKvmHost } from '../../agent/server';
import { guestDomainXml } from '../../kvm/libvirt/domain';
import { CAPABILITIES_CACHE, LibvirtInstance } from '../../kvm/libvirt/instance';
import { projectRoot } from '../../scripts/lib/dev-server';
import type { Client } from '@temporalio/client';
import { startPlannedFailover, startReplicationJob } from '../../src/client';
import type { PlannedFailoverSessionResult, ReplicationJobResult } from '../../src/contract';
import { connectHypervisor } from '../../src/config/hypervisor';
import type { HypervisorPort, ReplicaRef, VmRef } from '../../src/hypervisor/port';
import { startOrchestrator, testConfiguration, type TestOrchestrator } from '../harness';
import { testServerTls } from '../tls';

const exec = promisify(execFile);

export const GUEST_DISK_BYTES = 64 * 1024 * 1024;
export const BLOCKS_PER_ITERATION = 4;

/** The sequence number the guest said it stopped at, at its last clean shutdown. */
export function cleanStop(lines: GuestLine[]): number {
  const stops = lines.flatMap((l) => (l.kind === 'clean-shutdown' ? [l.seq] : []));
  assert.ok(stops.length > 0, 'the guest shut down cleanly');
  return stops.at(-1)!;
}

/**
 * A planned failover of a real guest from `prod`, checked: the workflow's own verifications, the source's last
 * write in helper point 2 by `qemu-img compare` against the source's image, and the replica's guest booted on the
 * DR host, resuming at the source's last sequence number and writing on (`consoleSince`: its console lines before).
 */
export async function assertFailedOver(
  s: PlannedFailoverSessionResult,
  t: { prod: TestKvmHost; replicaDir: string; consoleSince: number },
): Promise<void> {
  assert.equal(s.outcome, 'failedOver', s.detail);
  assert.equal(s.sourceShutdown, 'shut-down', 'ACPI shutdown of the real guest');
  assert.equal(s.verification?.identical, true, JSON.stringify(s.verification));
  assert.equal(s.fullVerification?.identical, true, JSON.stringify(s.fullVerification));
  assert.ok(s.downtime, 'downtime measured');
  const stoppedAt = cleanStop(await t.prod.guestLines());
  assert.equal(s.verification?.sourceCanary, stoppedAt);
  const helper2 = s.helperPoints.at(-1)!;
  await exec('qemu-img', ['compare', '-U', join(t.replicaDir, `${helper2}.vda.qcow2`), t.prod.image]);
  const console = join(t.replicaDir, 'console.log');
  const ready = await waitForReady(console, t.consoleSince, { timeoutMs: 60_000 });
  assert.equal(ready.resume, stoppedAt, 'the replica resumes at the source’s last write');
  await waitForSeq(console, stoppedAt + 3, { since: t.consoleSince, timeoutMs: 60_000 });
}

/** A replication job run to its end: every session replicated. */
export async function replicateJob(client: Client, job: string): Promise<ReplicationJobResult> {
  const result = await (await startReplicationJob(client, { job, requestedBy: 'alice' })).result();
  for (const s of result.sessions) assert.equal(s.outcome, 'replicated', s.detail);
  return result;
}

/**
 * A planned failover of the one guest of `prod`, started while it writes, checked by assertFailedOver: afterwards
 * the source is off and the replica runs with its running layer.
 */
export async function failOverWritingGuest(
  client: Client,
  port: HypervisorPort,
  t: { prod: TestKvmHost; vm: VmRef; replica: ReplicaRef; replicaDir: string },
): Promise<void> {
  const since = (await readGuestLines(join(t.replicaDir, 'console.log'))).length;
  await t.prod.seqAtLeast((lastSeq(await t.prod.guestLines()) ?? 0) + 3); // writing when the failover starts
  const handle = await startPlannedFailover(client, { vms: [t.vm.vm], requestedBy: 'alice', reason: 'kvm test' });
  const result = await handle.result();
  await assertFailedOver(result.sessions[0]!, { prod: t.prod, replicaDir: t.replicaDir, consoleSince: since });
  assert.equal((await port.getVm(t.vm)).powerState, 'Off');
  assert.equal((await port.getVm({ host: t.replica.host, vm: t.replica.replica })).powerState, 'Running');
  assert.equal((await port.getReplica(t.replica)).hasRunningLayer, true);
}

/**
 * The estate of the end-to-end KVM tests: a production KVM host with one tiny guest and a DR KVM host (two libvirt
 * instances, each with our host process), and the orchestrator configured with them and job `kvm` of that guest.
 */
export interface KvmEstate {
  dir: string;
  prod: TestKvmHost;
  dr: TestKvmHost;
  o: TestOrchestrator;
  port: HypervisorPort & { close(): void };
  close(): Promise<void>;
}

export async function startKvmEstate(options: {
  /** Of the temporary directory everything is kept in. */
  prefix: string;
  prod: string;
  dr: string;
  vm: string;
  restorePoints: number;
}): Promise<KvmEstate> {
  const dir = mkdtempSync(join(tmpdir(), options.prefix));
  // Where a test may keep boot files of its own (a kernel it takes away): allowed on both hosts.
  const bootFileDirs = [join(dir, 'boot')];
  mkdirSync(bootFileDirs[0]!);
  // Stopped last started first, at close and when a later part fails to start (no libvirtd is left behind).
  const started: { stop(): Promise<void> }[] = [];
  const stopAll = async () => {
    for (const part of started.reverse()) await part.stop();
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    const prod = await startTestKvmHost({
      dir: join(dir, 'prod'),
      name: options.prod,
      domain: options.vm,
      bootFileDirs,
    });
    started.push(prod);
    const dr = await startTestKvmHost({ dir: join(dir, 'dr'), name: options.dr, role: 'dr', bootFileDirs });
    started.push(dr);
    let port!: HypervisorPort & { close(): void };
    const o = await startOrchestrator({
      // The lab the harness always starts has no host of this estate: every call goes to a KVM host process.
      estate: { sites: [{ name: 'dr', role: 'dr', hosts: [{ name: 'dr-unused' }] }] },
      configure: (labUrl) =>
        testConfiguration(labUrl, {
          hosts: [
            { name: options.prod, role: 'production', adapter: { type: 'kvm', url: prod.host.url } },
            { name: options.dr, role: 'dr', adapter: { type: 'kvm', url: dr.host.url } },
          ],
          jobs: [{ name: 'kvm', vms: [options.vm], targetHost: options.dr, restorePoints: options.restorePoints }],
        }),
      connect: (config) => (port = connectHypervisor(config)),
    });
    started.push({ stop: async () => port.close() }, { stop: () => o.close() });
    return { dir, prod, dr, o, port, close: stopAll };
  } catch (e) {
    await stopAll().catch(() => undefined);
    throw e;
  }
}

/** Our host process as an operator runs it (`npm run kvm-host`), in a process of its own that a test can kill. */
export interface KvmHostProcess {
  url: string;
  /** SIGKILL, and waits for the exit. */
  kill(): Promise<void>;
  /** SIGTERM (a clean stop), and waits for the exit. */
  stop(): Promise<void>;
}

/** What starts a KVM host process as an operator does: the one place tests and the fault suite make its arguments. */
export interface KvmHostProcessOptions {
  name: string;
  role: 'production' | 'dr';
  libvirtUri: string;
  stateDir: string;
  /** 0 (the default) picks a free one. */
  port?: number;
  /** The agent's domains file (the domains it may act on as source VMs). */
  domainsFile?: string;
  /** More flags of `npm run kvm-host`. */
  flags?: string[];
}

/** `node` arguments that run `npm run kvm-host` with these options over mutual TLS, serving the test guest's boot files. */
export async function kvmHostArgs(options: KvmHostProcessOptions): Promise<string[]> {
  const tls = await testServerTls([options.name]);
  return [
    ...['--import', 'tsx', join(projectRoot, 'agent', 'main.ts')],
    ...['--name', options.name, '--site', options.role === 'dr' ? 'dr' : 'primary', '--role', options.role],
    ...['--port', String(options.port ?? 0), '--libvirt', options.libvirtUri, '--state', options.stateDir],
    ...(options.domainsFile ? ['--domains', options.domainsFile] : []),
    ...(options.flags ?? []),
    ...['--boot-files', guestFiles().dir], // the test guest's kernel and initrd
    ...['--tls-cert', tls.cert, '--tls-key', tls.key, '--client-ca', tls.clientCa],
  ];
}

/** The line a KVM host process prints once it serves, with its URL. */
export const KVM_HOST_LISTENING = /listening on (https:\/\/\S+)/;

export async function spawnKvmHostProcess(options: KvmHostProcessOptions): Promise<KvmHostProcess> {
  const proc = spawn(process.execPath, await kvmHostArgs(options), { stdio: ['ignore', 'pipe', 'inherit'] });
  const url = await new Promise<string>((resolve, reject) => {
    let out = '';
    proc.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      const m = KVM_HOST_LISTENING.exec(out);
      if (m) resolve(m[1]!);
    });
    proc.once('exit', (code) => reject(new Error(`kvm-host exited ${code}: ${out}`)));
  });
  const signal = async (name: NodeJS.Signals) => {
    if (proc.exitCode !== null || proc.signalCode !== null) return;
    const exited = new Promise((r) => proc.once('exit', r));
    proc.kill(name);
    await exited;
  };
  return { url, kill: () => signal('SIGKILL'), stop: () => signal('SIGTERM') };
}

/** Defines the tiny test guest as a libvirt domain, on a new empty disk (its XML kept in `dir`). */
export async function defineTestGuest(
  virsh: Virsh,
  o: {
    name: string;
    dir: string;
    image: string;
    serialLog: string;
    workload: GuestWorkload;
    diskSize?: string;
    memoryMiB?: number;
  },
): Promise<void> {
  await createGuestDisk(o.image, o.diskSize ?? '64M');
  const xml = join(o.dir, `${o.name}.xml`);
  writeFileSync(
    xml,
    guestDomainXml({
      name: o.name,
      disk: o.image,
      ...guestFiles(),
      cmdline: guestKernelCmdline(o.workload),
      serialLog: o.serialLog,
      ...(o.memoryMiB ? { memoryMiB: o.memoryMiB } : {}),
    }),
  );
  await virsh.run(['define', xml]);
}

export interface TestKvmHost {
  libvirt: LibvirtInstance;
  host: RunningKvmHost;
  /** The agent's domains file: the test guest's domain, and what a test adds to it. */
  domainsFile: string;
  /** The guest's serial console and disk image (a host without a guest has neither). */
  serialLog: string;
  image: string;
  /** The host process's state directory (its run/ holds the export daemons' pid files). */
  stateDir: string;
  /** Starts the host process again on the same state and port, so clients reach it at its URL (after host.stop()). */
  restartHost(): Promise<RunningKvmHost>;
  /** What the guest said on its serial console so far. */
  guestLines(): Promise<GuestLine[]>;
  /** Waits until the guest has written iteration `n`; returns the last one it said. */
  seqAtLeast(n: number): Promise<number>;
  /** Waits for the guest's next ready line after `since` lines (it booted), and returns it. */
  readyAfter(since: number): Promise<ReadyLine>;
  stop(): Promise<void>;
}

export async function startTestKvmHost(options: {
  dir: string;
  name: string;
  /** The guest's domain; none for a DR host. */
  domain?: string;
  role?: 'production' | 'dr';
  /** Boot-file directories besides the test guest's (where a test keeps a kernel of its own). */
  bootFileDirs?: string[];
}): Promise<TestKvmHost> {
  const { dir, domain } = options;
  const guest = guestFiles(); // installs QEMU and libvirt first where they are missing (a fresh machine)
  const libvirt = await LibvirtInstance.start({ dir: join(dir, 'libvirt'), capabilitiesCache: CAPABILITIES_CACHE });
  const image = join(dir, `${domain ?? 'none'}.qcow2`);
  const serialLog = join(dir, `${domain ?? 'none'}.serial`);
  writeFileSync(serialLog, '');
  const domainsFile = join(dir, 'domains');
  writeFileSync(domainsFile, domain ? `${domain}\n` : '');
  if (domain)
    await defineTestGuest(libvirt.virsh, {
      name: domain,
      dir,
      image,
      serialLog,
      workload: { pauseSeconds: 0.05, blocksPerIteration: BLOCKS_PER_ITERATION, printEvery: 1 },
    });
  const tls = await testServerTls([options.name]);
  const stateDir = join(dir, 'state');
  const start = (port?: number) =>
    startKvmHost({
      name: options.name,
      site: options.role === 'dr' ? 'dr' : 'primary',
      role: options.role ?? 'production',
      libvirtUri: libvirt.virsh.uri,
      stateDir,
      domainsFile,
      bootFileDirs: [guest.dir, ...(options.bootFileDirs ?? [])], // the test guest's kernel and initrd
      ...(port !== undefined ? { port } : {}),
      tls,
    });
  const guestLines = () => readGuestLines(serialLog);
  const host = await start().catch(async (e: unknown) => {
    await libvirt.stop();
    throw e;
  });
  const t: TestKvmHost = {
    libvirt,
    host,
    domainsFile,
    serialLog,
    image,
    stateDir,
    async restartHost() {
      t.host = await start(Number(new URL(t.host.url).port));
      return t.host;
    },
    guestLines,
    seqAtLeast: (n) => waitForSeq(serialLog, n, { timeoutMs: 60_000 }),
    readyAfter: (since) => waitForReady(serialLog, since, { timeoutMs: 60_000 }),
    async stop() {
      await t.host.stop();
      await libvirt.stop();
    },
  };
  return t;
}

/**
 * SIGKILLs the export daemons a host process's run directory names (pid files ending in `suffix`: every one, or e.g.
 * the offline views' `.view.nbd.pid`) and waits until they are gone; how many it killed.
 */
export async function killExportDaemons(stateDir: string, suffix = '.nbd.pid'): Promise<number> {
  const run = join(stateDir, 'run');
  const killed: number[] = [];
  for (const f of readdirSync(run).filter((n) => n.endsWith(suffix))) {
    const pid = Number(readFileSync(join(run, f), 'utf8').trim());
    try {
      process.kill(pid, 'SIGKILL');
      killed.push(pid);
    } catch {
      // exited meanwhile
    }
  }
  for (const pid of killed)
    for (let i = 0; i < 100 && existsSync(`/proc/${pid}`); i++) await new Promise((r) => setTimeout(r, 20));
  return killed.length;
}

/** SIGKILL of the export daemons that serve a host process's offline views (the domain off). */
export async function killOfflineViewDaemons(host: TestKvmHost): Promise<void> {
  assert.ok(
    (await killExportDaemons(host.stateDir, '.view.nbd.pid')) > 0,
    `an offline view is served by ${host.host.url}`,
  );
}
