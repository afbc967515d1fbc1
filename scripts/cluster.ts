// `npm run cluster [-- --split] [--no-ui] [--secure]`: a Temporal cluster on PostgreSQL, as an operator runs one (see
// the README's "Running on a Temporal cluster"). Builds the server once, runs a private PostgreSQL (or uses the one
// PF_CLUSTER_PG_HOST names), sets up or upgrades the schemas, renders the configuration, starts the server's
// services (the history service in a process of its own with --split), creates the namespace and the search
// attributes, starts the Web UI and prints how to point workers and clients at it. With --secure the frontend serves
// TLS, Temporal's authorization is on (the JWT keys served by this process) and the callers' tokens are written, and
// there is no Web UI. Ctrl-C, SIGTERM or an error stop everything it started, last started first; the state under
// PF_CLUSTER_DIR (.data/cluster) survives.
import { CONNECTIONS } from './lib/cluster/config';
import { installClusterPrograms, startCluster, type RunningCluster } from './lib/cluster/cluster';
import { clusterSettings, ClusterSettingsError, type ClusterSettings } from './lib/cluster/settings';
import { ensureTemporalCli, projectRoot } from './lib/dev-server';
import { describeError } from './lib/errors';
import { StopPath, StopRequested } from './lib/stop';

const say = (line: string): void => console.log(line);
/** Within it, each part has its own budget: PostgreSQL checkpoints, the server drains its shards. */
const stop = new StopPath(say, 75_000, 'the cluster');

/** Starts the cluster, then waits; returns only when one of its processes exits on its own. */
async function main(settings: ClusterSettings): Promise<string> {
  const started = Date.now();
  const programs = installClusterPrograms();
  const cli = ensureTemporalCli();
  const cluster = await startCluster({ settings, programs, cli, print: say, signal: stop.signal });
  stop.defer('the cluster', () => cluster.stop(), 70_000);

  const { address, namespace, servers } = cluster;
  const connections = servers.length * (CONNECTIONS.default + CONNECTIONS.visibility);
  say('');
  say(
    `Temporal cluster ready in ${((Date.now() - started) / 1000).toFixed(1)} s: frontend ${address}, namespace ` +
      `${namespace}, ${cluster.historyShards} history shards, ${servers.length} server process` +
      `${servers.length > 1 ? 'es' : ''} (up to ${connections} PostgreSQL connections).`,
  );
  if (cluster.uiUrl) say(`Web UI: ${cluster.uiUrl}/namespaces/${namespace}/workflows`);
  say(`Metrics (Prometheus): ${servers.map((s) => `${s.name} ${s.metricsUrl}`).join(', ')}`);
  const outside = cluster.databaseDir && !cluster.databaseDir.startsWith(`${settings.stateDir}/`);
  say(
    `State: ${settings.stateDir} (logs in ${cluster.logDir}` +
      `${outside ? `; PostgreSQL's data in ${cluster.databaseDir}, which the postgres user can reach` : ''}).`,
  );
  if (cluster.access) printSecureUse(cluster);
  else {
    say('Point workers and clients at it, in other terminals:');
    say(`  export TEMPORAL_ADDRESS=${address} TEMPORAL_NAMESPACE=${namespace}`);
    say('  npm run worker -- --only orchestration');
    say('  npm run worker -- --only proxy <proxy name from the configuration>');
    say('  npm run failover -- state --vm <VM name from the configuration>');
  }
  say('Press Ctrl-C to stop the cluster (its state stays).');
  const exited = await stop.untilStopped(cluster.firstExit());
  return `${exited.what} exited (code ${exited.code}); see ${exited.log}`;
}

/** How workers and the CLIs reach a secured cluster: its CA and their tokens, by file (never printed). */
function printSecureUse({ address, namespace, access }: RunningCluster): void {
  const { ca, tokens, tokensNotAfter, jwksUrl } = access!;
  say(
    `Secured: the frontend serves TLS (the cluster's CA: ${ca}), and Temporal's authorization is on (default JWT ` +
      `claim mapper and authorizer; their keys served at ${jwksUrl} by this process). No Web UI: it would need an ` +
      'OIDC provider to present tokens.',
  );
  say(`Tokens (files of mode 0600, valid until ${tokensNotAfter.toISOString()}; a start renews them a month before):`);
  say(`  ${tokens.admin}: ${namespace}:admin, for operators, the project CLI and the Temporal CLI`);
  say(`  ${tokens.workers}: ${namespace}:write, for the workers (polling, completing tasks, their client calls)`);
  say('Point workers and clients at it, in other terminals:');
  // The certificate also names localhost, which Node's TLS (unlike an IP address) accepts as a name to check, silently.
  say(
    `  export TEMPORAL_ADDRESS=${address} TEMPORAL_NAMESPACE=${namespace} TEMPORAL_TLS_SERVER_CA_CERT_PATH=${ca} ` +
      'TEMPORAL_TLS_SERVER_NAME=localhost',
  );
  say(`  TEMPORAL_API_KEY="$(cat ${tokens.workers})" npm run worker -- --only orchestration`);
  say(
    `  TEMPORAL_API_KEY="$(cat ${tokens.workers})" npm run worker -- --only proxy <proxy name from the configuration>`,
  );
  say(`  TEMPORAL_API_KEY="$(cat ${tokens.admin})" npm run failover -- state --vm <VM name from the configuration>`);
  say(`  TEMPORAL_API_KEY="$(cat ${tokens.admin})" temporal workflow list`);
}

let settings: ClusterSettings;
try {
  settings = clusterSettings(process.argv.slice(2), process.env, projectRoot);
} catch (err) {
  if (!(err instanceof ClusterSettingsError)) throw err;
  console.error(`error: ${err.message}`);
  process.exit(2);
}
main(settings).then(
  (why) => stop.finish(1, `error: ${why}`),
  (err: unknown) => {
    if (err instanceof StopRequested || stop.requested) return stop.finish(0);
    return stop.finish(err instanceof ClusterSettingsError ? 2 : 1, `error: ${describeError(err)}`);
  },
);
