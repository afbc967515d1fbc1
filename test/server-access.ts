// How the tests reach the run's Temporal server: plaintext gRPC without credentials (the run's dev server, a plain
// cluster), or a secured cluster (`npm run cluster -- --secure`) named by PF_TEST_SERVER with
//   PF_TEST_SERVER_TLS_CA           the CA that signed the frontend's certificate (the cluster's tls/ca.crt)
//   PF_TEST_SERVER_TLS_SERVER_NAME  optional, the name to check that certificate against (`localhost` for the cluster)
//   PF_TEST_SERVER_JWT_KEY          the cluster's token signing key (auth/jwt-signing.key, mode 0600)
// The cluster's token files grant `<namespace>:admin` and `<namespace>:write` on its one namespace only, and
// Temporal's default authorizer knows no wildcard, while every test runs in namespaces of its own. So the run issues,
// with the cluster's key, the same two tokens (tokenPermissions) for each test namespace: the admin's to create it and
// for the test's clients, the Temporal CLI and the project CLI; the workers' for the workers. Child processes get them
// in their environment, never in argv, and they are never printed.
import { readFileSync } from 'node:fs';
import { z } from 'zod';
import {
  readSigningKey,
  signToken,
  tokenPermissions,
  type SigningKey,
  type TokenHolder,
} from '../scripts/lib/cluster/security';

const unsetIfEmpty = (value: unknown): unknown => (value === '' ? undefined : value);
const file = z.preprocess(unsetIfEmpty, z.string().min(1).optional());

const envSchema = z
  .object({
    PF_TEST_SERVER_TLS_CA: file,
    PF_TEST_SERVER_TLS_SERVER_NAME: z.preprocess(
      unsetIfEmpty,
      z
        .string()
        .regex(/^[A-Za-z0-9.-]+$/, 'a host name the certificate names')
        .optional(),
    ),
    PF_TEST_SERVER_JWT_KEY: file,
  })
  .superRefine((env, ctx) => {
    // A token sent in plaintext is a token given away; a server name checks nothing without the CA that signed it.
    for (const name of ['PF_TEST_SERVER_JWT_KEY', 'PF_TEST_SERVER_TLS_SERVER_NAME'] as const)
      if (env[name] !== undefined && env.PF_TEST_SERVER_TLS_CA === undefined)
        ctx.addIssue({ code: 'custom', path: [name], message: 'needs PF_TEST_SERVER_TLS_CA (the server speaks TLS)' });
  });

/** A secured server: its CA, the name its certificate is checked against, and the key its tokens are signed with. */
export interface SecuredServer {
  caFile: string;
  serverName?: string;
  key?: SigningKey;
}

/** What one connection presents: nothing (plaintext), or TLS with this CA and name, and a token. */
export interface ServerCredentials {
  caFile?: string;
  serverName?: string;
  apiKey?: string;
}

const TOKEN_DAYS = 1;

/** Reads a file a variable names, failing with the variable's name. */
function readNamed<T>(variable: string, read: () => T): T {
  try {
    return read();
  } catch (err) {
    throw new Error(`${variable}: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
  }
}

/**
 * The secured server that the PF_TEST_SERVER_* variables of `env` name, or undefined when none is set; a bad variable
 * or an unreadable file throws, naming the variable.
 */
export function securedServerFrom(env: NodeJS.ProcessEnv): SecuredServer | undefined {
  const parsed = envSchema.safeParse(env);
  if (!parsed.success)
    throw new Error(parsed.error.issues.map((issue) => `${issue.path.join('.')}: ${issue.message}`).join('; '));
  const { PF_TEST_SERVER_TLS_CA: caFile, PF_TEST_SERVER_TLS_SERVER_NAME: serverName } = parsed.data;
  const keyFile = parsed.data.PF_TEST_SERVER_JWT_KEY;
  if (caFile === undefined) return undefined;
  readNamed('PF_TEST_SERVER_TLS_CA', () => readFileSync(caFile));
  const key = keyFile === undefined ? undefined : readNamed('PF_TEST_SERVER_JWT_KEY', () => readSigningKey(keyFile));
  return { caFile, ...(serverName ? { serverName } : {}), ...(key ? { key } : {}) };
}

let secured: { server: SecuredServer | undefined } | undefined;

/** The run's secured server (securedServerFrom the process's environment, read once per process). */
export function securedServer(): SecuredServer | undefined {
  secured ??= { server: securedServerFrom(process.env) };
  return secured.server;
}

/**
 * What a connection of `holder` to `namespace` on a secured server presents: its CA, and a token of that holder's
 * permissions on that namespace, signed with the server's key.
 */
export function credentialsOn(server: SecuredServer, namespace: string, holder: TokenHolder): ServerCredentials {
  const { sub, permissions } = tokenPermissions(holder, namespace);
  return {
    caFile: server.caFile,
    ...(server.serverName ? { serverName: server.serverName } : {}),
    ...(server.key ? { apiKey: signToken(server.key, sub, permissions, TOKEN_DAYS) } : {}),
  };
}

/**
 * What a connection of `holder` to `namespace` on `address` presents: credentialsOn the run's server when it is
 * secured; nothing for a plain one, or for a server other than the run's (a test's own dev server).
 */
export function credentialsFor(address: string, namespace: string, holder: TokenHolder): ServerCredentials {
  const run = address === process.env.PF_TEST_TEMPORAL_ADDRESS ? securedServer() : undefined;
  return run ? credentialsOn(run, namespace, holder) : {};
}

/** Options for the SDK's Connection and NativeConnection with these credentials. */
export function connectionOptions(
  address: string,
  { caFile, serverName, apiKey }: ServerCredentials,
): { address: string; tls?: { serverRootCACertificate: Buffer; serverNameOverride?: string }; apiKey?: string } {
  return {
    address,
    ...(caFile
      ? {
          tls: {
            serverRootCACertificate: readFileSync(caFile),
            ...(serverName ? { serverNameOverride: serverName } : {}),
          },
        }
      : {}),
    ...(apiKey ? { apiKey } : {}),
  };
}

/** The same credentials as the Temporal CLI and the project CLI (envconfig) read them from the environment. */
export function temporalEnv({ caFile, serverName, apiKey }: ServerCredentials): Record<string, string> {
  return {
    ...(caFile ? { TEMPORAL_TLS_SERVER_CA_CERT_PATH: caFile } : {}),
    ...(serverName ? { TEMPORAL_TLS_SERVER_NAME: serverName } : {}),
    ...(apiKey ? { TEMPORAL_API_KEY: apiKey } : {}),
  };
}

/** The same credentials for test/worker-process.ts (PF_WORKER_*), and back. */
export function workerProcessEnv({ caFile, serverName, apiKey }: ServerCredentials): Record<string, string> {
  return {
    ...(caFile ? { PF_WORKER_TLS_CA: caFile } : {}),
    ...(serverName ? { PF_WORKER_TLS_SERVER_NAME: serverName } : {}),
    ...(apiKey ? { PF_WORKER_API_KEY: apiKey } : {}),
  };
}

export const workerProcessCredentials = (env: NodeJS.ProcessEnv): ServerCredentials => ({
  ...(env.PF_WORKER_TLS_CA ? { caFile: env.PF_WORKER_TLS_CA } : {}),
  ...(env.PF_WORKER_TLS_SERVER_NAME ? { serverName: env.PF_WORKER_TLS_SERVER_NAME } : {}),
  ...(env.PF_WORKER_API_KEY ? { apiKey: env.PF_WORKER_API_KEY } : {}),
});
