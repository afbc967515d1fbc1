// The certificates of a site's host API, mutual TLS: one CA per site, a host certificate per host API server (the
// KVM host process of each host, the lab) and a client certificate per caller (the workers, the CLI, tests). A site
// directory holds `ca.crt`, `ca.key` and `<name>.crt`, `<name>.key` per identity; keys are ECDSA P-256, written with
// mode 0600 and never printed.
import 'reflect-metadata'; // @peculiar/x509's dependency injection needs it loaded first
import { createPrivateKey, randomBytes, webcrypto, X509Certificate, type KeyObject } from 'node:crypto';
import { mkdir, readFile } from 'node:fs/promises';
import { readFileSync, statSync } from 'node:fs';
import { isIP } from 'node:net';
import { dirname, join, resolve } from 'node:path';
import * as x509 from '@peculiar/x509';
import { exists, writeFileAtomic } from './persist';

type CryptoKeyPair = webcrypto.CryptoKeyPair;

const ALGORITHM = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' } as const;
const SERVER_AUTH = '1.3.6.1.5.5.7.3.1';
const CLIENT_AUTH = '1.3.6.1.5.5.7.3.2';
const DAY_MS = 24 * 60 * 60 * 1000;
/** Certificates start a little in the past: a peer whose clock is a few minutes behind still accepts them. */
const BACKDATE_MS = 5 * 60 * 1000;
/** A certificate this close to its end is issued again rather than kept. */
const RENEW_BEFORE_MS = 30 * DAY_MS;

export const CA_VALIDITY_DAYS = 3650;
export const LEAF_VALIDITY_DAYS = 730;

/** File names in a site directory are identities: letters, digits, '.', '_', '-', as host names in the configuration. */
export const IDENTITY_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

/** Whether a host certificate may name this: a DNS name (labels of letters, digits, '-', '_') or an IP address. */
export function isSubjectAltName(name: string): boolean {
  return isIP(name) !== 0 || /^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}(\.[A-Za-z0-9_][A-Za-z0-9_-]{0,62})*$/.test(name);
}

/** What a host API server is started with: its own certificate and key, and the CA its clients must come from. */
export interface ServerTlsFiles {
  cert: string;
  key: string;
  clientCa: string;
}

/** What a host API client presents and trusts: the site's CA, its own certificate and key. */
export interface ClientTlsFiles {
  ca: string;
  cert: string;
  key: string;
}

/** One certificate of a site directory, as `failover certs create` reports it (never the key itself). */
export interface SiteCertificate {
  name: string;
  kind: 'ca' | LeafKind;
  cert: string;
  key: string;
  /** SHA-256 fingerprint of the certificate. */
  fingerprint: string;
  /** The subjectAltName entries of a host or peer certificate. */
  names: string[];
  notAfter: Date;
  /** Whether this call made it (false: a valid one was there and was kept). */
  made: boolean;
}

export interface IssueOptions {
  /** Days from now until it expires (default: 3650 for the CA, 730 for the others). */
  validityDays?: number;
  /** Issue it again even if the one there is valid. */
  reissue?: boolean;
}

export const serverTlsFiles = (dir: string, name: string): ServerTlsFiles => ({
  cert: join(dir, `${name}.crt`),
  key: join(dir, `${name}.key`),
  clientCa: join(dir, 'ca.crt'),
});

export const clientTlsFiles = (dir: string, name: string): ClientTlsFiles => ({
  ca: join(dir, 'ca.crt'),
  cert: join(dir, `${name}.crt`),
  key: join(dir, `${name}.key`),
});

/**
 * Reads a private key file, refusing one that group or others may read: a key someone else can read is a key
 * someone else can present.
 */
export function readPrivateKeyFile(path: string): Buffer {
  const mode = statSync(path).mode & 0o777;
  if ((mode & 0o077) !== 0)
    throw new Error(
      `private key ${path} is readable by group or others (mode ${mode.toString(8).padStart(4, '0')}): ` +
        `it must be 0600 or stricter (chmod 600 ${path})`,
    );
  return readFileSync(path);
}

/** The site's CA: the one in `dir` if it is valid, or a new one when there is none (or `reissue`). */
export async function ensureCa(dir: string, options: IssueOptions = {}): Promise<SiteCertificate> {
  return (await loadCa(dir, options)).entry;
}

/**
 * A host API server's certificate, signed by the site's CA: serverAuth only, its subjectAltName the host names it
 * serves (a KVM host process: its host; the lab: every host of its estate and `lab`) and any extra DNS names or IP
 * addresses. Kept if the one there is valid for exactly these names.
 */
export function ensureHostCertificate(
  dir: string,
  name: string,
  names: readonly string[],
  options: IssueOptions = {},
): Promise<SiteCertificate> {
  if (names.length === 0) throw new Error(`host certificate ${name}: it must name at least one host`);
  for (const n of names)
    if (!isSubjectAltName(n))
      throw new Error(`host certificate ${name}: '${n}' is neither a host name nor an IP address`);
  return ensureLeaf(dir, name, { kind: 'host', names: [...new Set(names)] }, options);
}

/** A caller's certificate, signed by the site's CA: clientAuth only, its common name `name`. */
export function ensureClientCertificate(
  dir: string,
  name: string,
  options: IssueOptions = {},
): Promise<SiteCertificate> {
  return ensureLeaf(dir, name, { kind: 'client', names: [] }, options);
}

/**
 * A peer's certificate, signed by the site's CA: serverAuth and clientAuth, its subjectAltName `names`, for a member
 * of a cluster that serves its peers and calls them with the same certificate (a Temporal server's internode TLS).
 */
export function ensurePeerCertificate(
  dir: string,
  name: string,
  names: readonly string[],
  options: IssueOptions = {},
): Promise<SiteCertificate> {
  if (names.length === 0) throw new Error(`peer certificate ${name}: it must name at least one host`);
  for (const n of names)
    if (!isSubjectAltName(n))
      throw new Error(`peer certificate ${name}: '${n}' is neither a host name nor an IP address`);
  return ensureLeaf(dir, name, { kind: 'peer', names: [...new Set(names)] }, options);
}

type LeafKind = 'host' | 'client' | 'peer';
const USAGES: Record<LeafKind, string[]> = {
  host: [SERVER_AUTH],
  client: [CLIENT_AUTH],
  peer: [SERVER_AUTH, CLIENT_AUTH],
};

interface LoadedCa {
  entry: SiteCertificate;
  cert: X509Certificate;
  /** Its subject, as @peculiar/x509 writes names: a leaf's issuer. */
  subject: string;
  keys: CryptoKeyPair;
}

async function loadCa(dir: string, options: IssueOptions): Promise<LoadedCa> {
  const files = { cert: join(dir, 'ca.crt'), key: join(dir, 'ca.key') };
  if (!options.reissue && (await exists(files.cert))) {
    const cert = new X509Certificate(await readFile(files.cert));
    const key = createPrivateKey(readPrivateKeyFile(files.key));
    // A CA made again would invalidate every certificate of the site: one that is unusable is reported, not replaced.
    const problem = !cert.ca
      ? 'is not a CA certificate'
      : !cert.checkPrivateKey(key)
        ? `does not belong to the key ${files.key}`
        : new Date(cert.validTo).getTime() < Date.now()
          ? `expired on ${cert.validTo}`
          : undefined;
    if (problem)
      throw new Error(
        `${files.cert} ${problem}: make the site a new CA and its certificates again (failover certs create --new-ca ...)`,
      );
    return {
      entry: entryOf('ca', 'ca', files, cert, false),
      cert,
      subject: new x509.X509Certificate(cert.raw).subject,
      keys: await importKeys(key, cert),
    };
  }
  validNameOf('ca');
  const keys = await newKeys();
  const now = Date.now();
  const made = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: serial(),
    name: `CN=planned-failover host API CA ${randomBytes(4).toString('hex')}`,
    notBefore: new Date(now - BACKDATE_MS),
    notAfter: new Date(now + (options.validityDays ?? CA_VALIDITY_DAYS) * DAY_MS),
    keys,
    signingAlgorithm: ALGORITHM,
    extensions: [
      new x509.BasicConstraintsExtension(true, 0, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
    ],
  });
  // The site directory alone is private: directories above it (.data, say) keep the usual mode.
  await mkdir(dirname(resolve(dir)), { recursive: true });
  await mkdir(dir, { recursive: true, mode: 0o700 });
  await writeKey(files.key, keys.privateKey);
  await writeFileAtomic(files.cert, made.toString('pem'));
  const cert = new X509Certificate(made.toString('pem'));
  return { entry: entryOf('ca', 'ca', files, cert, true), cert, subject: made.subject, keys };
}

async function ensureLeaf(
  dir: string,
  name: string,
  want: { kind: LeafKind; names: string[] },
  options: IssueOptions,
): Promise<SiteCertificate> {
  validNameOf(name);
  const ca = await loadCa(dir, {});
  const files = { cert: join(dir, `${name}.crt`), key: join(dir, `${name}.key`) };
  if (!options.reissue && (await exists(files.cert)) && (await exists(files.key))) {
    const cert = new X509Certificate(await readFile(files.cert));
    if (leafFits(cert, createPrivateKey(readPrivateKeyFile(files.key)), ca.cert, want))
      return entryOf(name, want.kind, files, cert, false);
  }
  const keys = await newKeys();
  const now = Date.now();
  const made = await x509.X509CertificateGenerator.create({
    serialNumber: serial(),
    subject: `CN=${name}`,
    issuer: ca.subject,
    notBefore: new Date(now - BACKDATE_MS),
    notAfter: new Date(now + (options.validityDays ?? LEAF_VALIDITY_DAYS) * DAY_MS),
    publicKey: keys.publicKey,
    signingKey: ca.keys.privateKey,
    signingAlgorithm: ALGORITHM,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension(USAGES[want.kind], false),
      await x509.AuthorityKeyIdentifierExtension.create(ca.keys.publicKey),
      ...(want.kind !== 'client'
        ? [
            new x509.SubjectAlternativeNameExtension(
              want.names.map((n) => ({ type: isIP(n) === 0 ? ('dns' as const) : ('ip' as const), value: n })),
              false,
            ),
          ]
        : []),
    ],
  });
  await writeKey(files.key, keys.privateKey);
  await writeFileAtomic(files.cert, made.toString('pem'));
  return entryOf(name, want.kind, files, new X509Certificate(made.toString('pem')), true);
}

/** Whether a certificate there may be kept: issued by this CA for this key, this use and these names, not ending soon. */
function leafFits(
  cert: X509Certificate,
  key: KeyObject,
  ca: X509Certificate,
  want: { kind: LeafKind; names: string[] },
): boolean {
  const names = sanEntries(cert);
  return (
    cert.checkIssued(ca) &&
    cert.verify(ca.publicKey) &&
    cert.checkPrivateKey(key) &&
    new Date(cert.validTo).getTime() - Date.now() > RENEW_BEFORE_MS &&
    JSON.stringify(cert.keyUsage ?? []) === JSON.stringify(USAGES[want.kind]) &&
    names.length === want.names.length &&
    want.names.every((n) => names.includes(n))
  );
}

/** The subjectAltName entries of a certificate, as names and addresses (`DNS:a, IP Address:1.2.3.4` → a, 1.2.3.4). */
export function sanEntries(cert: {
  subjectaltname?: string | undefined;
  subjectAltName?: string | undefined;
}): string[] {
  const text = cert.subjectaltname ?? cert.subjectAltName ?? '';
  return text
    .split(', ')
    .filter(Boolean)
    .map((entry) => entry.replace(/^(DNS|IP Address):/, ''));
}

function entryOf(
  name: string,
  kind: SiteCertificate['kind'],
  files: { cert: string; key: string },
  cert: X509Certificate,
  made: boolean,
): SiteCertificate {
  return {
    name,
    kind,
    ...files,
    fingerprint: cert.fingerprint256,
    names: kind === 'host' || kind === 'peer' ? sanEntries(cert) : [],
    notAfter: new Date(cert.validTo),
    made,
  };
}

function validNameOf(name: string): void {
  if (!IDENTITY_NAME.test(name))
    throw new Error(`'${name}' cannot name a certificate: letters, digits, '.', '_' or '-' (at most 64)`);
}

async function newKeys(): Promise<CryptoKeyPair> {
  return webcrypto.subtle.generateKey(ALGORITHM, true, ['sign', 'verify']);
}

/** The CA's key pair as WebCrypto keys, for signing with @peculiar/x509. */
async function importKeys(key: KeyObject, cert: X509Certificate): Promise<CryptoKeyPair> {
  const pkcs8 = key.export({ type: 'pkcs8', format: 'der' });
  const spki = cert.publicKey.export({ type: 'spki', format: 'der' });
  return {
    privateKey: await webcrypto.subtle.importKey('pkcs8', pkcs8, ALGORITHM, false, ['sign']),
    publicKey: await webcrypto.subtle.importKey('spki', spki, ALGORITHM, true, ['verify']),
  };
}

/** A private key as PEM, created with mode 0600 and renamed into place (never another mode, not even briefly). */
async function writeKey(path: string, key: webcrypto.CryptoKey): Promise<void> {
  const pkcs8 = Buffer.from(await webcrypto.subtle.exportKey('pkcs8', key));
  const pem = createPrivateKey({ key: pkcs8, format: 'der', type: 'pkcs8' }).export({ type: 'pkcs8', format: 'pem' });
  await writeFileAtomic(path, pem.toString(), 0o600);
}

/** A random positive serial number (RFC 5280: unique per CA, at most 20 bytes). */
function serial(): string {
  const bytes = randomBytes(16);
  bytes[0] = bytes[0]! & 0x7f;
  return bytes.toString('hex');
}

/**
 * The demo's site directory, relative to the project (npm run demo, and npm run lab and npm run worker by hand with
 * their defaults, make what it lacks); config/planned-failover.yaml and config/planned-failover-kvm.yaml name it.
 */
export const DEMO_SITE_DIR = '.data/certs';
/** The client certificate of the demo's workers and CLI. */
export const DEMO_CLIENT = 'workers';

/**
 * Makes what a site directory lacks: its CA, a host certificate per host API server (file name → the names it
 * serves) and the client certificates; keeps what is valid.
 */
export async function ensureSite(
  dir: string,
  hosts: Readonly<Record<string, readonly string[]>>,
  clients: readonly string[],
): Promise<SiteCertificate[]> {
  const site = [await ensureCa(dir)];
  for (const [name, names] of Object.entries(hosts)) site.push(await ensureHostCertificate(dir, name, names));
  for (const name of clients) site.push(await ensureClientCertificate(dir, name));
  return site;
}
