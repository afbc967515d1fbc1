import {
  formatRequester,
  type HaltRecord,
  type PlannedFailoverResult,
  type PlannedFailoverSessionResult,
  type ReplicationJobResult,
} from '../contract';
import { formatBytes, formatDuration, formatTable } from './format';

/** Who decided a halt, with the key that signed the decision where the session recorded it. */
const decider = (h: HaltRecord): string =>
  h.decidedWithKey === undefined
    ? (h.decidedBy ?? '')
    : formatRequester({ user: h.decidedBy ?? '', keyId: h.decidedWithKey });

const ms = (v: number | undefined): string => (v === undefined ? '-' : formatDuration(v));

/** The outcome of a planned failover as an operator reads it: one row per VM, downtime broken down. */
export function plannedFailoverTable(result: PlannedFailoverResult): string {
  const rows = result.sessions.map((s: PlannedFailoverSessionResult) => [
    s.vm,
    s.job,
    s.outcome,
    ms(s.downtime?.totalMs),
    ms(s.downtime?.guestShutdownMs),
    ms(s.downtime?.finalSyncMs),
    ms(s.downtime?.switchMs),
    ms(s.downtime?.bootMs),
    ms(s.downtime?.haltedMs),
    ms(s.downtime?.orchestrationMs),
    formatBytes(s.bytesBeforePowerOff),
    formatBytes(s.bytesAfterPowerOff),
    s.verification ? (s.verification.identical ? 'identical' : 'MISMATCH') : '-',
    s.fullVerification
      ? s.fullVerification.identical === true
        ? 'identical'
        : s.fullVerification.identical === false
          ? `MISMATCH (${s.fullVerification.mismatchedBlocks})`
          : 'not run'
      : '-',
  ]);
  const table = formatTable(
    [
      'VM',
      'job',
      'outcome',
      'downtime',
      'shutdown',
      'final sync',
      'switch',
      'boot',
      'halted',
      'orchestration',
      'copied before off',
      'after off',
      'copied blocks',
      'all blocks',
    ],
    rows,
  );
  const notes = result.sessions
    .filter((s) => s.outcome !== 'failedOver' || s.helperPoints.length > 0)
    .map((s) =>
      s.outcome === 'failedOver' && s.fullVerification?.identical === true
        ? `  ${s.vm}: helper restore points ${s.helperPoints.join(', ')}`
        : `  ${s.vm}: ${s.detail}${s.dataLoss ? ` (${s.dataLoss})` : ''}`,
    );
  for (const s of result.sessions)
    for (const h of s.halts)
      notes.push(
        `  ${s.vm}: halted #${h.id} at ${h.step}: ${h.reason}; ${h.decision ? `${h.decision} by ${decider(h)} (${h.decisionReason}): ${h.outcome ?? ''}` : 'undecided'}`,
      );
  return [table, ...(notes.length > 0 ? ['', ...notes] : [])].join('\n');
}

export function replicationJobTable(results: ReplicationJobResult[]): string {
  const rows = results.flatMap((r) =>
    r.sessions.map((s) => [
      s.vm,
      r.job,
      s.outcome,
      s.copy ? formatBytes(s.copy.bytesCopied) : '-',
      s.copy ? [...new Set(Object.values(s.copy.modes))].join(',') : s.detail,
      s.restorePoint?.id ?? '-',
    ]),
  );
  return formatTable(['VM', 'job', 'outcome', 'copied', 'how', 'restore point'], rows);
}
