// What `npm run cluster -- --secure` adds to the cluster: its certificates (a CA of its own, the frontend's, the
// internode one), the key that signs its JWTs and the JWKS that hands the server the public half, served on loopback
// by the cluster command itself, and the tokens of its callers. Everything secret is a file of mode 0600 under
// <stateDir>/tls and <stateDir>/auth, made on the first secure start and kept after.
import {
  createHash,
  createPrivateKey,
  createPublicKey,
  generateKeyPairSync,
  sign,
  verify,
  type KeyObject,
} from 'node:crypto';
import { mkdir, readFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import { join } from 'node:path';
import {
  ensureCa,
  ensureHostCertificate,
  ensurePeerCertificate,
  readPrivateKeyFile,
} from '../../../src/host-api/certificates';
import { exists, writeFileAtomic } from '../../../src/host-api/persist';

const DAY_MS = 24 * 60 * 60 * 1000;
/** Tokens last 90 days; a start issues one again once less than 30 are left, so a running cluster's never lapse. */
const TOKEN_VALIDITY_DAYS = 90;
const TOKEN_RENEW_BEFORE_DAYS = 30;

/** The permissions claim of the tokens (the default claim mapper's own default name). */
export const PERMISSIONS_CLAIM = 'permissions';

/** The name the server's services present to each other, and check (internode mutual TLS). */
export const INTERNODE_NAME = 'temporal-internode';

/** The cluster's TLS files (PEM; the keys 0600). */
export interface ClusterTls {
  /** The cluster's own CA: what clients trust (TEMPORAL_TLS_SERVER_CA_CERT_PATH). */
  ca: string;
  frontend: { cert: string; key: string };
  /** Served and presented by every server service to the others (mutual TLS). */
  internode: { cert: string; key: string };
}

/** Makes what the cluster's TLS directory lacks, and keeps what is valid. */
export async function ensureClusterTls(stateDir: string): Promise<ClusterTls> {
  const dir = join(stateDir, 'tls');
  const ca = await ensureCa(dir);
  // Clients reach the frontend at 127.0.0.1 and check that name; the services check each other's by INTERNODE_NAME.
  const frontend = await ensureHostCertificate(dir, 'frontend', ['127.0.0.1', 'localhost']);
  const internode = await ensurePeerCertificate(dir, 'internode', [INTERNODE_NAME]);
  return {
    ca: ca.cert,
    frontend: { cert: frontend.cert, key: frontend.key },
    internode: { cert: internode.cert, key: internode.key },
  };
}

/** <stateDir>/auth: the signing key and the tokens, for the cluster's owner alone; there once a cluster is secured. */
export const authDirOf = (stateDir: string): string => join(stateDir, 'auth');

async function authDir(stateDir: string): Promise<string> {
  const dir = authDirOf(stateDir);
  await mkdir(dir, { recursive: true, mode: 0o700 });
  return dir;
}

/** The ES256 key that signs the cluster's tokens, and its public half as the server's JWKS has it. */
export interface SigningKey {
  privateKey: KeyObject;
  /** RFC 7638 thumbprint of the public key: tokens name it, the server finds the key by it. */
  kid: string;
  jwk: Record<string, string>;
}

/** The signing key in <stateDir>/auth/jwt-signing.key, made (mode 0600) when missing. */
export async function signingKey(stateDir: string): Promise<SigningKey> {
  const file = join(await authDir(stateDir), 'jwt-signing.key');
  if (await exists(file)) return readSigningKey(file);
  const privateKey = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey;
  await writeFileAtomic(file, privateKey.export({ type: 'pkcs8', format: 'pem' }).toString(), 0o600);
  return signingKeyOf(privateKey);
}

/** A cluster's signing key from its file (mode 0600), as it is: nothing is made. */
export function readSigningKey(file: string): SigningKey {
  const privateKey = createPrivateKey(readPrivateKeyFile(file));
  if (privateKey.asymmetricKeyType !== 'ec' || privateKey.asymmetricKeyDetails?.namedCurve !== 'prime256v1')
    throw new Error(`${file} is not an ECDSA P-256 key (ES256): move it away, and a new one is made`);
  return signingKeyOf(privateKey);
}

function signingKeyOf(privateKey: KeyObject): SigningKey {
  const { crv, kty, x, y } = createPublicKey(privateKey).export({ format: 'jwk' }) as Record<string, string>;
  // The thumbprint hashes exactly these members, in this order (RFC 7638 section 3.2).
  const kid = createHash('sha256').update(JSON.stringify({ crv, kty, x, y })).digest('base64url');
  return { privateKey, kid, jwk: { kty: kty!, crv: crv!, x: x!, y: y!, kid, alg: 'ES256', use: 'sig' } };
}

/** What the cluster's tokens claim: who, and Temporal permissions such as `default:admin`. */
export interface TokenClaims {
  sub: string;
  [PERMISSIONS_CLAIM]: string[];
  iat: number;
  exp: number;
}

const base64url = (value: object): string => Buffer.from(JSON.stringify(value)).toString('base64url');

/** A JWT (ES256) for `sub` with these permissions, valid for `days`. */
export function signToken(key: SigningKey, sub: string, permissions: string[], days = TOKEN_VALIDITY_DAYS): string {
  const iat = Math.floor(Date.now() / 1000);
  const claims: TokenClaims = { sub, [PERMISSIONS_CLAIM]: permissions, iat, exp: iat + days * 86_400 };
  const input = `${base64url({ alg: 'ES256', typ: 'JWT', kid: key.kid })}.${base64url(claims)}`;
  const signature = sign('sha256', Buffer.from(input), { key: key.privateKey, dsaEncoding: 'ieee-p1363' });
  return `${input}.${signature.toString('base64url')}`;
}

/** A token's claims if this key signed it, or undefined (another key, tampered, not a JWT). */
export function verifiedClaims(key: SigningKey, token: string): TokenClaims | undefined {
  const [header, payload, signature] = token.split('.');
  if (header === undefined || payload === undefined || signature === undefined) return undefined;
  try {
    const { kid } = JSON.parse(Buffer.from(header, 'base64url').toString()) as { kid?: unknown };
    const signed = verify(
      'sha256',
      Buffer.from(`${header}.${payload}`),
      { key: createPublicKey(key.privateKey), dsaEncoding: 'ieee-p1363' },
      Buffer.from(signature, 'base64url'),
    );
    return kid === key.kid && signed
      ? (JSON.parse(Buffer.from(payload, 'base64url').toString()) as TokenClaims)
      : undefined;
  } catch {
    return undefined;
  }
}

/** The callers a secure cluster makes tokens for. */
export type TokenHolder = 'admin' | 'workers';

/**
 * What each holder may do in the cluster's namespace, with Temporal's default authorizer (v1.29.1,
 * common/authorization/default_authorizer.go): it compares the role bits of a claim with the role an API needs, as
 * numbers (worker 1 < read 2 < write 4 < admin 8). Polling and completing tasks, heartbeats, and the client calls of
 * the workers' activities (signals, updates, starts of the entities, schedules) need write; queries and lists read.
 * `<namespace>:worker` alone (1) passes none of them, so write is the least a worker can run with. Admin adds the
 * namespace's own settings and search attributes (`temporal operator ...`).
 */
export function tokenPermissions(holder: TokenHolder, namespace: string): { sub: string; permissions: string[] } {
  return holder === 'admin'
    ? { sub: 'cluster-admin', permissions: [`${namespace}:admin`] }
    : { sub: 'planned-failover-workers', permissions: [`${namespace}:write`] };
}

export interface ClusterTokens {
  files: Record<TokenHolder, string>;
  /** When the first of them expires. */
  notAfter: Date;
  /** The admin's token, for the cluster command's own calls (namespace and search attributes). */
  admin: string;
}

/**
 * The token files in <stateDir>/auth (mode 0600): kept while this key signed them for the same permissions and they
 * have a month left, issued again otherwise.
 */
export async function ensureTokens(stateDir: string, key: SigningKey, namespace: string): Promise<ClusterTokens> {
  const dir = await authDir(stateDir);
  const files = { admin: join(dir, 'admin.jwt'), workers: join(dir, 'workers.jwt') };
  const tokens = {} as Record<TokenHolder, string>;
  let notAfter = Infinity;
  for (const holder of ['admin', 'workers'] as const) {
    const want = tokenPermissions(holder, namespace);
    const file = files[holder];
    let token = (await exists(file)) ? (await readFile(file, 'utf8')).trim() : '';
    const claims = verifiedClaims(key, token);
    const keep =
      claims?.sub === want.sub &&
      JSON.stringify(claims[PERMISSIONS_CLAIM]) === JSON.stringify(want.permissions) &&
      claims.exp * 1000 - Date.now() > TOKEN_RENEW_BEFORE_DAYS * DAY_MS;
    if (!keep) {
      token = signToken(key, want.sub, want.permissions);
      await writeFileAtomic(file, `${token}\n`, 0o600);
    }
    tokens[holder] = token;
    notAfter = Math.min(notAfter, verifiedClaims(key, token)!.exp * 1000);
  }
  return { files, notAfter: new Date(notAfter), admin: tokens.admin };
}

/** Serves the JWKS (the public key only) at http://127.0.0.1:<port>/jwks.json until closed. */
export async function serveJwks(port: number, key: SigningKey): Promise<{ url: string; close(): Promise<void> }> {
  const body = JSON.stringify({ keys: [key.jwk] });
  const server = createServer((request, response) => {
    const found = request.method === 'GET' && request.url === '/jwks.json';
    response.writeHead(found ? 200 : 404, { 'content-type': 'application/json' });
    response.end(found ? body : '{}');
  });
  await new Promise<void>((resolveListen, rejectListen) => {
    server.once('error', rejectListen);
    server.listen(port, '127.0.0.1', () => resolveListen());
  });
  return {
    url: `http://127.0.0.1:${port}/jwks.json`,
    close: () =>
      new Promise<void>((resolveClose) => {
        server.close(() => resolveClose());
        server.closeAllConnections();
      }),
  };
}
