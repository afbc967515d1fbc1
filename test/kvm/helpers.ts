// A KVM host for tests: a private libvirtd with one tiny guest defined as a domain, and our host process serving it.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createGuestDisk, guestFiles, guestKernelCmdline, waitForGuest, type GuestLine } from '../../kvm/guest/guest';
import { startKvmHost, type RunningKvmHost } from '../../kvm/host/server';
import { guestDomainXml } from '../../kvm/libvirt/domain';
import { CAPABILITIES_CACHE, LibvirtInstance } from '../../kvm/libvirt/instance';

export const GUEST_DISK_BYTES = 64 * 1024 * 1024;
export const BLOCKS_PER_ITERATION = 4;

export const lastSeq = (lines: GuestLine[]): number | undefined => lines.filter((l) => l.kind === 'seq').at(-1)?.seq;

export interface TestKvmHost {
  libvirt: LibvirtInstance;
  host: RunningKvmHost;
  /** The guest's serial console and disk image (a host without a guest has neither). */
  serialLog: string;
  image: string;
  /** Starts the host process again on the same state (after host.stop()). */
  restartHost(): Promise<RunningKvmHost>;
  /** What the guest said on its serial console so far. */
  guestLines(): Promise<GuestLine[]>;
  /** Waits until the guest has written iteration `n`; returns the last one it said. */
  seqAtLeast(n: number): Promise<number>;
  /** Waits for the guest's next ready line after `since` lines (it booted). */
  readyAfter(since: number): Promise<void>;
  stop(): Promise<void>;
}

export async function startTestKvmHost(options: {
  dir: string;
  name: string;
  /** The guest's domain; none for a DR host. */
  domain?: string;
  role?: 'production' | 'dr';
}): Promise<TestKvmHost> {
  const { dir, domain } = options;
  const libvirt = await LibvirtInstance.start({ dir: join(dir, 'libvirt'), capabilitiesCache: CAPABILITIES_CACHE });
  const image = join(dir, `${domain ?? 'none'}.qcow2`);
  const serialLog = join(dir, `${domain ?? 'none'}.serial`);
  writeFileSync(serialLog, '');
  if (domain) {
    await createGuestDisk(image, '64M');
    const xml = join(dir, `${domain}.xml`);
    writeFileSync(
      xml,
      guestDomainXml({
        name: domain,
        disk: image,
        ...guestFiles(),
        cmdline: guestKernelCmdline({ pauseSeconds: 0.05, blocksPerIteration: BLOCKS_PER_ITERATION, printEvery: 1 }),
        serialLog,
      }),
    );
    await libvirt.virsh.run(['define', xml]);
  }
  const start = () =>
    startKvmHost({
      name: options.name,
      site: options.role === 'dr' ? 'dr' : 'primary',
      role: options.role ?? 'production',
      libvirtUri: libvirt.virsh.uri,
      stateDir: join(dir, 'state'),
    });
  const guestLines = () => waitForGuest(serialLog, (lines) => lines, { timeoutMs: 1 });
  const host = await start().catch(async (e: unknown) => {
    await libvirt.stop();
    throw e;
  });
  const t: TestKvmHost = {
    libvirt,
    host,
    serialLog,
    image,
    async restartHost() {
      t.host = await start();
      return t.host;
    },
    guestLines,
    seqAtLeast: (n) =>
      waitForGuest(serialLog, (lines) => ((lastSeq(lines) ?? 0) >= n ? lastSeq(lines) : undefined), {
        timeoutMs: 60_000,
      }),
    async readyAfter(since) {
      await waitForGuest(serialLog, (lines) => lines.slice(since).find((l) => l.kind === 'ready'), {
        timeoutMs: 60_000,
      });
    },
    async stop() {
      await t.host.stop();
      await libvirt.stop();
    },
  };
  return t;
}
