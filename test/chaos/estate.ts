// What the suite plays: five VMs with guests writing, in three jobs over two proxies (one host-to-host, one
// network). vm05 is the one a permanent failover may take out of the rotation: it ends its replication for good.
import type { EstateInput } from '../../lab/estate';
import { testClientTls } from '../tls';
import type { DiskShape } from './images';

export const PRODUCTION_HOST = 'prod-a';
export const DR_HOST = 'dr-a';
export const OPERATOR = 'alice';
const MiB = 1024 * 1024;

export const VM_DISKS: Record<string, readonly DiskShape[]> = {
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
};
export const VMS = Object.keys(VM_DISKS);
/** VMs a permanent failover may be chosen for. */
export const RETIRABLE = new Set(['vm05']);

export const JOBS = [
  { name: 'job-a', vms: ['vm01', 'vm02'], proxies: ['proxy01'], restorePoints: 4 },
  { name: 'job-b', vms: ['vm03', 'vm04'], proxies: ['proxy02'], restorePoints: 4 },
  { name: 'job-c', vms: ['vm05'], restorePoints: 3 },
] as const;
export const PROXIES = ['proxy01', 'proxy02'];
export const jobOf = (vm: string): string => JOBS.find((j) => (j.vms as readonly string[]).includes(vm))!.name;

export const chaosEstate = (): EstateInput => ({
  sites: [
    {
      name: 'production',
      role: 'production',
      hosts: [
        {
          name: PRODUCTION_HOST,
          vms: VMS.map((name) => ({
            name,
            disks: VM_DISKS[name]!.map((d) => ({ ...d })),
            writeRate: 8,
            hotSetFraction: 0.2,
            shutdownMs: 300,
            bootMs: 300,
          })),
        },
      ],
    },
    { name: 'dr', role: 'dr', hosts: [{ name: DR_HOST }] },
  ],
});

export function chaosConfiguration(labUrl: string): object {
  const adapter = { type: 'lab', url: labUrl };
  return {
    hosts: [
      { name: PRODUCTION_HOST, role: 'production', adapter },
      { name: DR_HOST, role: 'dr', adapter },
    ],
    backupRepository: { adapter },
    proxies: [
      { name: 'proxy01', slots: 2, transport: 'host-to-host' },
      { name: 'proxy02', slots: 2 },
    ],
    jobs: JOBS.map((j) => ({ ...j, vms: [...j.vms], targetHost: DR_HOST })),
    users: [{ name: OPERATOR, roles: ['BackupAdministrator'] }],
    tls: testClientTls(),
  };
}
