import { HostApiHypervisor } from '../hypervisor/host-api-adapter';
import type { HypervisorPort } from '../hypervisor/port';
import type { Configuration } from './schema';

/**
 * The hypervisor port for the configured hosts. Every host and the backup repository are reached through
 * the lab adapter today; one lab plays them all, so they must share its URL.
 */
export function connectHypervisor(config: Configuration): HypervisorPort & { close(): void } {
  const urls = new Set([
    ...config.hosts.map((h) => h.adapter.url),
    ...(config.backupRepository ? [config.backupRepository.adapter.url] : []),
  ]);
  const [url] = urls;
  if (urls.size !== 1 || !url) {
    throw new Error(
      `Every host must be reached through one lab URL for now; the configuration names ${[...urls].join(', ')}`,
    );
  }
  return new HostApiHypervisor({ url });
}
