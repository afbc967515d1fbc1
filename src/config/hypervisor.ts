import { HostApiHypervisor } from '../hypervisor/host-api-adapter';
import { RoutedHypervisor, type ClosablePort } from '../hypervisor/routed';
import type { Configuration } from './schema';

/**
 * The hypervisor port for the configured hosts and backup repository: one client per host API server, shared by
 * the hosts it serves (a lab plays many; a KVM host process serves its own host), routed by host when there are
 * several servers. Each call checks that the server's certificate names the host it is about, so sharing a client
 * never lets one host answer for another.
 */
export function connectHypervisor(config: Configuration): ClosablePort {
  // Spellings of one URL (a trailing slash, the scheme's own port) name one server.
  const keyOf = (url: string): string => new URL(url).href;
  // The name a server proves for calls about no one host (the hosts list, backups): the lab's `lab`, a KVM host
  // process's own host.
  const serverNames = new Map<string, string>();
  const serve = (url: string, type: 'lab' | 'kvm', host: string): void => {
    const key = keyOf(url);
    if (type === 'lab') serverNames.set(key, 'lab');
    else if (!serverNames.has(key)) serverNames.set(key, host);
  };
  for (const h of config.hosts) serve(h.adapter.url, h.adapter.type, h.name);
  if (config.backupRepository) serve(config.backupRepository.adapter.url, 'lab', 'lab');
  const clients = new Map<string, HostApiHypervisor>();
  for (const [url, serverName] of serverNames)
    clients.set(url, new HostApiHypervisor({ url, serverName, ...(config.tls ? { tls: config.tls } : {}) }));
  const hosts = new Map(config.hosts.map((h) => [h.name, clients.get(keyOf(h.adapter.url))!]));
  const backups = config.backupRepository && clients.get(keyOf(config.backupRepository.adapter.url));
  const [only] = clients.values();
  if (clients.size === 1 && only) return only;
  return new RoutedHypervisor({ hosts, backups });
}
