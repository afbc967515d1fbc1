// The test run's site for the host API's mutual TLS: test/run.ts (or the chaos suite) makes it once, with its CA and
// the tests' client certificate (PF_TEST_CERTS names it); each test process adds the host certificates its servers
// need. And raw requests to a host API server, with the certificate a test chooses (or none).
import { readFileSync } from 'node:fs';
import https from 'node:https';
import { labServerNames, type EstateInput } from '../lab/estate';
import {
  clientTlsFiles,
  ensureHostCertificate,
  ensureSite,
  serverTlsFiles,
  type ClientTlsFiles,
  type ServerTlsFiles,
} from '../src/host-api/certificates';
import { HostApiHypervisor, LabControl, type HostApiClientOptions } from '../src/hypervisor/host-api-adapter';

/** The client certificate the tests (and the workers they start) present. */
export const TEST_CLIENT = 'tests';

/** Makes the run's site in `dir` and names it to this process and every process it starts. */
export async function makeTestSite(dir: string): Promise<void> {
  await ensureSite(dir, {}, [TEST_CLIENT]);
  process.env.PF_TEST_CERTS = dir;
}

export function testSiteDir(): string {
  const dir = process.env.PF_TEST_CERTS;
  if (!dir) throw new Error('PF_TEST_CERTS is not set: run tests through `npm test -- <file>`.');
  return dir;
}

export const testClientTls = (): ClientTlsFiles => clientTlsFiles(testSiteDir(), TEST_CLIENT);

const issued = new Map<string, Promise<ServerTlsFiles>>();

/**
 * A host API server's TLS files for these names, signed by the run's CA; made once per process, under a name of this
 * process's own (test files run in processes side by side on one site directory).
 */
export function testServerTls(names: readonly string[]): Promise<ServerTlsFiles> {
  const key = [...names].sort().join(',');
  let tls = issued.get(key);
  if (!tls) {
    const name = `server-${process.pid}-${issued.size}`;
    tls = ensureHostCertificate(testSiteDir(), name, names).then(() => serverTlsFiles(testSiteDir(), name));
    issued.set(key, tls);
  }
  return tls;
}

/** The lab's TLS files for an estate: every host it plays and `lab`. */
export const labServerTls = (estate: EstateInput): Promise<ServerTlsFiles> => testServerTls(labServerNames(estate));

/** The port adapter for a lab (or anything serving as one), with the tests' client certificate. */
export const labPort = (url: string, options: Partial<HostApiClientOptions> = {}): HostApiHypervisor =>
  new HostApiHypervisor({ url, tls: testClientTls(), serverName: 'lab', ...options });

export const labControl = (url: string): LabControl => new LabControl({ url, tls: testClientTls(), serverName: 'lab' });

/** A KVM host process's port adapter: its certificate must name `host`. */
export const kvmPort = (url: string, host: string): HostApiHypervisor =>
  new HostApiHypervisor({ url, tls: testClientTls(), serverName: host });

export interface RawAnswer {
  status: number;
  text: string;
  json<T>(): T;
}

/**
 * One request as it is sent, outside the adapter: `tls` says what the client trusts and presents (default: the
 * tests' client certificate; without `cert` and `key`, no certificate at all), `servername` the name it asks for.
 * Rejects with the connection's error when there is no HTTP answer.
 */
export function rawRequest(
  url: string,
  init: {
    method?: string;
    body?: string | Buffer;
    headers?: Record<string, string>;
    tls?: Partial<ClientTlsFiles>;
  } = {},
): Promise<RawAnswer> {
  const tls = init.tls ?? testClientTls();
  const read = (path: string | undefined) => (path === undefined ? undefined : readFileSync(path));
  return new Promise((resolve, reject) => {
    const req = https.request(url, {
      method: init.method ?? 'GET',
      headers: init.headers ?? {},
      agent: false,
      ca: read(tls.ca ?? testClientTls().ca),
      cert: read(tls.cert),
      key: read(tls.key),
      // The server's identity is not what these requests test: any certificate of the CA will do.
      checkServerIdentity: () => undefined,
    });
    req.on('error', reject);
    req.on('response', (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('error', reject);
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        resolve({ status: res.statusCode ?? 0, text, json: <T>() => JSON.parse(text) as T });
      });
    });
    req.end(init.body);
  });
}
