// The test run's operator keys: test/run.ts (or the chaos suite) makes one key per test user once, in a per-user
// configuration directory of the run's own (PF_TEST_KEYS, used as XDG_CONFIG_HOME), so that test processes, the
// project CLI they run and the workers they start agree on them. The test configuration lists their public keys.
import type { KeyObject } from 'node:crypto';
import { Client, type WorkflowClientInterceptor } from '@temporalio/client';
import { createUserKey, keysIn, publicKeyLine, userKeyDir, userKeyFile } from '../src/identity/keys';
import { signingClient, signingInterceptor } from '../src/identity/signing';
import { exists } from '../src/host-api/persist';

/** Every user of the test configuration; `scheduler` is the service identity of scheduled runs. */
export const TEST_USERS = ['alice', 'bob', 'carol', 'dave', 'erin', 'mallory', 'scheduler'] as const;
export type TestUser = (typeof TEST_USERS)[number];

/**
 * Makes the run's keys in `dir` and names it to this process and every process it starts, also as their
 * XDG_CONFIG_HOME: the project CLI a test runs signs with the test users' keys, never with the keys of whoever runs
 * the tests (and the Temporal CLI reads no profile of theirs).
 */
export async function makeTestKeys(dir: string): Promise<void> {
  const keyDir = userKeyDir({ XDG_CONFIG_HOME: dir });
  for (const user of TEST_USERS)
    if (!(await exists(userKeyFile(user, keyDir)))) await createUserKey(userKeyFile(user, keyDir));
  process.env.PF_TEST_KEYS = dir;
  process.env.XDG_CONFIG_HOME = dir;
}

export function testKeysHome(): string {
  const dir = process.env.PF_TEST_KEYS;
  if (!dir) throw new Error('PF_TEST_KEYS is not set: run tests through `npm test -- <file>`.');
  return dir;
}

const loaded = new Map<string, KeyObject>();

/** A test user's private key. */
export function testKey(user: string): KeyObject {
  let key = loaded.get(user);
  if (!key) {
    key = keysIn(userKeyDir({ XDG_CONFIG_HOME: testKeysHome() }))(user);
    loaded.set(user, key);
  }
  return key;
}

export const testPublicKey = (user: TestUser): string => publicKeyLine(testKey(user));

export const testKeyFile = (user: TestUser): string =>
  userKeyFile(user, userKeyDir({ XDG_CONFIG_HOME: testKeysHome() }));

/** A test user's key; none for a name that is no test user's (its request goes unsigned, to be refused). */
const testKeyIfAny = (user: string): KeyObject | undefined =>
  (TEST_USERS as readonly string[]).includes(user) ? testKey(user) : undefined;

/** Signs every request a client sends with its requester's test key, as the project CLI does with a user's own. */
export const testSigner = (): WorkflowClientInterceptor => signingInterceptor(testKeyIfAny);

/** The same connection and namespace, signing with the test users' keys. */
export const signingTestClient = (client: Client): Client => signingClient(client, testKeyIfAny);

/** The same connection and namespace, sending requests as the test gives them. */
export const unsignedClient = (client: Client): Client =>
  new Client({ connection: client.connection, namespace: client.options.namespace });
