import assert from 'node:assert/strict';
import { generateKeyPairSync, type KeyObject } from 'node:crypto';
import { chmodSync, mkdtempSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { MockActivityEnvironment } from '@temporalio/testing';
import type { Client } from '@temporalio/client';
import { ApplicationFailure } from '@temporalio/common';
import { createRequestActivities } from '../../src/activities/requests';
import { parseConfiguration } from '../../src/config/load';
import {
  canonicalJson,
  FailureTypes,
  operatorRequestSchema,
  requestToSign,
  SignedOperations,
  validate,
  type NonceClaim,
  type RequestToVerify,
  type SignedOperation,
  type VerifiedRequester,
} from '../../src/contract';
import { checkAccess, permissionFor, Roles, type Role } from '../../src/domain/roles';
import {
  createUserKey,
  keyId,
  loadUserKey,
  publicKeyLine,
  signatureMatches,
  signRequest,
} from '../../src/identity/keys';

const key = (): KeyObject => generateKeyPairSync('ed25519').privateKey;

describe('canonical requests', () => {
  it('writes the same bytes whatever the order of keys, and leaves undefined out as JSON does', () => {
    const a = { b: [1, { z: 'é', a: null }], a: 'x', u: undefined };
    const b = { a: 'x', b: [1, { a: null, z: 'é' }] };
    assert.equal(canonicalJson(a), canonicalJson(b));
    assert.equal(canonicalJson(b), '{"a":"x","b":[1,{"a":null,"z":"é"}]}');
    // Code-unit order, not a locale's: upper case before lower case.
    assert.equal(canonicalJson({ b: 1, B: 2, a: 3 }), '{"B":2,"a":3,"b":1}');
  });

  it('a signature covers the operation, the target and every field but itself', () => {
    const alice = key();
    const line = publicKeyLine(alice);
    const signed = signRequest('undoFailover', 'replica/sql01', { requestedBy: 'alice', reason: 'r' }, alice);
    const matches = (op: SignedOperation, target: string, request: Record<string, unknown>) =>
      signatureMatches(requestToSign(op, target, request), signed.signature, line);
    assert.ok(matches('undoFailover', 'replica/sql01', signed));
    assert.ok(
      matches('undoFailover', 'replica/sql01', { ...signed, requestedBy: 'alice' }),
      'same content, new object',
    );
    assert.equal(matches('undoFailback', 'replica/sql01', signed), false, 'another operation');
    assert.equal(matches('undoFailover', 'replica/web01', signed), false, 'another target');
    for (const field of ['requestedBy', 'reason', 'issuedAt', 'nonce'] as const)
      assert.equal(matches('undoFailover', 'replica/sql01', { ...signed, [field]: `${signed[field]}x` }), false, field);
    assert.equal(
      matches('undoFailover', 'replica/sql01', { ...signed, powerOnSource: false }),
      false,
      'an added field',
    );
    assert.equal(
      signatureMatches(requestToSign('undoFailover', 'replica/sql01', signed), signed.signature, publicKeyLine(key())),
      false,
      'another key',
    );
    assert.match(signed.nonce, /^[A-Za-z0-9_-]{24}$/);
    assert.notEqual(
      signRequest('undoFailover', 'replica/sql01', { requestedBy: 'alice', reason: 'r' }, alice).nonce,
      signed.nonce,
    );
  });

  it('a signature comes with its time and nonce, or none of them comes; each field is named', () => {
    const checked = validate(operatorRequestSchema, {
      requestedBy: 'alice',
      reason: 'r',
      signature: 'A'.repeat(86) + '==',
    });
    assert.equal(checked.ok, false);
    assert.deepEqual(!checked.ok && checked.problems.map((p) => p.path).sort(), ['issuedAt', 'nonce']);
    const bad = validate(operatorRequestSchema, {
      requestedBy: 'alice',
      reason: 'r',
      issuedAt: 'yesterday',
      nonce: 'short',
      signature: 'x',
    });
    assert.deepEqual(!bad.ok && bad.problems.map((p) => p.path).sort(), ['issuedAt', 'nonce', 'signature']);
  });
});

describe('operator keys', () => {
  it('makes a key file only its owner can read, never over an existing one, and refuses one others can read', async () => {
    const file = join(mkdtempSync(join(tmpdir(), 'pf-key-')), 'keys', 'alice.key');
    const made = await createUserKey(file);
    assert.equal(statSync(file).mode & 0o777, 0o600);
    assert.equal(statSync(join(file, '..')).mode & 0o777, 0o700);
    assert.equal(publicKeyLine(loadUserKey(file)), made.publicKey);
    assert.equal(made.keyId, keyId(made.publicKey));
    await assert.rejects(createUserKey(file), /already exists/);
    chmodSync(file, 0o640);
    assert.throws(() => loadUserKey(file), /readable by group or others/);
  });
});

describe('who may ask for what', () => {
  const roleSets: Role[][] = [
    [],
    ...Roles.map((r) => [r]),
    ['BackupOperator', 'RestoreOperator'],
    ['BackupOperator', 'BackupViewer'],
    ['RestoreOperator', 'BackupViewer'],
  ];
  it('every operation against every role set follows the rules', () => {
    for (const op of SignedOperations)
      for (const roles of roleSets) {
        const has = (r: Role) => roles.includes(r);
        const expected = has('BackupAdministrator')
          ? true
          : op === 'replicationJob'
            ? has('BackupOperator')
            : op === 'setProxyOnline'
              ? false
              : has('BackupOperator') && has('RestoreOperator');
        assert.equal(checkAccess('u', roles, permissionFor(op)).allowed, expected, `${op} by [${roles.join(', ')}]`);
      }
    assert.match(JSON.stringify(checkAccess('zed', undefined, 'failover')), /unknown user 'zed'/);
  });
});

describe('verifyRequest', () => {
  const alice = key();
  const bob = key();
  const scheduler = key();
  const configure = (extra = '') =>
    parseConfiguration(
      `
hosts: [{ name: p, role: production, adapter: { type: lab, url: http://127.0.0.1:1 } }, { name: d, role: dr, adapter: { type: lab, url: http://127.0.0.1:1 } }]
proxies: [{ name: p1, slots: 1 }]
jobs: [{ name: j, vms: [vm1], targetHost: d }]
users:
  - { name: alice, roles: [BackupAdministrator], keys: ['${publicKeyLine(alice)}'] }
  - { name: bob, roles: [BackupOperator, RestoreOperator], keys: ['${publicKeyLine(bob)}'] }
  - { name: erin, roles: [BackupViewer], keys: [] }
  - { name: scheduler, roles: [BackupOperator], keys: ['${publicKeyLine(scheduler)}'] }
scheduledRuns: { requestedBy: scheduler, key: /nonexistent }
${extra}`,
    );
  /** The nonce registry is not what these tests are about: a map that remembers claims stands in for it. */
  const registry = () => {
    const claims = new Map<string, string>();
    const client = {
      workflow: {
        executeUpdateWithStart: (_update: unknown, options: { args: [NonceClaim] }) => {
          const [claim] = options.args;
          const earlier = claims.get(`${claim.target}\n${claim.nonce}`);
          if (earlier && earlier !== claim.claimer) return Promise.resolve({ claimed: false, claimedBy: earlier });
          claims.set(`${claim.target}\n${claim.nonce}`, claim.claimer);
          return Promise.resolve({ claimed: true });
        },
      },
    } as unknown as Client;
    return client;
  };
  const verifier = (config = configure()) => {
    const activities = createRequestActivities(() => config, registry());
    const env = new MockActivityEnvironment();
    return (input: RequestToVerify): Promise<VerifiedRequester> =>
      env.run((i: RequestToVerify) => activities.verifyRequest(i), input);
  };
  const now = Date.parse('2026-12-07T12:00:00Z');
  const request = (over: Record<string, unknown> = {}) => ({ requestedBy: 'alice', reason: 'r', ...over });
  const input = (r: Record<string, unknown>, over: Partial<RequestToVerify> = {}): RequestToVerify => ({
    operation: 'undoFailover',
    target: 'replica/vm1',
    request: r,
    receivedAt: now,
    claimer: 'op-1',
    ...over,
  });
  const signedAt = (at: number, user = alice, r = request()) =>
    signRequest('undoFailover', 'replica/vm1', r, user, new Date(at));
  async function refusal(call: Promise<unknown>): Promise<{ type: string; message: string }> {
    const err = await call.then(
      () => assert.fail('accepted'),
      (e: unknown) => e,
    );
    assert.ok(err instanceof ApplicationFailure && err.nonRetryable, String(err));
    return { type: err.type ?? '', message: err.message };
  }

  it('accepts a fresh signature, says by which key, takes its retry, and refuses its replay by another request', async () => {
    const verify = verifier();
    const signed = signedAt(now - 60_000);
    assert.deepEqual(await verify(input(signed)), { user: 'alice', keyId: keyId(publicKeyLine(alice)) });
    assert.deepEqual(await verify(input(signed)), { user: 'alice', keyId: keyId(publicKeyLine(alice)) }, 'a retry');
    const replay = await refusal(verify(input(signed, { claimer: 'op-2' })));
    assert.equal(replay.type, FailureTypes.requestNotVerified);
    assert.match(replay.message, /^nonce: replayed: \S+ was already used for replica\/vm1 \(by op-1\)/);
  });

  it('refuses unsigned, forged, expired and early requests, and unknown or unentitled users, each saying which', async () => {
    const verify = verifier();
    const cases: [string, RequestToVerify, string, RegExp][] = [
      [
        'unsigned',
        input(request()),
        FailureTypes.requestNotVerified,
        /^signature: unsigned: .*failover sign undoFailover --workflow-id replica\/vm1/,
      ],
      [
        "bob's key",
        input(signedAt(now, bob)),
        FailureTypes.requestNotVerified,
        /signed with a key of 'bob', not of 'alice'/,
      ],
      [
        'tampered',
        input({ ...signedAt(now), reason: 'x' }),
        FailureTypes.requestNotVerified,
        /^signature: does not match the request with any key of 'alice'/,
      ],
      [
        'an unknown key',
        input(signedAt(now, key())),
        FailureTypes.requestNotVerified,
        /^signature: does not match the request with any key of 'alice'/,
      ],
      [
        'expired',
        input(signedAt(now - 5 * 60_000 - 1)),
        FailureTypes.requestNotVerified,
        /^issuedAt: expired: .*valid for 5 minutes/,
      ],
      ['early', input(signedAt(now + 61_000)), FailureTypes.requestNotVerified, /^issuedAt: in the future/],
      [
        'unknown user',
        input(signedAt(now, alice, request({ requestedBy: 'zed' }))),
        FailureTypes.accessDenied,
        /unknown user 'zed'/,
      ],
      [
        'viewer',
        input(signRequest('undoFailover', 'replica/vm1', request({ requestedBy: 'erin' }), key(), new Date(now))),
        FailureTypes.requestNotVerified,
        /signature: does not match the request/,
      ],
      [
        'service identity',
        input(signedAt(now, scheduler, request({ requestedBy: 'scheduler' }))),
        FailureTypes.requestNotVerified,
        /service identity of scheduled runs and makes no other request/,
      ],
    ];
    for (const [what, call, type, message] of cases) {
      const refused = await refusal(verify(call));
      assert.equal(refused.type, type, what);
      assert.match(refused.message, message, what);
    }
    // Just inside the validity and the allowed clock skew.
    await verify(input(signedAt(now - 5 * 60_000, alice)));
    await verify(input(signedAt(now + 59_000, alice)));
  });

  it('checks the roles of a proven requester: bob may fail over but not change proxies', async () => {
    const verify = verifier();
    const proxy = { proxy: 'p1', online: false, requestedBy: 'bob' };
    const refused = await refusal(
      verify(
        input(signRequest('setProxyOnline', 'proxy-slots', proxy, bob, new Date(now)), {
          operation: 'setProxyOnline',
          target: 'proxy-slots',
        }),
      ),
    );
    assert.equal(refused.type, FailureTypes.accessDenied);
    assert.match(refused.message, /needs Backup Administrator$/);
    assert.equal((await verify(input(signedAt(now, bob, request({ requestedBy: 'bob' }))))).user, 'bob');
  });

  it('accepts unsigned requests only where the configuration allows them, marked unsigned, roles still checked', async () => {
    const verify = verifier(configure('requests: { allowUnsigned: true }'));
    assert.deepEqual(await verify(input(request())), { user: 'alice', keyId: null });
    assert.equal((await refusal(verify(input(request({ requestedBy: 'erin' }))))).type, FailureTypes.accessDenied);
    // A signature, when there is one, is still checked.
    assert.match(
      (await refusal(verify(input({ ...signedAt(now), reason: 'x' })))).message,
      /signature: does not match the request/,
    );
  });
});
