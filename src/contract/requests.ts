import { defineUpdate } from '@temporalio/workflow';
import { z } from 'zod';

// Signed operator requests: a name typed into a payload proves nothing, so every request that changes anything
// carries the time it was signed, a one-time nonce and its requester's Ed25519 signature over the canonical request.

/** The fields a signature adds to a request; all three or none (an unsigned request, allowed only where configured). */
export const signatureFields = {
  issuedAt: z.iso
    .datetime({ offset: true, error: 'must be the ISO 8601 time the request was signed, like 2026-12-07T10:00:00Z' })
    .optional(),
  nonce: z
    .string({ error: 'must be a string' })
    .regex(/^[A-Za-z0-9_-]{16,128}$/, { error: 'must be 16 to 128 letters, digits, dashes or underscores' })
    .optional(),
  signature: z
    .string({ error: 'must be a string' })
    .regex(/^[A-Za-z0-9+/]{86}==$/, { error: 'must be an Ed25519 signature in base64 (88 characters)' })
    .optional(),
};

/** A user's public key as the configuration lists it, the way `failover keys create` prints it. */
export const PUBLIC_KEY_LINE = /^ed25519:[A-Za-z0-9_-]{43}$/;

export const SIGNATURE_FIELDS = ['issuedAt', 'nonce', 'signature'] as const;

/** Refinement for a request schema: a signature comes with its time and nonce, or none of them comes. */
export function signatureComplete(
  request: Partial<Record<(typeof SIGNATURE_FIELDS)[number], unknown>>,
  ctx: z.RefinementCtx,
) {
  const present = SIGNATURE_FIELDS.filter((f) => request[f] !== undefined);
  if (present.length === 0 || present.length === SIGNATURE_FIELDS.length) return;
  for (const field of SIGNATURE_FIELDS.filter((f) => request[f] === undefined))
    ctx.addIssue({ code: 'custom', path: [field], message: `is required with ${present.join(' and ')}` });
}

/** Whether a request carries a signature at all (its fields are checked by the request's schema). */
export const isSigned = (request: unknown): boolean =>
  typeof (request as { signature?: unknown } | null)?.signature === 'string';

/**
 * JSON with object keys in code-unit order and no spaces, so that a signer and a verifier that parsed the same
 * request write the same bytes. Keys with undefined values are left out, as JSON.stringify leaves them out.
 */
export function canonicalJson(value: unknown): string {
  if (value === null || typeof value !== 'object') return JSON.stringify(value) ?? 'null';
  if (Array.isArray(value)) return `[${value.map((v: unknown) => canonicalJson(v)).join(',')}]`;
  const record = value as Record<string, unknown>;
  // The default sort compares UTF-16 code units: the same order everywhere, whatever the locale.
  const keys = Object.keys(record)
    .filter((k) => record[k] !== undefined)
    .sort();
  return `{${keys.map((k) => `${JSON.stringify(k)}:${canonicalJson(record[k])}`).join(',')}}`;
}

const SIGNING_CONTEXT = 'planned-failover signed request v1';

/**
 * What a signature covers: the operation, its target and the whole request as sent (requester, payload, time and
 * nonce), everything but the signature itself. The target binds a request to the workflow it is for, so a request
 * signed for replica/sql01 proves nothing at replica/web01.
 */
export function requestToSign(operation: string, target: string, request: Record<string, unknown>): string {
  const { signature: _signature, ...signed } = request;
  return `${SIGNING_CONTEXT}\n${canonicalJson({ operation, target, request: signed })}`;
}

/** Every request that changes anything: workflow starts, replica operations, halted-session decisions, proxy changes. */
export const SignedOperations = [
  'plannedFailover',
  'replicationJob',
  'undoFailover',
  'permanentFailover',
  'failback',
  'commitFailback',
  'undoFailback',
  'failover',
  'retry',
  'abort',
  'forceFailover',
  'setProxyOnline',
] as const;
export type SignedOperation = (typeof SignedOperations)[number];

export const isSignedOperation = (name: string): name is SignedOperation =>
  (SignedOperations as readonly string[]).includes(name);

export const STARTED_OPERATIONS: readonly SignedOperation[] = ['plannedFailover', 'replicationJob'];

/**
 * Signals and updates are bound to the workflow they are sent to; a workflow start to the workflow type it starts
 * (what it acts on is named in its input).
 */
export const requestTarget = (operation: SignedOperation, workflowId?: string): string =>
  STARTED_OPERATIONS.includes(operation) ? operation : (workflowId ?? '');

/** Who a verified request came from, as its workflow records it: the key that signed it, or null when unsigned. */
export interface VerifiedRequester {
  user: string;
  /** The signing key's fingerprint (`SHA256:...`), or null for a request accepted unsigned (allowUnsigned). */
  keyId: string | null;
}

/** How a workflow asks for a request to be verified, in an activity, before it touches anything. */
export interface RequestToVerify {
  operation: SignedOperation;
  target: string;
  /** The request as it arrived (its signature covers it as sent, not as defaults filled it in). */
  request: Record<string, unknown>;
  /** When the workflow received it (workflow time, ms): what expiry is judged against, however long it queued. */
  receivedAt: number;
  /** What accepting it starts (a workflow or operation id): claiming its nonce again for the same one is no replay. */
  claimer: string;
}

export const formatRequester = (r: VerifiedRequester): string =>
  r.keyId ? `${r.user} (key ${r.keyId})` : `${r.user} (unsigned)`;

/** The registry of nonces already used, id request-nonces: one owner, so a replay is seen whichever worker gets it. */
export const REQUEST_NONCES_WORKFLOW_ID = 'request-nonces';

export interface NonceClaim {
  target: string;
  nonce: string;
  claimer: string;
  /** After this (ms) the request would be refused as expired anyway, so its nonce need not be kept. */
  keepUntil: number;
}

export type NonceClaimResult = { claimed: true } | { claimed: false; claimedBy: string };

export const claimNonceUpdate = defineUpdate<NonceClaimResult, [NonceClaim]>('claimNonce');

export interface RequestNoncesInput {
  carried?: NonceClaim[];
}
