import {
  createHash,
  createPrivateKey,
  createPublicKey,
  generateKeyPairSync,
  randomBytes,
  sign,
  verify,
} from 'node:crypto';
import type { KeyObject } from 'node:crypto';
import { mkdir } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { PUBLIC_KEY_LINE, requestToSign, type SignedOperation } from '../contract/requests';
import { readPrivateKeyFile } from '../host-api/certificates';
import { exists, writeFileAtomic } from '../host-api/persist';

// Operator keys: Ed25519 pairs whose public half is a line in the configuration (`ed25519:<base64url>`) and whose
// private half stays in a file only its user can read.

const LINE_PREFIX = 'ed25519:';

/** Where a user's private keys live: the per-user configuration directory, as XDG has it. */
export function userKeyDir(env: NodeJS.ProcessEnv = process.env): string {
  return join(env.XDG_CONFIG_HOME || join(homedir(), '.config'), 'planned-failover', 'keys');
}

export const userKeyFile = (user: string, dir = userKeyDir()): string => join(dir, `${user}.key`);

/** The configuration's line for a public key. */
export function publicKeyLine(key: KeyObject): string {
  const jwk = (key.type === 'private' ? createPublicKey(key) : key).export({ format: 'jwk' });
  return `${LINE_PREFIX}${jwk.x}`;
}

export function publicKeyOf(line: string): KeyObject {
  if (!PUBLIC_KEY_LINE.test(line)) throw new Error(`not an Ed25519 public key line: ${line}`);
  return createPublicKey({ key: { kty: 'OKP', crv: 'Ed25519', x: line.slice(LINE_PREFIX.length) }, format: 'jwk' });
}

/** A key's short fingerprint, as histories record which key signed: SHA256 of the raw key, base64url, 16 characters. */
export function keyId(line: string): string {
  const raw = Buffer.from(line.slice(LINE_PREFIX.length), 'base64url');
  return `SHA256:${createHash('sha256').update(raw).digest('base64url').slice(0, 16)}`;
}

export interface CreatedKey {
  file: string;
  publicKey: string;
  keyId: string;
}

/**
 * Makes a user's key pair: the private key in `file` (mode 0600, its directory 0700), never over an existing one
 * (a second `keys create` would lock its user out of every configuration that lists the first).
 */
export async function createUserKey(file: string): Promise<CreatedKey> {
  if (await exists(file)) throw new Error(`${file} already exists: remove it first to make a new key`);
  await mkdir(join(file, '..'), { recursive: true, mode: 0o700 });
  const { privateKey } = generateKeyPairSync('ed25519');
  await writeFileAtomic(file, privateKey.export({ type: 'pkcs8', format: 'pem' }).toString(), 0o600);
  const line = publicKeyLine(privateKey);
  return { file, publicKey: line, keyId: keyId(line) };
}

/** Finds users' keys in a key directory (the per-user one by default), saying how to make one that is missing. */
export function keysIn(dir = userKeyDir()): (user: string) => KeyObject {
  return (user) => {
    const file = userKeyFile(user, dir);
    try {
      return loadUserKey(file);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      throw new Error(
        `no key of '${user}' in ${dir}: make one with \`failover keys create --user ${user}\` and add the line it prints to ${user}'s keys in the configuration`,
        { cause: err },
      );
    }
  };
}

/** A user's private key, refused when group or others may read its file. */
export function loadUserKey(file: string): KeyObject {
  const key = createPrivateKey(readPrivateKeyFile(file));
  if (key.asymmetricKeyType !== 'ed25519') throw new Error(`${file} is not an Ed25519 private key`);
  return key;
}

/** The request with its issue time, a fresh nonce and the signature over everything else added. */
export function signRequest<R extends Record<string, unknown>>(
  operation: SignedOperation,
  target: string,
  request: R,
  key: KeyObject,
  now = new Date(),
): R & { issuedAt: string; nonce: string; signature: string } {
  const { signature: _old, ...unsigned } = request;
  const withTime = { ...unsigned, issuedAt: now.toISOString(), nonce: randomBytes(18).toString('base64url') };
  const signature = sign(null, Buffer.from(requestToSign(operation, target, withTime)), key).toString('base64');
  return { ...(withTime as unknown as R & { issuedAt: string; nonce: string }), signature };
}

/** Whether `signature` (base64) is the key's over the message. */
export function signatureMatches(message: string, signature: string, line: string): boolean {
  return verify(null, Buffer.from(message), publicKeyOf(line), Buffer.from(signature, 'base64'));
}
