// The secured cluster's own secrets (scripts/lib/cluster/security.ts): the signing key and the tokens are files of
// mode 0600, kept across starts while valid; a token verifies only with its key and untouched; the JWKS holds the
// public key alone. That the server accepts what this signs is test/cluster/secure.test.ts's part.
import assert from 'node:assert/strict';
import { createPublicKey, verify } from 'node:crypto';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { freePort } from '../../scripts/lib/dev-server';
import {
  ensureTokens,
  serveJwks,
  signingKey,
  signToken,
  tokenPermissions,
  verifiedClaims,
} from '../../scripts/lib/cluster/security';

const modeOf = async (path: string): Promise<number> => (await stat(path)).mode & 0o777;

describe('a secured cluster: signing key and tokens', () => {
  let stateDir: string;
  before(async () => {
    stateDir = await mkdtemp(join(tmpdir(), 'pf-cluster-security-'));
  });
  after(() => rm(stateDir, { recursive: true, force: true }));

  it('makes the signing key once, mode 0600, and keeps it', async () => {
    const key = await signingKey(stateDir);
    const file = join(stateDir, 'auth', 'jwt-signing.key');
    assert.equal(await modeOf(file), 0o600);
    assert.equal(await modeOf(join(stateDir, 'auth')), 0o700);
    const again = await signingKey(stateDir);
    assert.equal(again.kid, key.kid);
    assert.deepEqual(again.jwk, key.jwk);
    assert.deepEqual(Object.keys(key.jwk).sort(), ['alg', 'crv', 'kid', 'kty', 'use', 'x', 'y'], 'no private part');
  });

  it('signs ES256 tokens that verify with the key alone, untouched', async () => {
    const key = await signingKey(stateDir);
    const token = signToken(key, 'alice', ['default:read'], 1);
    const [header, payload, signature] = token.split('.') as [string, string, string];
    assert.deepEqual(JSON.parse(Buffer.from(header, 'base64url').toString()), {
      alg: 'ES256',
      typ: 'JWT',
      kid: key.kid,
    });
    // Verified by Node's crypto here, independently of verifiedClaims.
    assert.ok(
      verify(
        'sha256',
        Buffer.from(`${header}.${payload}`),
        { key: createPublicKey({ key: key.jwk, format: 'jwk' }), dsaEncoding: 'ieee-p1363' },
        Buffer.from(signature, 'base64url'),
      ),
    );
    const claims = verifiedClaims(key, token)!;
    assert.equal(claims.sub, 'alice');
    assert.deepEqual(claims.permissions, ['default:read']);
    assert.equal(claims.exp - claims.iat, 86_400);

    const raised = Buffer.from(JSON.stringify({ ...claims, permissions: ['default:admin'] })).toString('base64url');
    const tampered = `${header}.${raised}.${signature}`;
    assert.equal(verifiedClaims(key, tampered), undefined, 'a changed payload');
    const otherDir = await mkdtemp(join(tmpdir(), 'pf-cluster-security-other-'));
    try {
      const other = await signingKey(otherDir);
      assert.notEqual(other.kid, key.kid);
      assert.equal(verifiedClaims(key, signToken(other, 'alice', ['default:read'])), undefined, 'another key');
    } finally {
      await rm(otherDir, { recursive: true, force: true });
    }
    assert.equal(verifiedClaims(key, 'not-a-jwt'), undefined);
  });

  it('writes the admin and worker tokens (0600) with their permissions, and keeps them on the next start', async () => {
    const key = await signingKey(stateDir);
    const first = await ensureTokens(stateDir, key, 'dr');
    for (const holder of ['admin', 'workers'] as const) {
      assert.equal(await modeOf(first.files[holder]), 0o600);
      const claims = verifiedClaims(key, (await readFile(first.files[holder], 'utf8')).trim())!;
      assert.deepEqual({ sub: claims.sub, permissions: claims.permissions }, tokenPermissions(holder, 'dr'), holder);
    }
    assert.deepEqual(tokenPermissions('workers', 'dr').permissions, ['dr:write']);
    assert.deepEqual(tokenPermissions('admin', 'dr').permissions, ['dr:admin']);
    assert.ok(first.notAfter.getTime() - Date.now() > 89 * 86_400_000);

    const workers = await readFile(first.files.workers, 'utf8');
    const second = await ensureTokens(stateDir, key, 'dr');
    assert.equal(await readFile(second.files.workers, 'utf8'), workers, 'kept');
    assert.equal(second.admin, first.admin);
  });

  it('issues a token again when it is for another namespace, unreadable by the key, or near its end', async () => {
    const key = await signingKey(stateDir);
    const before = await ensureTokens(stateDir, key, 'dr');
    const moved = await ensureTokens(stateDir, key, 'dr2');
    assert.deepEqual(verifiedClaims(key, moved.admin)!.permissions, ['dr2:admin']);

    await writeFile(moved.files.admin, 'garbage\n', { mode: 0o600 });
    const repaired = await ensureTokens(stateDir, key, 'dr2');
    assert.ok(verifiedClaims(key, repaired.admin));

    await writeFile(moved.files.admin, `${signToken(key, 'cluster-admin', ['dr2:admin'], 10)}\n`, { mode: 0o600 });
    const renewed = await ensureTokens(stateDir, key, 'dr2');
    assert.ok(verifiedClaims(key, renewed.admin)!.exp * 1000 - Date.now() > 89 * 86_400_000, '10 days left: renewed');
    assert.notEqual(renewed.admin, before.admin);
  });

  it('serves the JWKS on loopback: the public key, nothing else', async () => {
    const key = await signingKey(stateDir);
    const jwks = await serveJwks(await freePort(), key);
    try {
      assert.match(jwks.url, /^http:\/\/127\.0\.0\.1:\d+\/jwks\.json$/);
      const served = (await (await fetch(jwks.url)).json()) as { keys: Record<string, string>[] };
      assert.deepEqual(served, { keys: [key.jwk] });
      assert.equal(served.keys[0]!.d, undefined);
      assert.equal((await fetch(jwks.url.replace('jwks.json', 'jwt-signing.key'))).status, 404);
      assert.equal((await fetch(jwks.url, { method: 'POST' })).status, 404);
    } finally {
      await jwks.close();
    }
  });
});
