// What the suite plays, on each hypervisor: VMs with guests writing, in jobs over two proxies (one host-to-host, one
// network). The retirable VM is the one a permanent failover may take out of the rotation: it ends its replication
// for good.
import type { EstateInput } from '../../lab/estate';
import { testClientTls } from '../tls';
import { testPublicKey } from '../keys';
import type { DiskShape } from './images';

export type Hypervisor = 'lab' | 'kvm';
export const HYPERVISORS: readonly Hypervisor[] = ['lab', 'kvm'];
export const OPERATOR = 'alice';
export const PROXIES = ['proxy01', 'proxy02'];
const MiB = 1024 * 1024;

export interface ChaosJob {
  name: string;
  vms: readonly string[];
  proxies?: readonly string[];
  restorePoints: number;
}

export interface ChaosEstate {
  hypervisor: Hypervisor;
  productionHost: string;
  drHost: string;
  /** Every VM of the production host, with its disks. */
  vmDisks: Record<string, readonly DiskShape[]>;
  /** VMs a permanent failover may be chosen for. */
  retirable: ReadonlySet<string>;
  jobs: readonly ChaosJob[];
}

export const vmsOf = (estate: ChaosEstate): string[] => Object.keys(estate.vmDisks);
export const jobOf = (estate: ChaosEstate, vm: string): ChaosJob => estate.jobs.find((j) => j.vms.includes(vm))!;

/** The lab: five VMs of small disks in three jobs. */
export const LAB_ESTATE: ChaosEstate = {
  hypervisor: 'lab',
  productionHost: 'prod-a',
  drHost: 'dr-a',
  vmDisks: {
    vm01: [
      { id: 'os', size: 4 * MiB },
      { id: 'data', size: 2 * MiB },
    ],
    vm02: [{ id: 'os', size: 4 * MiB }],
    vm03: [
      { id: 'os', size: 4 * MiB },
      { id: 'data', size: 2 * MiB },
    ],
    vm04: [{ id: 'os', size: 4 * MiB }],
    vm05: [{ id: 'os', size: 2 * MiB }],
  },
  retirable: new Set(['vm05']),
  jobs: [
    { name: 'job-a', vms: ['vm01', 'vm02'], proxies: ['proxy01'], restorePoints: 4 },
    { name: 'job-b', vms: ['vm03', 'vm04'], proxies: ['proxy02'], restorePoints: 4 },
    { name: 'job-c', vms: ['vm05'], restorePoints: 3 },
  ],
};

/** KVM guest disks: small, so that 30 rounds of copies and whole-disk digests fit in 90 minutes on two cores. */
export const KVM_GUEST_DISK_BYTES = 32 * MiB;

/** KVM: three tiny real guests (TCG, about a quarter of a core each while they write) in two jobs. */
export const KVM_ESTATE: ChaosEstate = {
  hypervisor: 'kvm',
  productionHost: 'kvm-prod',
  drHost: 'kvm-dr',
  vmDisks: {
    kvm01: [{ id: 'vda', size: KVM_GUEST_DISK_BYTES }],
    kvm02: [{ id: 'vda', size: KVM_GUEST_DISK_BYTES }],
    kvm03: [{ id: 'vda', size: KVM_GUEST_DISK_BYTES }],
  },
  retirable: new Set(['kvm03']),
  jobs: [
    { name: 'kvm-a', vms: ['kvm01', 'kvm02'], proxies: ['proxy01'], restorePoints: 3 },
    { name: 'kvm-b', vms: ['kvm03'], restorePoints: 3 },
  ],
};

export const ESTATES: Record<Hypervisor, ChaosEstate> = { lab: LAB_ESTATE, kvm: KVM_ESTATE };

/** The lab's site of the lab estate: guests writing all the time, quick to stop and boot. */
export const labEstateInput = (estate: ChaosEstate): EstateInput => ({
  sites: [
    {
      name: 'production',
      role: 'production',
      hosts: [
        {
          name: estate.productionHost,
          vms: vmsOf(estate).map((name) => ({
            name,
            disks: estate.vmDisks[name]!.map((d) => ({ ...d })),
            writeRate: 8,
            hotSetFraction: 0.2,
            shutdownMs: 300,
            bootMs: 300,
          })),
        },
      ],
    },
    { name: 'dr', role: 'dr', hosts: [{ name: estate.drHost }] },
  ],
});

/**
 * The orchestrator's configuration: each host reached at `urls` (the lab, or a KVM host process, behind the
 * recorder and whatever faults stand in between).
 */
export function chaosConfiguration(estate: ChaosEstate, urls: { production: string; dr: string }): object {
  const adapter = (url: string) => ({ type: estate.hypervisor, url });
  return {
    hosts: [
      { name: estate.productionHost, role: 'production', adapter: adapter(urls.production) },
      { name: estate.drHost, role: 'dr', adapter: adapter(urls.dr) },
    ],
    // The lab is also the backup repository; KVM hosts serve none (the jobs read production).
    ...(estate.hypervisor === 'lab' ? { backupRepository: { adapter: adapter(urls.production) } } : {}),
    proxies: [
      { name: 'proxy01', slots: 2, transport: 'host-to-host' },
      { name: 'proxy02', slots: 2 },
    ],
    jobs: estate.jobs.map((j) => ({ ...j, vms: [...j.vms], targetHost: estate.drHost })),
    users: [{ name: OPERATOR, roles: ['BackupAdministrator'], keys: [testPublicKey(OPERATOR)] }],
    tls: testClientTls(),
  };
}
