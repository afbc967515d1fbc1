// How the tests reach a secured server (test/server-access.ts): the PF_TEST_SERVER_* variables are refused by name
// when wrong, and each test namespace gets the cluster's two tokens for it, signed with the cluster's key: the admin's
// and the workers' permissions, nothing more. That the cluster accepts them is what CI's secure step runs.
import assert from 'node:assert/strict';
import { chmod, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { signingKey, verifiedClaims, type SigningKey } from '../../scripts/lib/cluster/security';
import {
  connectionOptions,
  credentialsOn,
  securedServerFrom,
  temporalEnv,
  workerProcessCredentials,
  workerProcessEnv,
} from '../server-access';

describe('the tests on a secured server: variables, and tokens per test namespace', () => {
  let dir: string;
  let ca: string;
  let keyFile: string;
  let key: SigningKey;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'pf-server-access-'));
    ca = join(dir, 'ca.crt');
    await writeFile(ca, '-----BEGIN CERTIFICATE-----\n');
    key = await signingKey(dir);
    keyFile = join(dir, 'auth', 'jwt-signing.key');
  });
  after(() => rm(dir, { recursive: true, force: true }));

  it('is a plain server without the variables, also when they are empty', () => {
    assert.equal(securedServerFrom({}), undefined);
    assert.equal(
      securedServerFrom({ PF_TEST_SERVER_TLS_CA: '', PF_TEST_SERVER_TLS_SERVER_NAME: '', PF_TEST_SERVER_JWT_KEY: '' }),
      undefined,
    );
  });

  it('refuses a key or a server name without the CA, a bad name, and unreadable files, naming the variable', async () => {
    assert.throws(
      () => securedServerFrom({ PF_TEST_SERVER_JWT_KEY: keyFile }),
      /^Error: PF_TEST_SERVER_JWT_KEY: needs PF_TEST_SERVER_TLS_CA/,
    );
    assert.throws(
      () => securedServerFrom({ PF_TEST_SERVER_TLS_SERVER_NAME: 'localhost' }),
      /^Error: PF_TEST_SERVER_TLS_SERVER_NAME: needs PF_TEST_SERVER_TLS_CA/,
    );
    assert.throws(
      () => securedServerFrom({ PF_TEST_SERVER_TLS_CA: ca, PF_TEST_SERVER_TLS_SERVER_NAME: 'local host' }),
      /^Error: PF_TEST_SERVER_TLS_SERVER_NAME: a host name/,
    );
    assert.throws(
      () => securedServerFrom({ PF_TEST_SERVER_TLS_CA: join(dir, 'missing.crt') }),
      /^Error: PF_TEST_SERVER_TLS_CA: ENOENT/,
    );
    assert.throws(
      () => securedServerFrom({ PF_TEST_SERVER_TLS_CA: ca, PF_TEST_SERVER_JWT_KEY: join(dir, 'missing.key') }),
      /^Error: PF_TEST_SERVER_JWT_KEY: ENOENT/,
    );
    // The cluster's key is no key of ours to make: a missing one is not made (signingKey would).
    const other = join(dir, 'other.key');
    await writeFile(other, 'not a key', { mode: 0o600 });
    assert.throws(
      () => securedServerFrom({ PF_TEST_SERVER_TLS_CA: ca, PF_TEST_SERVER_JWT_KEY: other }),
      /^Error: PF_TEST_SERVER_JWT_KEY: /,
    );
    await chmod(keyFile, 0o640);
    try {
      assert.throws(
        () => securedServerFrom({ PF_TEST_SERVER_TLS_CA: ca, PF_TEST_SERVER_JWT_KEY: keyFile }),
        /^Error: PF_TEST_SERVER_JWT_KEY: private key .* is readable by group or others/,
      );
    } finally {
      await chmod(keyFile, 0o600);
    }
  });

  it("issues the admin's and the workers' tokens for each namespace with the cluster's key, and only those", () => {
    const server = securedServerFrom({
      PF_TEST_SERVER_TLS_CA: ca,
      PF_TEST_SERVER_TLS_SERVER_NAME: 'localhost',
      PF_TEST_SERVER_JWT_KEY: keyFile,
    })!;
    assert.equal(server.key?.kid, key.kid);
    const admin = credentialsOn(server, 'test-a1', 'admin');
    const workers = credentialsOn(server, 'test-a1', 'workers');
    assert.deepEqual(verifiedClaims(key, admin.apiKey!)?.permissions, ['test-a1:admin']);
    assert.deepEqual(verifiedClaims(key, workers.apiKey!)?.permissions, ['test-a1:write']);
    assert.equal(verifiedClaims(key, workers.apiKey!)?.sub, 'planned-failover-workers');
    assert.deepEqual(verifiedClaims(key, credentialsOn(server, 'test-b2', 'workers').apiKey!)?.permissions, [
      'test-b2:write',
    ]);
    const claims = verifiedClaims(key, admin.apiKey!)!;
    assert.ok(claims.exp - claims.iat <= 86_400, 'valid a day at most');

    // The same credentials by every road: the SDK's options, the CLIs' environment, a worker process's and back.
    assert.deepEqual(temporalEnv(workers), {
      TEMPORAL_TLS_SERVER_CA_CERT_PATH: ca,
      TEMPORAL_TLS_SERVER_NAME: 'localhost',
      TEMPORAL_API_KEY: workers.apiKey,
    });
    assert.deepEqual(workerProcessCredentials(workerProcessEnv(workers)), workers);
    const options = connectionOptions('127.0.0.1:7233', workers);
    assert.equal(options.tls?.serverNameOverride, 'localhost');
    assert.equal(options.tls?.serverRootCACertificate.toString(), '-----BEGIN CERTIFICATE-----\n');
    assert.equal(options.apiKey, workers.apiKey);
    // A plain server: no TLS, no token.
    assert.deepEqual(connectionOptions('127.0.0.1:7233', {}), { address: '127.0.0.1:7233' });
    assert.deepEqual(temporalEnv({}), {});
  });
});
