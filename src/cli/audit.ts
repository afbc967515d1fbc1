import type { Client } from '@temporalio/client';
import { defaultPayloadConverter, type Payload } from '@temporalio/common';
import type { temporal } from '@temporalio/proto';
import { WorkflowTypes, type RequestToVerify, type VerifiedRequester } from '../contract';
import { durationMs } from '../domain/units';
import { formatTable } from './format';

/** One request as the histories recorded it: who it named, what it asked, and whether it was verified. */
export interface AuditRecord {
  at: string;
  operation: string;
  target: string;
  requestedBy: string;
  reason: string;
  /** accepted (signed by the key, or unsigned where allowed), refused (with why), or still being verified. */
  verdict: 'accepted' | 'refused' | 'pending';
  keyId: string | null;
  refusal?: string;
  workflowId: string;
}

/** The workflows that verify requests: starts verify their own, entities and sessions the messages they receive. */
const VERIFYING = [
  WorkflowTypes.plannedFailover,
  WorkflowTypes.replicationJob,
  WorkflowTypes.plannedFailoverSession,
  WorkflowTypes.replica,
  WorkflowTypes.proxySlots,
];

const decode = <T>(payloads: { payloads?: Payload[] | null } | null | undefined): T | undefined => {
  const first = payloads?.payloads?.[0];
  return first ? defaultPayloadConverter.fromPayload<T>(first) : undefined;
};

const timeOf = (event: temporal.api.history.v1.IHistoryEvent): Date =>
  new Date(Number(event.eventTime?.seconds ?? 0) * 1000 + Math.floor((event.eventTime?.nanos ?? 0) / 1e6));

/**
 * Every request verified since `since`, read from the histories (the audit trail): each verifyRequest activity, with
 * the request it was given and its result or refusal. Newest first.
 */
export async function auditSince(client: Client, since: Date, user?: string): Promise<AuditRecord[]> {
  const types = VERIFYING.map((t) => `'${t}'`).join(', ');
  const query = `WorkflowType IN (${types}) AND (CloseTime >= '${since.toISOString()}' OR ExecutionStatus = 'Running')`;
  const records: AuditRecord[] = [];
  for await (const wf of client.workflow.list({ query })) {
    const history = await client.workflow.getHandle(wf.workflowId, wf.runId).fetchHistory();
    const scheduled = new Map<string, { at: Date; input: RequestToVerify }>();
    const settle = (id: string | null | undefined, outcome: Partial<AuditRecord>) => {
      const asked = scheduled.get(String(id));
      if (!asked) return;
      scheduled.delete(String(id));
      records.push({ ...recordOf(asked.at, asked.input, wf.workflowId), ...outcome });
    };
    for (const event of history.events ?? []) {
      const s = event.activityTaskScheduledEventAttributes;
      if (s?.activityType?.name === 'verifyRequest') {
        const input = decode<RequestToVerify>(s.input);
        if (input) scheduled.set(String(event.eventId), { at: timeOf(event), input });
      }
      const done = event.activityTaskCompletedEventAttributes;
      if (done) {
        const requester = decode<VerifiedRequester>(done.result);
        settle(String(done.scheduledEventId), { verdict: 'accepted', keyId: requester?.keyId ?? null });
      }
      const failed = event.activityTaskFailedEventAttributes;
      if (failed)
        settle(String(failed.scheduledEventId), { verdict: 'refused', refusal: failed.failure?.message ?? '' });
    }
    for (const asked of scheduled.values()) records.push(recordOf(asked.at, asked.input, wf.workflowId));
  }
  return records
    .filter((r) => r.at >= since.toISOString() && (user === undefined || r.requestedBy === user))
    .sort((a, b) => (a.at < b.at ? 1 : a.at > b.at ? -1 : 0));
}

function recordOf(at: Date, input: RequestToVerify, workflowId: string): AuditRecord {
  const { requestedBy, reason } = input.request as { requestedBy?: unknown; reason?: unknown };
  return {
    at: at.toISOString(),
    operation: input.operation,
    target: input.target,
    requestedBy: typeof requestedBy === 'string' ? requestedBy : '',
    reason: typeof reason === 'string' ? reason : '',
    verdict: 'pending',
    keyId: null,
    workflowId,
  };
}

export function auditTable(records: readonly AuditRecord[]): string {
  if (records.length === 0) return 'No request in that time.';
  return formatTable(
    ['time', 'requested by', 'operation', 'target', 'verdict', 'key or reason', 'workflow'],
    records.map((r) => [
      r.at,
      r.requestedBy,
      r.operation,
      r.target,
      r.verdict,
      r.verdict === 'refused' ? (r.refusal ?? '') : r.verdict === 'accepted' ? (r.keyId ?? 'unsigned') : '',
      r.workflowId,
    ]),
  );
}

/** `--since 24h`, `30m`, `7d` back from now, or an ISO time. */
export function sinceOf(value: string, now = Date.now()): Date | null {
  if (/^\d+[mhd]$/.test(value)) return new Date(now - durationMs(value));
  const absolute = Date.parse(value);
  return /^\d{4}-\d\d-\d\dT/.test(value) && !Number.isNaN(absolute) ? new Date(absolute) : null;
}
