// Where a worker process serves its Prometheus metrics: the SDK's runtime telemetry (task queues, polls, activity
// and workflow task latencies) and the orchestrator's own: workflow code records them (src/workflows/metrics.ts),
// but for the halted-sessions gauge, which the orchestration worker counts in visibility.
import type { Client } from '@temporalio/client';
import type { MetricMeter } from '@temporalio/common';
import type { TelemetryOptions } from '@temporalio/worker';
import { DOWNTIME_BUCKETS, MetricNames, SearchAttributes, WorkflowTypes } from './contract';

export function prometheusTelemetry(bindAddress: string): TelemetryOptions {
  return {
    metrics: {
      prometheus: {
        bindAddress,
        histogramBucketOverrides: {
          [MetricNames.downtime]: DOWNTIME_BUCKETS,
          [MetricNames.downtimePart]: DOWNTIME_BUCKETS,
        },
      },
    },
  };
}

/** Planned-failover sessions halted now: in their critical window, waiting for an operator. */
export const HALTED_SESSIONS_QUERY =
  `WorkflowType="${WorkflowTypes.plannedFailoverSession}" AND ExecutionStatus="Running" AND ` +
  `${SearchAttributes.FailoverStep.name}="Halted"`;

/**
 * Publishes how many sessions are halted now, counted in Temporal's visibility every `everyMs`. The halts counter
 * says that one happened; an alert on this gauge lasts as long as the halt, and is right again at once after a
 * worker restart (a counter or gauge recorded by the workflow is not re-emitted while it waits). A failed count
 * (the server away) keeps the last value. Returns a function that stops it.
 */
export function publishHaltedSessions(client: Client, meter: MetricMeter, everyMs = 10_000): () => void {
  const gauge = meter
    .withTags({ namespace: client.options.namespace })
    .createGauge(
      MetricNames.sessionsHalted,
      'int',
      undefined,
      'planned-failover sessions halted, waiting for an operator',
    );
  let timer: NodeJS.Timeout | undefined;
  let stopped = false;
  const count = async (): Promise<void> => {
    try {
      gauge.set((await client.workflow.count(HALTED_SESSIONS_QUERY)).count);
    } catch {
      // Kept: the next count sets it again.
    }
    if (!stopped) timer = setTimeout(() => void count(), everyMs).unref();
  };
  void count();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
