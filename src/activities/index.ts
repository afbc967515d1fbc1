import type { Client } from '@temporalio/client';
import type { Configuration, ProxyTransport } from '../config/schema';
import type { HypervisorPort } from '../hypervisor/port';
import { createCoordinationActivities } from './coordination';
import { createFailoverActivities } from './failover';
import { createInventoryActivities } from './inventory';
import { createOperationActivities } from './operations';
import { createReplicationActivities } from './replication';
import { createRequestActivities } from './requests';

export interface ActivityDependencies {
  port: HypervisorPort;
  config: Configuration;
  client: Client;
  /**
   * The configuration as it is now, for who may ask for what: users, keys and roles (the worker re-reads its file
   * when it changes, so a rotated key or a removed user takes effect without a restart). `config` by default.
   */
  currentConfig?: () => Configuration;
}

/** Every activity, bound to its dependencies; tests hand in a real lab adapter or a fake port. */
export function createActivities({ port, config, client, currentConfig = () => config }: ActivityDependencies) {
  return {
    ...createRequestActivities(currentConfig, client),
    ...createInventoryActivities(port, config),
    ...createReplicationActivities(port),
    ...createCoordinationActivities(client, port, config),
    ...createFailoverActivities(port, config, client),
    ...createOperationActivities(port, config),
  };
}

export type Activities = ReturnType<typeof createActivities>;

/** The activities a proxy worker runs on its own task queue: the ones that move data, the proxy's way. */
export function proxyActivities(
  activities: Activities,
  transport: ProxyTransport,
): Pick<Activities, 'copyDisk' | 'shipToProduction'> {
  return {
    copyDisk: (input) => activities.copyDisk(input, transport),
    shipToProduction: (input) => activities.shipToProduction(input),
  };
}
