// Where a worker process serves its Prometheus metrics: the SDK's runtime telemetry (task queues, polls, activity
// and workflow task latencies) and the orchestrator's own, which workflow code records (src/workflows/metrics.ts).
import type { TelemetryOptions } from '@temporalio/worker';
import { DOWNTIME_BUCKETS, MetricNames } from './contract';

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
