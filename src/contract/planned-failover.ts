import { z } from 'zod';
import { signatureComplete, signatureFields, type VerifiedRequester } from './requests';
import { requiredText, validate, type InputProblem, type Validation } from './validation';

/** VM names as hypervisors allow them: letters, digits, dot, dash and underscore. */
export const vmNameSchema = z
  .string({ error: 'must be a VM name (a string)' })
  .regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/, {
    error: 'must be a VM name: 1 to 64 letters, digits, dots, dashes or underscores, starting with a letter or digit',
  });

const wholeNumber = (min: number, max: number) =>
  z
    .number({ error: 'must be a number' })
    .int({ error: 'must be a whole number' })
    .min(min, { error: `must be at least ${min}` })
    .max(max, { error: `must be at most ${max}` });

export const plannedFailoverOptionsSchema = z.strictObject(
  {
    /** How many replication jobs' lanes run at once; VMs within one job always run one by one. */
    maxParallelJobs: wholeNumber(1, 64).optional(),
    /** Guest shutdown is given this long before the source VM is powered off hard. */
    shutdownTimeoutSeconds: wholeNumber(1, 3600).optional(),
    /** Extra incremental passes before power-off while the delta keeps shrinking (0 = off). */
    preSyncMaxPasses: wholeNumber(0, 10).optional(),
    /** Stop the extra passes once a pass copies less than this many bytes. */
    preSyncTargetBytes: wholeNumber(1, Number.MAX_SAFE_INTEGER).optional(),
    /** How long a session may wait for a free proxy slot before it fails. */
    proxyWaitTimeoutSeconds: wholeNumber(1, 7 * 24 * 3600).optional(),
  },
  { error: 'must be an object' },
);

export const plannedFailoverInputSchema = z
  .strictObject(
    {
      vms: z
        .array(vmNameSchema, {
          error: (iss) => (iss.input === undefined ? 'is required' : 'must be a list of VM names'),
        })
        .min(1, { error: 'must name at least one VM' })
        .max(500, { error: 'may name at most 500 VMs in one request' }),
      reason: requiredText(),
      requestedBy: requiredText(128),
      options: plannedFailoverOptionsSchema.optional(),
      ...signatureFields,
    },
    { error: 'must be a JSON object like {"vms":["sql01"],"reason":"...","requestedBy":"alice"}' },
  )
  .superRefine(signatureComplete);

export type PlannedFailoverInput = z.output<typeof plannedFailoverInputSchema>;
export type PlannedFailoverOptions = z.output<typeof plannedFailoverOptionsSchema>;

/** VM names compare case-insensitively, as Hyper-V treats them. */
function duplicateVmProblems(input: unknown): InputProblem[] {
  const vms: unknown = (input as { vms?: unknown } | null)?.vms;
  if (!Array.isArray(vms)) return [];
  const seen = new Map<string, number>();
  const problems: InputProblem[] = [];
  vms.forEach((vm: unknown, i) => {
    if (typeof vm !== 'string') return;
    const first = seen.get(vm.toLowerCase());
    if (first === undefined) seen.set(vm.toLowerCase(), i);
    else problems.push({ path: `vms[${i}]`, message: `'${vm}' is already named at vms[${first}]` });
  });
  return problems;
}

/** Checks a plannedFailover request and names every problem, duplicates included, before anything is touched. */
export function validatePlannedFailoverInput(input: unknown): Validation<PlannedFailoverInput> {
  const parsed = validate(plannedFailoverInputSchema, input);
  const duplicates = duplicateVmProblems(input);
  if (parsed.ok && duplicates.length === 0) return parsed;
  return { ok: false, problems: [...(parsed.ok ? [] : parsed.problems), ...duplicates] };
}

/** An operator's decision on a halted session, and every operation request: who asks, and why. */
export const operatorRequestSchema = z
  .strictObject(
    { requestedBy: requiredText(128), reason: requiredText(), ...signatureFields },
    { error: 'must be a JSON object like {"requestedBy":"alice","reason":"..."}' },
  )
  .superRefine(signatureComplete);
export type OperatorRequest = z.output<typeof operatorRequestSchema>;

/** Downtime of one VM: source stops serving (guest shutdown begins) until its replica has booted. */
export interface DowntimeBreakdown {
  totalMs: number;
  guestShutdownMs: number;
  finalSyncMs: number;
  switchMs: number;
  bootMs: number;
  /** Waiting for an operator's decision while the session was halted (0 when it never halted). */
  haltedMs: number;
  /**
   * Everything else: scheduling, state changes, activity round trips. The total is timed on the Temporal server's
   * clock and each part is a duration measured where it happened, so this is never clamped: a negative value would
   * show a measuring error instead of hiding it.
   */
  orchestrationMs: number;
}

export interface VerificationResult {
  /** True when every block compared, and the guest canary, match the source at power-off. */
  identical: boolean;
  blocksCompared: number;
  mismatchedBlocks: number;
  sourceCanary: number;
  replicaCanary: number;
  method: 'tracked-blocks' | 'all-blocks';
  /** What the comparison covered, in words. */
  covered: string;
}

/**
 * The comparison of every block of helper point 2 with the powered-off source, run once the replica is up (both
 * are frozen then, so it adds no downtime). `identical` is null when it could not run; `error` says why.
 */
export interface FullVerification {
  identical: boolean | null;
  blocksCompared: number;
  mismatchedBlocks: number;
  covered: string;
  error?: string;
}

/** One halt of a session's critical window and the decision that ended it. */
export interface HaltRecord {
  /** Numbered from 1 within the session; a decision applies to the halt it was sent for. */
  id: number;
  step: string;
  reason: string;
  since: string;
  decision?: 'retry' | 'abort' | 'forceFailover';
  decidedBy?: string;
  /** The key that signed the decision (`SHA256:...`), null when it was accepted unsigned; absent before signing. */
  decidedWithKey?: string | null;
  decisionReason?: string;
  /** What the decision led to, as its update returned it. */
  outcome?: string;
}

export type PlannedFailoverOutcome =
  'failedOver' | 'aborted' | 'forcedFailover' | 'failed' | 'notStarted' | 'cancelled';

export interface PlannedFailoverSessionInput {
  sessionId: string;
  vm: string;
  job: string;
  requestedBy: string;
  reason: string;
  shutdownTimeoutSeconds: number;
  proxyWaitTimeoutSeconds: number;
  preSyncMaxPasses: number;
  preSyncTargetBytes: number;
}

export interface PlannedFailoverSessionResult {
  vm: string;
  job: string;
  sessionId: string;
  outcome: PlannedFailoverOutcome;
  detail: string;
  bytesCopied: number;
  /** Bytes copied before power-off (helper point 1, with any extra passes) and after it (helper point 2). */
  bytesBeforePowerOff: number;
  bytesAfterPowerOff: number;
  /** Sync passes before power-off: 1, plus the extra passes preSyncMaxPasses allowed and the delta needed. */
  passesBeforePowerOff: number;
  sourceShutdown?: 'shut-down' | 'forced-off' | 'already-off';
  helperPoints: string[];
  /** The check inside the window: the blocks the final sync copied, and the canary. */
  verification?: VerificationResult;
  /** The whole-disk comparison after the replica is up (not for a forced failover). */
  fullVerification?: FullVerification;
  halts: HaltRecord[];
  downtime?: DowntimeBreakdown;
  /** forceFailover: what was not synced and is lost. */
  dataLoss?: string;
}

export interface PlannedFailoverResult {
  requestedBy: string;
  /** Who was verified to have asked, and by which key (absent in runs that predate signed requests). */
  requester?: VerifiedRequester;
  reason: string;
  sessions: PlannedFailoverSessionResult[];
}

export const PLANNED_FAILOVER_DEFAULTS = {
  maxParallelJobs: 4,
  shutdownTimeoutSeconds: 300,
  proxyWaitTimeoutSeconds: 3600,
  preSyncMaxPasses: 0,
  preSyncTargetBytes: 64 * 1024 * 1024,
} as const;
