// The KVM demo's site on this one machine: each host of config/planned-failover-kvm.yaml is a private libvirt
// instance (its own libvirtd, so nothing works only because both sides share one daemon) with our host process
// listening at the host's configured URL. The guests of the production host's jobs are the tiny real guest, defined
// once as libvirt domains; their disks, the DR host's restore points and both hosts' state stay in .data/kvm.
import { execFile } from 'node:child_process';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import {
  createGuestDisk,
  guestFiles,
  guestKernelCmdline,
  lastSeq,
  readGuestLines,
  waitForSeq,
} from '../../kvm/guest/guest';
import { startKvmHost, type RunningKvmHost } from '../../agent/server';
import { guestDomainXml } from '../../kvm/libvirt/domain';
import { CAPABILITIES_CACHE, LibvirtInstance } from '../../kvm/libvirt/instance';
import type { Configuration } from '../../src/config/schema';
import { serverTlsFiles } from '../../src/host-api/certificates';
import type { PlannedFailoverResult } from '../../src/contract';

const exec = promisify(execFile);

export interface KvmDemoSite {
  /** Resolves once every guest has written a few more iterations than it had (it is up and writing). */
  guestsWriting: () => Promise<void>;
  /** For each failed-over VM: its replica's canary against the source's, and qemu-img compare of the two disks. */
  checkFailover(result: PlannedFailoverResult): Promise<string[]>;
  stop(): Promise<void>;
}

export async function startKvmDemoSite(options: {
  config: Configuration;
  dataDir: string;
  /** The site directory holding each host's certificate (named after the host) and the CA of the workers'. */
  siteDir: string;
  say: (line: string) => void;
  log: (line: string) => void;
}): Promise<KvmDemoSite> {
  const { config, dataDir, say } = options;
  const stops: (() => Promise<void>)[] = [];
  const stop = async () => {
    for (const s of stops.reverse()) await s().catch((e: unknown) => options.log(`stopping: ${String(e)}`));
  };
  const guests = guestFiles();
  const images = new Map<string, string>();
  const serials = new Map<string, string>();
  try {
    for (const host of config.hosts) {
      if (host.adapter.type !== 'kvm') throw new Error(`host ${host.name}: the KVM demo runs KVM hosts only`);
      const url = new URL(host.adapter.url);
      const dir = join(dataDir, host.name);
      const libvirt = await LibvirtInstance.start({ dir: join(dir, 'libvirt'), capabilitiesCache: CAPABILITIES_CACHE });
      stops.push(() => libvirt.stop());
      // The jobs' guests live on the first production host.
      const vms = host === config.hosts.find((h) => h.role === 'production') ? config.jobs.flatMap((j) => j.vms) : [];
      const defined = new Set(await libvirt.virsh.domains());
      for (const vm of vms) {
        const image = join(dir, `${vm}.qcow2`);
        images.set(vm, image);
        serials.set(vm, join(dir, `${vm}.serial`));
        if (defined.has(vm)) continue;
        if (!existsSync(image)) await createGuestDisk(image, '64M');
        const xml = join(dir, `${vm}.xml`);
        mkdirSync(dir, { recursive: true });
        writeFileSync(
          xml,
          guestDomainXml({
            name: vm,
            disk: image,
            ...guests,
            cmdline: guestKernelCmdline({ pauseSeconds: 0.05, blocksPerIteration: 4, printEvery: 1 }),
            serialLog: serials.get(vm)!,
          }),
        );
        await libvirt.virsh.run(['define', xml]);
        say(`  ${host.name}: defined the libvirt domain ${vm} (the tiny real guest, ${image})`);
      }
      // The agent acts only on the domains listed for it: the jobs' VMs of this host.
      const domainsFile = join(dir, 'domains');
      writeFileSync(domainsFile, [...vms, ''].join('\n'));
      const running: RunningKvmHost = await startKvmHost({
        name: host.name,
        domainsFile,
        site: host.role === 'dr' ? 'dr' : 'primary',
        role: host.role,
        libvirtUri: libvirt.virsh.uri,
        stateDir: join(dir, 'state'),
        bootFileDirs: [guests.dir], // the tiny guests' kernel and initrd
        port: Number(url.port),
        listen: url.hostname,
        tls: serverTlsFiles(options.siteDir, host.name),
        log: options.log,
      });
      stops.push(() => running.stop());
      say(`  ${host.name}: libvirt at ${libvirt.virsh.uri}, host process at ${running.url}`);
    }
  } catch (e) {
    await stop();
    throw e;
  }
  const drDir = (host: string, replica: string) => join(dataDir, host, 'state', 'replicas', replica);
  return {
    guestsWriting: async () => {
      for (const serial of serials.values()) {
        const from = lastSeq(await readGuestLines(serial)) ?? 0;
        await waitForSeq(serial, from + 3, { timeoutMs: 120_000 });
      }
    },
    async checkFailover(result) {
      const lines: string[] = [];
      for (const s of result.sessions) {
        if (s.outcome !== 'failedOver' || !s.verification) continue;
        const job = config.jobs.find((j) => j.name === s.job)!;
        const helper2 = s.helperPoints.at(-1)!;
        const point = join(drDir(job.targetHost, `${s.vm}_replica`), `${helper2}.vda.qcow2`);
        const compared = await exec('qemu-img', ['compare', '-U', point, images.get(s.vm)!]).then(
          (r) => r.stdout.trim(),
          (e: { stdout?: string; message?: string }) => `DIFFERENT: ${e.stdout?.trim() || e.message}`,
        );
        lines.push(
          `${s.vm}: replica canary ${s.verification.replicaCanary} = source's last write ${s.verification.sourceCanary}; ` +
            `qemu-img compare of helper point 2 and the source disk: ${compared}`,
        );
      }
      return lines;
    },
    stop,
  };
}
