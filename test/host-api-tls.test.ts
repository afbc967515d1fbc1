// The host API is served over mutual TLS only (review finding C1): by the lab and by a real KVM host process (a DR
// host, whose replica calls need no libvirt domain). A caller without a certificate of the site's CA made for clients
// gets a failed handshake and no HTTP answer, and nothing changes; the adapter accepts a server only if its
// certificate names the host the call is about; plain HTTP starts only on loopback; `failover certs create`.
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { chmodSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { startKvmHost, type RunningKvmHost } from '../agent/server';
import { startLab } from '../lab/server';
import { asActivityFailure } from '../src/activities/failures';
import { connectHypervisor } from '../src/config/hypervisor';
import { parseConfiguration } from '../src/config/load';
import { clientTlsFiles, ensureSite, type ClientTlsFiles, type ServerTlsFiles } from '../src/host-api/certificates';
import { HostIdentityError, NotFoundError } from '../src/hypervisor/errors';
import { HostApiHypervisor } from '../src/hypervisor/host-api-adapter';
import type { ReplicaRef } from '../src/hypervisor/port';
import { DR, PROD, smallEstate, startTestLab, type TestLab } from './lab/helpers';
import { runScript, startScript, terminate } from './processes';
import { kvmPort, rawRequest, testClientTls, testServerTls } from './tls';

const KVM_DR = 'kvm-dr01';
const KVM_PROD = 'kvm-prod01';
const DISKS = [{ id: 'vda', sizeBytes: 2 * 65536 }];

/** A request that must get no HTTP answer at all: the handshake fails (or the connection is cut right after it). */
async function refusedByTls(url: string, tls: Partial<ClientTlsFiles>): Promise<string> {
  const body = JSON.stringify({ sourceVm: 'vm1', disks: DISKS });
  const error = await rawRequest(url, {
    method: 'PUT',
    body,
    headers: { 'content-type': 'application/json' },
    tls,
  }).then(
    (answer) => assert.fail(`an HTTP answer came back: ${answer.status} ${answer.text}`),
    (e: NodeJS.ErrnoException) => e,
  );
  assert.ok(error.code, `a connection error, not an answer: ${String(error)}`);
  return error.code;
}

describe('the host API over mutual TLS', () => {
  let dir: string;
  let lab: TestLab;
  let kvm: RunningKvmHost;
  /** Another site: its CA, a client certificate of it. */
  let stranger: ClientTlsFiles;
  /** A host (server) certificate of the run's site, presented as a client certificate. */
  let hostCertificate: ServerTlsFiles;

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'pf-tls-'));
    lab = await startTestLab(smallEstate());
    hostCertificate = await testServerTls([KVM_DR]);
    kvm = await startKvmHost({
      name: KVM_DR,
      site: 'dr',
      role: 'dr',
      // Replica calls run qemu-img in the state directory; libvirt is not reached.
      libvirtUri: 'test:///default',
      stateDir: join(dir, 'kvm-state'),
      tls: hostCertificate,
    });
    await ensureSite(join(dir, 'stranger'), {}, ['intruder']);
    stranger = clientTlsFiles(join(dir, 'stranger'), 'intruder');
  });
  after(async () => {
    await lab?.close();
    await kvm?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  const servers = [
    { name: 'the lab', url: () => lab.lab.url, host: DR },
    { name: 'a KVM host process', url: () => kvm.url, host: KVM_DR },
  ];
  for (const server of servers) {
    describe(server.name, () => {
      const replicaUrl = (replica: string) => `${server.url()}/v1/hosts/${server.host}/replicas/${replica}`;
      /** With the tests' own client certificate: whether the replica exists. */
      const replicaStatus = async (replica: string) => (await rawRequest(replicaUrl(replica))).status;

      test('serves a client certificate of its CA (so the refusals below are the handshake’s)', async () => {
        const made = await rawRequest(replicaUrl('welcome'), {
          method: 'PUT',
          body: JSON.stringify({ sourceVm: 'vm1', disks: DISKS }),
          headers: { 'content-type': 'application/json' },
        });
        assert.equal(made.status, 200, made.text);
        assert.equal(await replicaStatus('welcome'), 200);
      });

      test('(a) without a client certificate: no HTTP answer, and the PUT changed nothing', async () => {
        const code = await refusedByTls(replicaUrl('no-cert'), { ca: testClientTls().ca });
        assert.match(code, /CERTIFICATE_REQUIRED|ECONNRESET|EPIPE/);
        assert.equal(await replicaStatus('no-cert'), 404, 'no replica was made');
      });

      test('(b) with a client certificate of another CA: no HTTP answer, nothing changed', async () => {
        await refusedByTls(replicaUrl('other-ca'), { ...stranger, ca: testClientTls().ca });
        assert.equal(await replicaStatus('other-ca'), 404, 'no replica was made');
      });

      test('(c) with a host certificate of its own CA presented as a client certificate: refused', async () => {
        await refusedByTls(replicaUrl('host-cert'), {
          ca: testClientTls().ca,
          cert: hostCertificate.cert,
          key: hostCertificate.key,
        });
        assert.equal(await replicaStatus('host-cert'), 404, 'no replica was made');
      });
    });
  }

  describe('(d) the adapter checks that the server is the host the call is about', () => {
    /** The configuration's clients, with `host` served (so it says) at `url`. */
    const clientsFor = (host: string, url: string) =>
      connectHypervisor(
        parseConfiguration(
          JSON.stringify({
            hosts: [{ name: host, role: 'dr', adapter: { type: 'kvm', url } }],
            proxies: [{ name: 'p1', slots: 1 }],
            users: [{ name: 'alice', roles: ['BackupAdministrator'] }],
            tls: testClientTls(),
          }),
        ),
      );

    /** Refused as HostIdentityError, final for activities, and the replica was not made. */
    async function refusedIdentity(port: HostApiHypervisor | ReturnType<typeof connectHypervisor>, ref: ReplicaRef) {
      const error = await port.createReplica(ref, { sourceVm: 'vm1', disks: DISKS }).then(
        () => assert.fail('the call went through'),
        (e: unknown) => e,
      );
      assert.ok(error instanceof HostIdentityError, String(error));
      assert.equal(error.retryable, false);
      assert.equal((asActivityFailure(error) as { nonRetryable?: boolean }).nonRetryable, true, 'not retried');
      return error;
    }

    test('a KVM host process whose certificate names another host cannot answer for this one', async () => {
      // kvm-dr01's own certificate: fine for kvm-dr01 (it answers, with a 404) ...
      const right = clientsFor(KVM_DR, kvm.url);
      try {
        await assert.rejects(right.getReplica({ host: KVM_DR, replica: 'nothing' }), NotFoundError);
      } finally {
        right.close();
      }
      // ... and refused for kvm-prod01 (a stolen certificate, or the wrong address in the configuration).
      const wrong = clientsFor(KVM_PROD, kvm.url);
      try {
        const error = await refusedIdentity(wrong, { host: KVM_PROD, replica: 'stolen' });
        assert.match(error.message, new RegExp(`is not host ${KVM_PROD}: its certificate names ${KVM_DR}$`));
      } finally {
        wrong.close();
      }
    });

    test("the lab's certificate cannot answer for a KVM host", async () => {
      const port = clientsFor(KVM_DR, lab.lab.url);
      try {
        const error = await refusedIdentity(port, { host: KVM_DR, replica: 'lab-as-kvm' });
        assert.match(error.message, /its certificate names prod-a, dr-a, lab$/);
      } finally {
        port.close();
      }
      const own = kvmPort(kvm.url, KVM_DR);
      try {
        await assert.rejects(own.getReplica({ host: KVM_DR, replica: 'lab-as-kvm' }), NotFoundError);
      } finally {
        own.close();
      }
    });

    test('a server with a certificate of another CA is refused, final', async () => {
      const stolen = join(dir, 'stranger-host');
      await ensureSite(stolen, { [KVM_DR]: [KVM_DR] }, []);
      const impostor = await startKvmHost({
        name: KVM_DR,
        site: 'dr',
        role: 'dr',
        libvirtUri: 'test:///default',
        stateDir: join(dir, 'impostor-state'),
        tls: { cert: join(stolen, `${KVM_DR}.crt`), key: join(stolen, `${KVM_DR}.key`), clientCa: testClientTls().ca },
      });
      const port = kvmPort(impostor.url, KVM_DR);
      try {
        const error = await refusedIdentity(port, { host: KVM_DR, replica: 'impostor' });
        assert.match(error.message, /TLS refused: .*(UNABLE_TO_VERIFY_LEAF_SIGNATURE|unable to verify)/);
      } finally {
        port.close();
        await impostor.stop();
      }
    });
  });

  describe('(e) plain HTTP', () => {
    test('refuses to start on any address but loopback, before anything listens', async () => {
      await assert.rejects(
        startKvmHost({
          name: KVM_DR,
          site: 'dr',
          role: 'dr',
          libvirtUri: 'test:///default',
          stateDir: join(dir, 'plain-state'),
          listen: '0.0.0.0',
          insecureHttp: true,
        }),
        /^Error: plain HTTP is for development on a loopback address only, not on 0\.0\.0\.0/,
      );
      await assert.rejects(
        startLab({ estate: smallEstate(), dataDir: join(dir, 'plain-lab'), host: '0.0.0.0', insecureHttp: true }),
        /plain HTTP is for development on a loopback address only, not on 0\.0\.0\.0/,
      );
      const run = await runScript(
        'agent/main.ts',
        ['--name', KVM_DR, '--site', 'dr', '--role', 'dr', '--state', join(dir, 'plain-cli'), '--port', '0'],
        {},
      );
      assert.notEqual(run.code, 0);
      assert.match(run.stderr, /--tls-cert: is required with --tls-key and --client-ca \(or --insecure-http/);
      const exposed = await runScript(
        'agent/main.ts',
        [
          ...['--name', KVM_DR, '--site', 'dr', '--role', 'dr', '--state', join(dir, 'plain-cli'), '--port', '0'],
          ...['--listen', '0.0.0.0', '--insecure-http'],
        ],
        {},
      );
      assert.notEqual(exposed.code, 0);
      assert.match(exposed.stderr, /plain HTTP is for development on a loopback address only, not on 0\.0\.0\.0/);
    });

    test('on loopback it starts, saying so in one line', async () => {
      const lines: string[] = [];
      const plain = await startLab({
        estate: smallEstate(),
        dataDir: join(dir, 'loopback-lab'),
        insecureHttp: true,
        log: (m) => lines.push(m),
      });
      try {
        assert.match(plain.url, /^http:\/\/127\.0\.0\.1:\d+$/);
        const port = new HostApiHypervisor({ url: plain.url });
        try {
          assert.equal((await port.listVms(PROD)).length, 1);
        } finally {
          port.close();
        }
        const { port: listening } = new URL(plain.url);
        assert.deepEqual(
          lines.filter((l) => l.startsWith('INSECURE')),
          [`INSECURE: plain HTTP on 127.0.0.1:${listening}, for development only`],
        );
      } finally {
        await plain.stop();
      }
    });
  });

  test('a KVM host process refuses to start with a key that group or others may read', async () => {
    const copy = join(dir, 'exposed');
    await ensureSite(copy, { [KVM_DR]: [KVM_DR] }, []);
    const key = join(copy, `${KVM_DR}.key`);
    chmodSync(key, 0o640);
    const tls = { cert: join(copy, `${KVM_DR}.crt`), key, clientCa: join(copy, 'ca.crt') };
    const state = join(dir, 'exposed-state');
    await assert.rejects(
      startKvmHost({ name: KVM_DR, site: 'dr', role: 'dr', libvirtUri: 'test:///default', stateDir: state, tls }),
      new RegExp(`private key ${key} is readable by group or others \\(mode 0640\\)`),
    );
    const run = await runScript(
      'agent/main.ts',
      [
        ...['--name', KVM_DR, '--site', 'dr', '--role', 'dr', '--state', state, '--port', '0'],
        ...['--tls-cert', tls.cert, '--tls-key', key, '--client-ca', tls.clientCa],
      ],
      {},
    );
    assert.equal(run.code, 2);
    assert.match(run.stderr, /is readable by group or others \(mode 0640\): it must be 0600 or stricter/);
    // Made private again, the same files start it, and it serves over TLS.
    chmodSync(key, 0o600);
    const started = await startScript(
      'agent/main.ts',
      [
        ...['--name', KVM_DR, '--site', 'dr', '--role', 'dr', '--state', state, '--port', '0'],
        ...['--tls-cert', tls.cert, '--tls-key', key, '--client-ca', tls.clientCa],
      ],
      {},
      /listening on https:\/\/127\.0\.0\.1:\d+/,
    );
    await terminate(started.child);
  });

  describe('(g) failover certs create', () => {
    const site = () => join(dir, 'site');
    const create = (...extra: string[]) =>
      runScript(
        'src/cli/main.ts',
        ['certs', 'create', '--dir', site(), '--hosts', 'kvm01,kvm-dr01', '--clients', 'workers', ...extra],
        {},
      );
    const fingerprints = () =>
      Object.fromEntries(
        ['ca', 'kvm01', 'kvm-dr01', 'workers'].map((n) => [
          n,
          new X509Certificate(readFileSync(join(site(), `${n}.crt`))).fingerprint256,
        ]),
      );

    test('makes the CA, host and client certificates, keys 0600, printing no key', async () => {
      const run = await create('--host-names', 'kvm01=kvm01.example.com,10.0.0.5');
      assert.equal(run.code, 0, run.stderr);
      for (const name of ['ca', 'kvm01', 'kvm-dr01', 'workers']) {
        assert.equal(statSync(join(site(), `${name}.key`)).mode & 0o777, 0o600, `${name}.key`);
        assert.match(run.stdout, new RegExp(`made .* ${name} .*${site()}/${name}\\.crt`));
      }
      assert.doesNotMatch(run.stdout + run.stderr, /PRIVATE KEY|BEGIN/);
      const ca = new X509Certificate(readFileSync(join(site(), 'ca.crt')));
      const kvm01 = new X509Certificate(readFileSync(join(site(), 'kvm01.crt')));
      const workers = new X509Certificate(readFileSync(join(site(), 'workers.crt')));
      assert.ok(ca.ca && kvm01.checkIssued(ca) && kvm01.verify(ca.publicKey) && workers.verify(ca.publicKey));
      assert.equal(kvm01.subjectAltName, 'DNS:kvm01, DNS:kvm01.example.com, IP Address:10.0.0.5');
      assert.deepEqual(kvm01.keyUsage, ['1.3.6.1.5.5.7.3.1'], 'serverAuth only');
      assert.deepEqual(workers.keyUsage, ['1.3.6.1.5.5.7.3.2'], 'clientAuth only');
      assert.equal(workers.subject, 'CN=workers');
      const years = (c: X509Certificate) => (Date.parse(c.validTo) - Date.now()) / (365.25 * 24 * 3600e3);
      assert.ok(Math.abs(years(ca) - 10) < 0.05 && Math.abs(years(kvm01) - 2) < 0.05, 'CA 10 years, leaves 2');
    });

    test('is idempotent: a second run keeps every valid certificate; new names or --reissue make them again', async () => {
      const first = fingerprints();
      const again = await create('--host-names', 'kvm01=kvm01.example.com,10.0.0.5');
      assert.equal(again.code, 0, again.stderr);
      assert.doesNotMatch(again.stdout, /^made/m);
      assert.deepEqual(fingerprints(), first);
      // kvm01 without its extra names: it alone is made again.
      const renamed = await create();
      assert.equal(renamed.code, 0, renamed.stderr);
      assert.deepEqual(
        renamed.stdout.split('\n').flatMap((l) => (l.startsWith('made') ? [l.split(/\s+/)[2]] : [])),
        ['kvm01'],
      );
      const now = fingerprints();
      assert.notEqual(now.kvm01, first.kvm01);
      assert.deepEqual({ ...now, kvm01: '' }, { ...first, kvm01: '' });
      const reissued = await create('--reissue');
      assert.equal(reissued.code, 0, reissued.stderr);
      const after = fingerprints();
      assert.equal(after.ca, first.ca, 'the CA stays');
      for (const name of ['kvm01', 'kvm-dr01', 'workers']) assert.notEqual(after[name], now[name], name);
    });

    test('refuses bad flags naming them, and makes nothing', async () => {
      const run = await runScript(
        'src/cli/main.ts',
        ['certs', 'create', '--dir', join(dir, 'refused'), '--hosts', 'kvm/01', '--host-names', 'kvm02=bad name'],
        {},
      );
      assert.equal(run.code, 2);
      assert.match(run.stderr, /--hosts\[0\]: must be a name/);
      assert.match(run.stderr, /--host-names\[0\]\.names\[0\]: must be a DNS name or an IP address/);
      assert.throws(() => statSync(join(dir, 'refused')), /ENOENT/);
    });
  });
});
