import { HostApiHypervisor } from '../hypervisor/host-api-adapter';
import { RoutedHypervisor, type ClosablePort } from '../hypervisor/routed';
import type { Configuration } from './schema';

/**
 * The hypervisor port for the configured hosts and backup repository: one client per host API server, shared by
 * the hosts it serves (a lab plays many; a KVM host process serves its own host), routed by host when there are
 * several servers.
 */
export function connectHypervisor(config: Configuration): ClosablePort {
  const clients = new Map<string, HostApiHypervisor>();
  const clientOf = (url: string): HostApiHypervisor => {
    // Spellings of one URL (a trailing slash, the scheme's own port) name one server.
    const key = new URL(url).href;
    let client = clients.get(key);
    if (!client) {
      client = new HostApiHypervisor({ url });
      clients.set(key, client);
    }
    return client;
  };
  const hosts = new Map(config.hosts.map((h) => [h.name, clientOf(h.adapter.url)]));
  const backups = config.backupRepository && clientOf(config.backupRepository.adapter.url);
  const [only] = clients.values();
  if (clients.size === 1 && only) return only;
  return new RoutedHypervisor({ hosts, backups });
}
