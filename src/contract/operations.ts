import { defineSignal, defineUpdate } from '@temporalio/workflow';
import { z } from 'zod';
import type { ReplicaState } from '../domain/replica-state';
import { vmNameSchema } from './planned-failover';
import type { RestorePointSummary, VmLocation } from './replica';
import { signatureComplete, signatureFields } from './requests';
import { requiredText } from './validation';

// Operations that finish (or start) a failover, sent to a replica's entity replica/<vm> as a signal or an update.

const who = { requestedBy: requiredText(128), reason: requiredText(), ...signatureFields };
const objectError = { error: 'must be a JSON object like {"requestedBy":"alice","reason":"..."}' };
const name = z
  .string({ error: 'must be a name' })
  .regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/, { error: 'must be a host name' });

export const operationSchemas = {
  undoFailover: z
    .strictObject({ ...who, powerOnSource: z.boolean({ error: 'must be true or false' }).default(true) }, objectError)
    .superRefine(signatureComplete),
  permanentFailover: z
    .strictObject(
      {
        ...who,
        /** Irreversible: the request must say so. */
        confirm: z.literal(true, {
          error: 'must be true: permanent failover deletes every restore point and cannot be undone',
        }),
      },
      objectError,
    )
    .superRefine(signatureComplete),
  failback: z
    .strictObject(
      {
        ...who,
        /** Where production goes back to: the original VM (default), a VM restored elsewhere, or a new VM. */
        target: z
          .union(
            [
              z.literal('original'),
              z.strictObject({ restoredVm: vmNameSchema }),
              z.strictObject({ newVm: z.strictObject({ name: vmNameSchema, host: name }) }),
            ],
            { error: 'must be "original", {"restoredVm":"<name>"} or {"newVm":{"name":"<name>","host":"<host>"}}' },
          )
          .default('original'),
        powerOnProduction: z.boolean({ error: 'must be true or false' }).default(true),
        /**
         * Failing back onto a production VM that is running (as after a regular failover) overwrites what it wrote
         * since: refused unless the request says so. With it, the VM's guest is shut down first, not cut off.
         */
        confirm: z.boolean({ error: 'must be true or false' }).default(false),
      },
      objectError,
    )
    .superRefine(signatureComplete),
  commitFailback: z.strictObject(who, objectError).superRefine(signatureComplete),
  undoFailback: z.strictObject(who, objectError).superRefine(signatureComplete),
  failover: z
    .strictObject(
      {
        ...who,
        restorePointId: z.string({ error: 'must be a restore point id' }).min(1).optional(),
        /** The newest restore point at or before this time. */
        at: z.iso.datetime({ error: 'must be an ISO 8601 time like 2026-11-25T10:00:00Z', offset: true }).optional(),
      },
      objectError,
    )
    .refine((v) => (v.restorePointId === undefined) !== (v.at === undefined), {
      error: 'give exactly one of restorePointId or at',
      path: ['restorePointId'],
    })
    .superRefine(signatureComplete),
};

export type OperationName = keyof typeof operationSchemas;
export const OperationNames = Object.keys(operationSchemas) as OperationName[];
export type OperationPayload<N extends OperationName> = z.output<(typeof operationSchemas)[N]>;
export type AnyOperationPayload = OperationPayload<OperationName>;

export interface OperationOutcome {
  operation: OperationName;
  state: ReplicaState;
  detail: string;
  /** Bytes the operation wrote to VM disks (failback: to production); 0 for the others. */
  bytesCopied: number;
  /** Failback onto a production VM that had run since the failover: the bytes of its own that were overwritten. */
  productionBytesOverwritten?: number;
  /** The operation's own workflow, with every step in its history. */
  workflowId: string;
}

export const operationSignals = Object.fromEntries(
  OperationNames.map((n) => [n, defineSignal<[unknown]>(n)]),
) as Record<OperationName, ReturnType<typeof defineSignal<[unknown]>>>;
export const operationUpdates = Object.fromEntries(
  OperationNames.map((n) => [n, defineUpdate<OperationOutcome, [unknown]>(n)]),
) as Record<OperationName, ReturnType<typeof defineUpdate<OperationOutcome, [unknown]>>>;

export interface ReplicaOperationInput {
  operationId: string;
  vm: string;
  job: string;
  operation: OperationName;
  /** Checked against the operation's schema, defaults filled in. */
  payload: AnyOperationPayload;
  state: ReplicaState;
  failbackTo: VmLocation | null;
  /** The VM that runs production for this replica when it is not the job's VM (see ReplicaView). */
  productionVm: VmLocation | null;
  /** See ReplicaView: a failback that may have left the production VM partly overwritten. */
  unfinishedFailback?: { operationId: string; vm: string; at: string } | null;
}

export interface ReplicaOperationResult {
  state: ReplicaState;
  restorePoints: RestorePointSummary[];
  detail: string;
  failbackTo: VmLocation | null;
  productionVm: VmLocation | null;
  bytesCopied: number;
  productionBytesOverwritten?: number;
}

export const operationWorkflowId = (vm: string, operation: OperationName, operationId: string): string =>
  `operation/${vm}/${operation}/${operationId}`;
