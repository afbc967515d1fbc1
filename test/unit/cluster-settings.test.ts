import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { parse } from 'yaml';
import {
  METRICS_ADDRESS_ENV,
  PASSWORD_ENV,
  renderServerConfig,
  renderUiConfig,
} from '../../scripts/lib/cluster/config';
import { clusterSettings, listeningPorts, type ClusterSettings } from '../../scripts/lib/cluster/settings';

const root = '/srv/pf';
const settingsOf = (env: NodeJS.ProcessEnv, argv: string[] = [], secrets: Record<string, string> = {}) =>
  clusterSettings(argv, env, root, (file) => {
    const secret = secrets[file];
    if (secret === undefined) throw new Error(`ENOENT: no such file '${file}'`);
    return secret;
  });

describe('npm run cluster settings', () => {
  it('defaults: a private PostgreSQL, Temporal default ports, one server process, the Web UI', () => {
    const settings = settingsOf({});
    assert.equal(settings.stateDir, '/srv/pf/.data/cluster');
    assert.equal(settings.namespace, 'default');
    assert.equal(settings.historyShards, undefined);
    assert.deepEqual(settings.database, { kind: 'private', port: 5433 });
    assert.equal(settings.split, false);
    assert.equal(settings.ui, true);
    assert.equal(settings.ports.frontend, 7233);
    assert.equal(settings.ports.ui, 8233);
    assert.deepEqual(settings.ports.metrics, [8000, 8001]);
    assert.deepEqual(settings.ports.membership, { frontend: 6933, history: 6934, matching: 6935, worker: 6939 });
  });

  it('moves every port with PF_CLUSTER_PORT, and lists each once', () => {
    const settings = settingsOf({ PF_CLUSTER_PORT: '27233' }, ['--split']);
    const ports = listeningPorts(settings).map(([, port]) => port);
    assert.equal(new Set(ports).size, ports.length, 'no port twice');
    assert.ok(
      ports.every((port) => port > 25_000 && port < 29_000),
      ports.join(' '),
    );
    assert.ok(ports.includes(28001), 'the history process has its own metrics port when split');
    assert.ok(
      !listeningPorts(settingsOf({ PF_CLUSTER_PORT: '27233' }, ['--no-ui'])).some(([what]) => what === 'Web UI'),
    );
  });

  it('--secure: no Web UI, and the internal frontend and the JWT keys on ports of their own', () => {
    const settings = settingsOf({ PF_CLUSTER_PORT: '27233' }, ['--secure', '--split']);
    assert.equal(settings.secure, true);
    assert.equal(settings.ui, false, 'the Web UI has no way to present a token without an OIDC provider');
    const named = new Map(listeningPorts(settings));
    assert.equal(named.get('internal frontend'), 27236);
    assert.equal(named.get('internal frontend membership'), 26936);
    assert.equal(named.get('JWT keys (JWKS)'), 27238);
    assert.equal(named.get('Web UI'), undefined);
    const ports = [...named.values()];
    assert.equal(new Set(ports).size, ports.length, 'no port twice');
    assert.ok(!listeningPorts(settingsOf({})).some(([what]) => what.startsWith('internal frontend')));
  });

  it('takes an external PostgreSQL with its password from a file, never from a committed file', () => {
    const settings = settingsOf(
      { PF_CLUSTER_PG_HOST: 'db.dr.example', PF_CLUSTER_PG_USER: 'tmprl', PF_CLUSTER_PG_PASSWORD_FILE: '/run/pw' },
      [],
      { '/run/pw': 's3cr\'et"\n' },
    );
    assert.deepEqual(settings.database, {
      kind: 'external',
      host: 'db.dr.example',
      port: 5432,
      user: 'tmprl',
      password: 's3cr\'et"',
    });
    const config = renderServerConfig(settings, '/state/config/dynamicconfig.yaml', 512);
    assert.ok(!config.includes('s3cr'), 'the rendered configuration holds no password');
    assert.ok(!config.includes('PLACEHOLDER'), config);
    assert.match(config, new RegExp(`password: \\{\\{ env "${PASSWORD_ENV}" \\| toJson \\}\\}`));
    assert.match(config, /^# enable-template\n/);
    assert.ok(!listeningPorts(settings).some(([what]) => what === 'PostgreSQL'), 'an external database is not ours');
  });

  for (const [what, env, argv, message] of [
    ['an unknown flag', {}, ['--splt'], /unknown argument '--splt'/],
    ['a port out of range', { PF_CLUSTER_PORT: '70000' }, [], /^PF_CLUSTER_PORT: .*'70000'/],
    ['a port whose membership ports Temporal cannot store', { PF_CLUSTER_PORT: '40000' }, [], /^PF_CLUSTER_PORT/],
    ['a port too low for the membership ports', { PF_CLUSTER_PORT: '1000' }, [], /^PF_CLUSTER_PORT/],
    ['a bad namespace', { PF_CLUSTER_NAMESPACE: 'dr site' }, [], /^PF_CLUSTER_NAMESPACE: a Temporal namespace/],
    ['zero history shards', { PF_CLUSTER_HISTORY_SHARDS: '0' }, [], /^PF_CLUSTER_HISTORY_SHARDS/],
    ['an external database without a password', { PF_CLUSTER_PG_HOST: 'db' }, [], /PF_CLUSTER_PG_PASSWORD_FILE/],
    [
      'both password sources',
      { PF_CLUSTER_PG_HOST: 'db', PF_CLUSTER_PG_PASSWORD: 'a', PF_CLUSTER_PG_PASSWORD_FILE: '/run/pw' },
      [],
      /both set/,
    ],
    [
      'an unreadable password file',
      { PF_CLUSTER_PG_HOST: 'db', PF_CLUSTER_PG_PASSWORD_FILE: '/nope' },
      [],
      /cannot read \/nope/,
    ],
    [
      'a password for the private database',
      { PF_CLUSTER_PG_PASSWORD: 'a' },
      [],
      /PF_CLUSTER_PG_PASSWORD is set but PF_CLUSTER_PG_HOST/,
    ],
  ] as const) {
    it(`refuses ${what}, naming the setting`, () => {
      assert.throws(() => settingsOf(env, [...argv]), { message });
    });
  }
});

/** What the test reads of the rendered server configuration. */
interface ServerConfig {
  persistence: {
    numHistoryShards: number;
    datastores: Record<string, { sql: Record<'pluginName' | 'databaseName' | 'connectAddr' | 'password', string> }>;
  };
  global: { metrics: { prometheus: { listenAddress: string } } };
  services: Record<string, { rpc: Record<string, number | boolean> }>;
  clusterMetadata: { clusterInformation: { active: { rpcAddress: string } } };
  dynamicConfigClient: { filepath: string };
}

/** The parts of a secured server configuration the test reads. */
interface SecuredConfig {
  global: {
    tls: Record<'frontend' | 'internode', Record<'server' | 'client', unknown>>;
    authorization: unknown;
  };
  services: Record<string, { rpc: unknown }>;
}

describe('npm run cluster configuration', () => {
  const settings: ClusterSettings = settingsOf({ PF_CLUSTER_PORT: '27233' }, ['--split']);

  it('is the server configuration of Temporal 1.29 on PostgreSQL, with every port from the settings', () => {
    const text = renderServerConfig(settings, '/state/config/dynamicconfig.yaml', 8);
    // The server renders the template first; here the two expressions stand in for their values.
    const config = parse(
      text
        .replaceAll(`{{ env "${PASSWORD_ENV}" | toJson }}`, '"pw"')
        .replace(`{{ env "${METRICS_ADDRESS_ENV}" | toJson }}`, '"m"'),
    ) as ServerConfig;
    assert.equal(config.persistence.numHistoryShards, 8);
    const store = config.persistence.datastores['postgres-default']!.sql;
    assert.deepEqual(
      [store.pluginName, store.databaseName, store.connectAddr, store.password],
      ['postgres12', 'temporal', '127.0.0.1:25433', 'pw'],
    );
    const visibility = config.persistence.datastores['postgres-visibility']!.sql;
    assert.deepEqual([visibility.databaseName, visibility.password], ['temporal_visibility', 'pw']);
    assert.equal(config.global.metrics.prometheus.listenAddress, 'm');
    assert.deepEqual(config.services.frontend!.rpc, {
      grpcPort: 27233,
      membershipPort: 26933,
      bindOnLocalHost: true,
      httpPort: 27243,
    });
    assert.equal(config.services.history!.rpc.grpcPort, 27234);
    assert.equal(config.clusterMetadata.clusterInformation.active.rpcAddress, '127.0.0.1:27233');
    assert.equal(config.dynamicConfigClient.filepath, '/state/config/dynamicconfig.yaml');
  });

  it('--secure: TLS on the frontend, mutual TLS between the services, the default authorizer, the internal frontend', () => {
    const secured = settingsOf({ PF_CLUSTER_PORT: '27233' }, ['--secure']);
    const tls = {
      ca: '/state/tls/ca.crt',
      frontend: { cert: '/state/tls/frontend.crt', key: '/state/tls/frontend.key' },
      internode: { cert: '/state/tls/internode.crt', key: '/state/tls/internode.key' },
    };
    const config = parse(
      renderServerConfig(secured, '/d.yaml', 4, { tls, jwksUrl: 'http://127.0.0.1:27238/jwks.json' }),
    ) as SecuredConfig;
    assert.deepEqual(config.global.tls.frontend.server, { certFile: tls.frontend.cert, keyFile: tls.frontend.key });
    assert.deepEqual(config.global.tls.internode.server, {
      certFile: tls.internode.cert,
      keyFile: tls.internode.key,
      requireClientAuth: true,
      clientCaFiles: [tls.ca],
    });
    assert.deepEqual(config.global.tls.internode.client, { serverName: 'temporal-internode', rootCaFiles: [tls.ca] });
    assert.deepEqual(config.global.authorization, {
      jwtKeyProvider: { keySourceURIs: ['http://127.0.0.1:27238/jwks.json'], refreshInterval: '1m' },
      permissionsClaimName: 'permissions',
      authorizer: 'default',
      claimMapper: 'default',
    });
    assert.deepEqual(config.services['internal-frontend']!.rpc, {
      grpcPort: 27236,
      membershipPort: 26936,
      bindOnLocalHost: true,
    });
    const plain = parse(renderServerConfig(settings, '/d.yaml', 4)) as SecuredConfig;
    assert.equal(plain.global.tls, undefined);
    assert.equal(plain.global.authorization, undefined);
    assert.equal(plain.services['internal-frontend'], undefined);
  });

  it('points the Web UI at the frontend', () => {
    const ui = parse(renderUiConfig(settings)) as { temporalGrpcAddress: string; port: number; enableUi: boolean };
    assert.deepEqual([ui.temporalGrpcAddress, ui.port, ui.enableUi], ['127.0.0.1:27233', 28233, true]);
  });
});
