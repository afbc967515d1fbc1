// The orchestrator's own Prometheus metrics, recorded from workflow code through the SDK's metric meter: the
// orchestration worker exports them beside the SDK's (`npm run worker -- --metrics <host:port>`). The SDK drops
// what a workflow records while it replays, so a session's end is counted once, however often its history replays.
import { metricMeter } from '@temporalio/workflow';
import { MetricNames, type DowntimeBreakdown, type PlannedFailoverSessionResult } from '../contract';

const parts: [keyof DowntimeBreakdown, string][] = [
  ['guestShutdownMs', 'guest_shutdown'],
  ['finalSyncMs', 'final_sync'],
  ['switchMs', 'switch'],
  ['bootMs', 'boot'],
  ['haltedMs', 'halted'],
  ['orchestrationMs', 'orchestration'],
];

/** A planned-failover session's end: its outcome, its bytes before and after power-off, and its downtime. */
export function recordPlannedFailoverSession(result: PlannedFailoverSessionResult): void {
  const job = result.job;
  metricMeter
    .createCounter(MetricNames.sessions, '1', 'Sessions ended, by operation and outcome')
    .add(1, { operation: 'planned_failover', outcome: result.outcome, job });
  const bytes = metricMeter.createCounter(MetricNames.bytesCopied, 'By', 'Bytes copied to replicas');
  if (result.bytesBeforePowerOff > 0)
    bytes.add(result.bytesBeforePowerOff, { operation: 'planned_failover', phase: 'before_power_off', job });
  if (result.bytesAfterPowerOff > 0)
    bytes.add(result.bytesAfterPowerOff, { operation: 'planned_failover', phase: 'after_power_off', job });
  const downtime = result.downtime;
  if (!downtime) return;
  metricMeter
    .createHistogram(MetricNames.downtime, 'float', 's', 'Downtime of a VM moved by a planned failover')
    .record(downtime.totalMs / 1000, { job, outcome: result.outcome });
  const part = metricMeter.createHistogram(MetricNames.downtimePart, 'float', 's', 'The parts of that downtime');
  // orchestrationMs is what is left of the total; never negative in a sound measurement, clamped for a histogram.
  for (const [key, name] of parts) part.record(Math.max(0, downtime[key]) / 1000, { job, part: name });
}

/** A replication session's end (a job run of one VM). */
export function recordReplicationSession(job: string, outcome: string, bytesCopied: number): void {
  metricMeter
    .createCounter(MetricNames.sessions, '1', 'Sessions ended, by operation and outcome')
    .add(1, { operation: 'replication', outcome, job });
  if (bytesCopied > 0)
    metricMeter
      .createCounter(MetricNames.bytesCopied, 'By', 'Bytes copied to replicas')
      .add(bytesCopied, { operation: 'replication', phase: 'job_run', job });
}

/** A halt of a critical window, at its step; and the operator's decision that ends one. */
export function recordHalt(step: string): void {
  metricMeter.createCounter(MetricNames.halts, '1', 'Critical windows halted, by step').add(1, { step });
}

export function recordHaltDecision(decision: string): void {
  metricMeter
    .createCounter(MetricNames.haltDecisions, '1', 'Decisions on halted sessions, by decision')
    .add(1, { decision });
}
