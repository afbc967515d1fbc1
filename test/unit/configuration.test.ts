import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { ensureDemoConfiguration } from '../../src/config/demo';
import { ConfigurationError, loadConfiguration, parseConfiguration } from '../../src/config/load';

function problemsOf(text: string): string[] {
  try {
    parseConfiguration(text, 't.yaml');
  } catch (err) {
    assert.ok(err instanceof ConfigurationError);
    return err.problems.map((p) => `${p.path}: ${p.message}`);
  }
  return assert.fail('expected the configuration to be refused');
}

const tls = 'tls: { ca: /site/ca.crt, cert: /site/workers.crt, key: /site/workers.key }\n';

const base = `
hosts:
  - { name: prod, role: production, adapter: { type: lab, url: http://127.0.0.1:7300 } }
  - { name: dr, role: dr, adapter: { type: lab, url: http://127.0.0.1:7300 } }
proxies:
  - { name: p1, slots: 2 }
users:
  - { name: alice, roles: [BackupAdministrator] }
`;

describe('configuration file', () => {
  it('makes the demo configuration with a key for each user on first run, and the same keys after', async () => {
    const root = mkdtempSync(join(tmpdir(), 'pf-demo-config-'));
    try {
      const template = join(root, 'config', 'planned-failover.yaml');
      mkdirSync(join(root, 'config'));
      copyFileSync('config/planned-failover.yaml', template);
      const keyDir = join(root, 'home', 'keys');
      const first = await ensureDemoConfiguration(template, keyDir);
      assert.equal(first.file, join(root, '.data', 'planned-failover.yaml'));
      assert.deepEqual(first.madeKeys, ['alice', 'bob', 'carol', 'dave', 'erin', 'scheduler']);
      const config = loadConfiguration(first.file);
      for (const user of config.users) assert.equal(user.keys.length, 1, user.name);
      // The service identity's key is the worker's, where scheduledRuns says (relative to the file, as in the template).
      assert.equal(config.scheduledRuns?.key, join(root, '.data', 'keys', 'scheduler.key'));
      assert.equal(statSync(config.scheduledRuns.key).mode & 0o777, 0o600);
      assert.equal(statSync(join(keyDir, 'alice.key')).mode & 0o777, 0o600);
      assert.equal(config.tls?.ca, join(root, '.data', 'certs', 'ca.crt'));
      const second = await ensureDemoConfiguration(template, keyDir);
      assert.deepEqual(second.madeKeys, []);
      assert.deepEqual(loadConfiguration(second.file).users, config.users);
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });

  it('refuses a key that is no Ed25519 line, and scheduled runs without a service identity that can sign', () => {
    assert.deepEqual(
      problemsOf(
        base.replace('roles: [BackupAdministrator] }', "roles: [BackupAdministrator], keys: ['ssh-ed25519 AAAA'] }"),
      ),
      [
        'users[0].keys[0] (line 8): must be an Ed25519 public key line like ed25519:<43 base64url characters>, as `failover keys create` prints it',
      ],
    );
    const scheduled = `${base}jobs: [{ name: j, vms: [vm1], targetHost: dr, schedule: { every: 1h } }]\n`;
    assert.deepEqual(problemsOf(scheduled), [
      'jobs[0].schedule (line 9): scheduled runs need a service identity: declare scheduledRuns with requestedBy and key',
    ]);
    assert.deepEqual(problemsOf(`${scheduled}scheduledRuns: { requestedBy: alice }\n`), [
      "scheduledRuns.requestedBy (line 10): 'alice' has no key: list the public key of the service identity's key file",
      'scheduledRuns.key (line 10): is required: scheduled runs are signed (unless requests.allowUnsigned)',
    ]);
    assert.deepEqual(problemsOf(`${scheduled}scheduledRuns: { requestedBy: zed, key: k }\n`), [
      "scheduledRuns.requestedBy (line 10): no user 'zed' is declared",
    ]);
  });

  it('loads the demo configuration with its defaults', async () => {
    const root = mkdtempSync(join(tmpdir(), 'pf-demo-config-'));
    mkdirSync(join(root, 'config'));
    copyFileSync('config/planned-failover.yaml', join(root, 'config', 'planned-failover.yaml'));
    const demo = await ensureDemoConfiguration(join(root, 'config', 'planned-failover.yaml'), join(root, 'keys'));
    const config = loadConfiguration(demo.file);
    rmSync(root, { recursive: true, force: true });
    assert.deepEqual(config.requests, { validityMinutes: 5, allowUnsigned: false });
    assert.deepEqual(
      config.jobs.map((j) => [j.name, j.vms.length, j.dataSource]),
      [
        ['sql', 3, 'production'],
        ['web', 3, 'backup'],
      ],
    );
    assert.deepEqual(
      config.proxies.map((p) => [p.name, p.enabled, p.transport]),
      [
        ['proxy01', true, 'host-to-host'],
        ['proxy02', true, 'network'],
      ],
    );
  });

  it("refuses a proxy transport it does not know, naming the proxy's field", () => {
    const problems = problemsOf(base.replace('{ name: p1, slots: 2 }', '{ name: p1, slots: 2, transport: nfs }'));
    assert.deepEqual(problems, ["proxies[0].transport (line 6): must be 'network' or 'host-to-host'"]);
  });

  it('takes lab and KVM hosts in one estate, each at its own host API URL', () => {
    // The first host only.
    const config = parseConfiguration(
      `${base.replace('type: lab, url: http://127.0.0.1:7300', 'type: kvm, url: https://10.0.0.5:7400')}${tls}`,
    );
    assert.deepEqual(
      config.hosts.map((h) => [h.name, h.adapter.type, h.adapter.url]),
      [
        ['prod', 'kvm', 'https://10.0.0.5:7400'],
        ['dr', 'lab', 'http://127.0.0.1:7300'],
      ],
    );
  });

  it('needs the tls block as soon as a host or the backup repository is https://, naming it', () => {
    const kvm = base.replace('type: lab, url: http://127.0.0.1:7300', 'type: kvm, url: https://10.0.0.5:7400');
    assert.deepEqual(problemsOf(kvm), [
      "tls (line 2): is required: hosts[0].adapter.url is https:// (give ca, cert and key: the site's CA, the client certificate and its key)",
    ]);
    const backups = `${base}backupRepository:\n  adapter: { type: lab, url: https://lab.example.com:7300 }\n`;
    assert.match(
      problemsOf(backups).join('\n'),
      /^tls \(line 2\): is required: backupRepository\.adapter\.url is https:\/\//,
    );
    assert.deepEqual(problemsOf(`${kvm}tls: { ca: ca.crt, cert: workers.crt }\n`), [
      'tls.key (line 9): must be a file path',
    ]);
  });

  it('refuses plain http:// to anything but loopback, naming the host', () => {
    for (const address of ['10.0.0.5', 'kvm01', '0.0.0.0', '[fe80::1]'])
      assert.deepEqual(
        problemsOf(`${base.replace('url: http://127.0.0.1:7300', `url: 'http://${address}:7400'`)}${tls}`),
        [
          'hosts[0].adapter.url (line 3): must be https:// (the host API is served over mutual TLS); http:// only on a loopback address (127.0.0.0/8, ::1, localhost)',
        ],
        address,
      );
    for (const address of ['127.0.0.1', '127.1.2.3', 'localhost', '[::1]'])
      parseConfiguration(base.replace('url: http://127.0.0.1:7300', `url: 'http://${address}:7400'`));
  });

  it("takes the tls block's relative paths relative to the configuration file's directory", () => {
    const dir = mkdtempSync(join(tmpdir(), 'pf-config-'));
    try {
      const file = join(dir, 'estate.yaml');
      writeFileSync(file, `${base}tls: { ca: certs/ca.crt, cert: /etc/pf/workers.crt, key: ../workers.key }\n`);
      assert.deepEqual(loadConfiguration(file).tls, {
        ca: join(dir, 'certs', 'ca.crt'),
        cert: '/etc/pf/workers.crt',
        key: join(dir, '..', 'workers.key'),
      });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("refuses an adapter type it does not know, naming both it knows; a backup repository is the lab's", () => {
    const problems = problemsOf(
      `${base.replace('{ name: dr, role: dr, adapter: { type: lab', '{ name: dr, role: dr, adapter: { type: hyperv')}` +
        'backupRepository:\n  adapter: { type: kvm, url: http://127.0.0.1:7300 }\n',
    );
    assert.deepEqual(problems, [
      "hosts[1].adapter.type (line 4): must be 'lab' or 'kvm'",
      "backupRepository.adapter.type (line 10): must be 'lab' (the only backup repository shipped so far)",
    ]);
  });

  it('names the path and line of every problem', () => {
    const problems = problemsOf(
      `${base}jobs:\n  - name: j\n    vms: []\n    targetHost: dr\n    restorePoints: 29\n    colour: blue\n`,
    );
    assert.deepEqual(problems, [
      'jobs[0].vms (line 11): must list at least one VM',
      'jobs[0].restorePoints (line 13): must be at most 28',
      'jobs[0].colour (line 14): is not a known field',
    ]);
  });

  it('checks references between hosts, jobs and proxies', () => {
    const problems = problemsOf(
      `${base}jobs:\n  - { name: a, vms: [vm1], targetHost: prod, proxies: [p9] }\n  - { name: b, vms: [vm1], targetHost: nowhere, dataSource: backup }\n`,
    );
    assert.deepEqual(problems, [
      "jobs[0].targetHost (line 10): 'prod' is not a DR host",
      "jobs[0].proxies[0] (line 10): no proxy 'p9' is declared",
      "jobs[1].targetHost (line 11): no host 'nowhere' is declared",
      "jobs[1].vms[0] (line 11): 'vm1' is already replicated by job 'a'",
      "jobs[1].dataSource (line 11): 'backup' needs a backupRepository",
    ]);
  });

  it('reports YAML syntax errors with their line', () => {
    const [problem] = problemsOf('hosts: [\n');
    assert.match(problem ?? '', /^line \d+: /);
  });
});
