import { z } from 'zod';
import { signatureComplete, signatureFields, type VerifiedRequester } from './requests';
import { requiredText } from './validation';
import { vmNameSchema } from './planned-failover';
import type { RestorePointSummary } from './replica';

export const replicationJobInputSchema = z
  .strictObject(
    {
      job: z
        .string({ error: 'is required' })
        .regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/, { error: 'must be a job name' }),
      requestedBy: requiredText(128),
      reason: requiredText().optional(),
      /** Only these VMs of the job (all when omitted). */
      vms: z.array(vmNameSchema).min(1, { error: 'must name at least one VM when given' }).optional(),
      options: z
        .strictObject(
          {
            proxyWaitTimeoutSeconds: z
              .number({ error: 'must be a number' })
              .int({ error: 'must be a whole number' })
              .min(1, { error: 'must be at least 1' })
              .max(7 * 24 * 3600, { error: 'must be at most 604800' })
              .optional(),
          },
          { error: 'must be an object' },
        )
        .optional(),
      /** Set only in a job's schedule (by the configuration's service identity): the schedule that starts this run. */
      schedule: z
        .string({ error: 'must be a schedule id' })
        .regex(/^job-schedule\/[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/, {
          error: 'must be a job schedule id like job-schedule/sql',
        })
        .optional(),
      ...signatureFields,
    },
    { error: 'must be a JSON object like {"job":"sql","requestedBy":"alice"}' },
  )
  .superRefine(signatureComplete);

export type ReplicationJobInput = z.output<typeof replicationJobInputSchema>;

export type SessionOutcome = 'replicated' | 'skipped' | 'failed';

export interface CopyTotals {
  bytesCopied: number;
  /** How the changed blocks were found, per disk: full (first run), tracked (change tracking), digest (tracking lost), backup. */
  modes: Record<string, string>;
  /** How the blocks travelled, per disk: `network` (through the proxy) or `host-to-host`. */
  transports: Record<string, string>;
}

export interface ReplicationSessionInput {
  sessionId: string;
  vm: string;
  job: string;
  requestedBy: string;
  reason: string;
  proxyWaitTimeoutSeconds: number;
}

export interface ReplicationSessionResult {
  vm: string;
  sessionId: string;
  outcome: SessionOutcome;
  detail: string;
  restorePoint?: RestorePointSummary;
  copy?: CopyTotals;
}

export interface ReplicationJobResult {
  job: string;
  /** Who was verified to have asked, and by which key (absent in runs that predate signed requests). */
  requester?: VerifiedRequester;
  sessions: ReplicationSessionResult[];
}

/** Session workflow ids put the VM first, so the Web UI lists a VM's sessions together. */
export const sessionWorkflowId = (vm: string, sessionId: string): string => `session/${vm}/${sessionId}`;
