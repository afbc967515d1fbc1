// A Temporal cluster on PostgreSQL of a test's own (scripts/lib/cluster), on free ports, with its state in a
// scratch directory under .data, or one the test names.
import { randomUUID } from 'node:crypto';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import {
  installClusterPrograms,
  startCluster,
  type ClusterPrograms,
  type RunningCluster,
} from '../../scripts/lib/cluster/cluster';
import { removeOutsideDatabase } from '../../scripts/lib/cluster/postgres';
import { clusterSettings, listeningPorts, type ClusterSettings } from '../../scripts/lib/cluster/settings';
import { portInUse, projectRoot } from '../../scripts/lib/dev-server';
import { temporalCli } from '../harness';

let programs: ClusterPrograms | undefined;

/** Settings for a cluster whose every port is free now; the state directory is new (or `stateDir`). */
export async function testClusterSettings(
  argv: string[] = [],
  stateDir = join(projectRoot, '.data', 'test-clusters', randomUUID().slice(0, 8)),
): Promise<ClusterSettings> {
  for (let attempt = 0; attempt < 50; attempt++) {
    // Frontend ports 21000..33000 (membership ports must stay below 32768): clear of the ephemeral range.
    const frontend = 21_000 + Math.floor(Math.random() * 120) * 100 + 33;
    const settings = clusterSettings(
      argv,
      { PF_CLUSTER_PORT: String(frontend), PF_CLUSTER_DIR: stateDir },
      projectRoot,
    );
    const taken = await Promise.all(listeningPorts(settings).map(([, port]) => portInUse(port)));
    if (!taken.some(Boolean)) return settings;
  }
  throw new Error('no free ports for a test cluster after 50 tries');
}

export interface TestCluster extends RunningCluster {
  settings: ClusterSettings;
  /** Stops the cluster and removes its state. */
  remove(): Promise<void>;
}

/** Builds the cluster's programs once (minutes on a fresh machine) and starts a cluster, without its Web UI. */
export async function startTestCluster(options: { split: boolean }): Promise<TestCluster> {
  programs ??= installClusterPrograms();
  const settings = await testClusterSettings(['--no-ui', ...(options.split ? ['--split'] : [])]);
  const cluster = await startCluster({
    settings,
    programs,
    cli: temporalCli(),
    print: () => undefined,
    signal: new AbortController().signal,
  });
  return {
    ...cluster,
    settings,
    async remove() {
      await cluster.stop();
      await removeOutsideDatabase(settings.stateDir);
      await rm(settings.stateDir, { recursive: true, force: true });
    },
  };
}
