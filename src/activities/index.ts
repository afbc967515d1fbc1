import type { Client } from '@temporalio/client';
import type { Configuration, ProxyTransport } from '../config/schema';
import type { HypervisorPort } from '../hypervisor/port';
import { createCoordinationActivities } from './coordination';
import { createFailoverActivities } from './failover';
import { createInventoryActivities } from './inventory';
import { createOperationActivities } from './operations';
import { createReplicationActivities } from './replication';

export interface ActivityDependencies {
  port: HypervisorPort;
  config: Configuration;
  client: Client;
}

/** Every activity, bound to its dependencies; tests hand in a real lab adapter or a fake port. */
export function createActivities({ port, config, client }: ActivityDependencies) {
  return {
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
