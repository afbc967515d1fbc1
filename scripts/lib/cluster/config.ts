// The Temporal server's and the Web UI server's configuration files, rendered from the settings. Pure: the files
// hold no password (the server reads it from its environment through a template), so they may be shown and kept.
import { stringify } from 'yaml';
import { INTERNODE_NAME, PERMISSIONS_CLAIM, type ClusterTls } from './security';
import type { ClusterSettings } from './settings';

/** Environment variables the server's configuration reads, set per server process. */
export const PASSWORD_ENV = 'PF_CLUSTER_SERVER_PG_PASSWORD';
export const METRICS_ADDRESS_ENV = 'PF_CLUSTER_SERVER_METRICS_ADDRESS';

/** What each server pool may hold open; a process holds both, so PostgreSQL needs (20 + 10) per process and more. */
export const CONNECTIONS = { default: 20, visibility: 10 } as const;

export const DATABASES = { default: 'temporal', visibility: 'temporal_visibility' } as const;

// Replaced after YAML rendering, because a template expression is not a YAML value.
const placeholders = {
  password: 'PF_PLACEHOLDER_PASSWORD',
  metrics: 'PF_PLACEHOLDER_METRICS',
} as const;

export function databaseEndpoint(settings: ClusterSettings): { host: string; port: number } {
  const { database } = settings;
  return { host: database.kind === 'private' ? '127.0.0.1' : database.host, port: database.port };
}

export function databaseAddress(settings: ClusterSettings): string {
  const { host, port } = databaseEndpoint(settings);
  return `${host}:${port}`;
}

export function databaseUser(settings: ClusterSettings): string {
  return settings.database.kind === 'private' ? 'temporal' : settings.database.user;
}

function datastore(settings: ClusterSettings, which: keyof typeof DATABASES) {
  return {
    sql: {
      pluginName: 'postgres12',
      databaseName: DATABASES[which],
      connectAddr: databaseAddress(settings),
      connectProtocol: 'tcp',
      user: databaseUser(settings),
      password: placeholders.password,
      maxConns: CONNECTIONS[which],
      maxIdleConns: CONNECTIONS[which],
      maxConnLifetime: '1h',
    },
  };
}

const rpc = (grpcPort: number, membershipPort: number, extra: Record<string, number> = {}) => ({
  rpc: { grpcPort, membershipPort, bindOnLocalHost: true, ...extra },
});

/** What a secured cluster's server reads: its certificates and keys, and where its JWT keys are served. */
export interface ServerSecurity {
  tls: ClusterTls;
  jwksUrl: string;
}

/**
 * TLS on the frontend; mutual TLS between the server's services (history, matching, the internal frontend), so that
 * nobody without the cluster's internode key calls them past the authorizer; Temporal's default JWT claim mapper and
 * authorizer, with the keys the cluster command serves.
 */
function securityConfig({ tls, jwksUrl }: ServerSecurity) {
  return {
    tls: {
      internode: {
        server: {
          certFile: tls.internode.cert,
          keyFile: tls.internode.key,
          requireClientAuth: true,
          clientCaFiles: [tls.ca],
        },
        client: { serverName: INTERNODE_NAME, rootCaFiles: [tls.ca] },
      },
      frontend: { server: { certFile: tls.frontend.cert, keyFile: tls.frontend.key } },
    },
    authorization: {
      // Read at start and every minute: a key the cluster command serves later is taken without a restart.
      jwtKeyProvider: { keySourceURIs: [jwksUrl], refreshInterval: '1m' },
      permissionsClaimName: PERMISSIONS_CLAIM,
      authorizer: 'default',
      claimMapper: 'default',
    },
  };
}

/**
 * The server's configuration (`<stateDir>/config/cluster.yaml`), one file for every server process: the history
 * shard count and the database are the cluster's; only the metrics address differs per process. With `security`
 * (`--secure`) it also runs the internal frontend: the server's own worker service (schedules, batch operations)
 * reaches the frontend's API there, over internode mutual TLS, instead of through the authorizer.
 */
export function renderServerConfig(
  settings: ClusterSettings,
  dynamicConfigFile: string,
  shards: number,
  security?: ServerSecurity,
): string {
  const { ports } = settings;
  const config = {
    log: { stdout: true, level: 'info' },
    persistence: {
      defaultStore: 'postgres-default',
      visibilityStore: 'postgres-visibility',
      numHistoryShards: shards,
      datastores: {
        'postgres-default': datastore(settings, 'default'),
        'postgres-visibility': datastore(settings, 'visibility'),
      },
    },
    global: {
      membership: { maxJoinDuration: '30s', broadcastAddress: '127.0.0.1' },
      metrics: { prometheus: { framework: 'tally', timerType: 'histogram', listenAddress: placeholders.metrics } },
      ...(security ? securityConfig(security) : {}),
    },
    services: {
      frontend: rpc(ports.frontend, ports.membership.frontend, { httpPort: ports.frontendHttp }),
      ...(security ? { 'internal-frontend': rpc(ports.internalFrontend.grpc, ports.internalFrontend.membership) } : {}),
      history: rpc(ports.history, ports.membership.history),
      matching: rpc(ports.matching, ports.membership.matching),
      worker: rpc(ports.worker, ports.membership.worker),
    },
    clusterMetadata: {
      enableGlobalNamespace: false,
      failoverVersionIncrement: 10,
      masterClusterName: 'active',
      currentClusterName: 'active',
      clusterInformation: {
        active: {
          enabled: true,
          initialFailoverVersion: 1,
          rpcName: 'frontend',
          rpcAddress: `127.0.0.1:${ports.frontend}`,
          httpAddress: `127.0.0.1:${ports.frontendHttp}`,
        },
      },
    },
    dcRedirectionPolicy: { policy: 'noop' },
    archival: { history: { state: 'disabled' }, visibility: { state: 'disabled' } },
    namespaceDefaults: { archival: { history: { state: 'disabled' }, visibility: { state: 'disabled' } } },
    dynamicConfigClient: { filepath: dynamicConfigFile, pollInterval: '10s' },
  };
  const yaml = stringify(config, { lineWidth: 0 })
    .replaceAll(placeholders.password, `{{ env "${PASSWORD_ENV}" | toJson }}`)
    .replaceAll(placeholders.metrics, `{{ env "${METRICS_ADDRESS_ENV}" | toJson }}`);
  // The server renders a file as a Go template only when this comment is in its first kilobyte.
  return `# enable-template\n# Rendered by npm run cluster on every start: edit the settings, not this file.\n${yaml}`;
}

/**
 * The server's dynamic configuration, written only when missing: it is the operator's to tune, and the server
 * rereads it every 10 s.
 */
export function renderDynamicConfig(): string {
  return [
    '# Temporal dynamic configuration, reread every 10 s. Written once by npm run cluster; yours to edit.',
    '# A search attribute created for a namespace is usable at once (the server reads its cache through).',
    'system.forceSearchAttributesCacheRefreshOnRead:',
    '  - value: true',
    '',
  ].join('\n');
}

/** The Web UI server's configuration (`<stateDir>/ui/config/cluster.yaml`). */
export function renderUiConfig(settings: ClusterSettings): string {
  return stringify({
    temporalGrpcAddress: `127.0.0.1:${settings.ports.frontend}`,
    host: '127.0.0.1',
    port: settings.ports.ui,
    enableUi: true,
    defaultNamespace: settings.namespace,
    notifyOnNewVersion: false,
    cors: { allowOrigins: [`http://127.0.0.1:${settings.ports.ui}`] },
  });
}
