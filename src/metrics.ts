// Where a worker process serves its Prometheus metrics: the SDK's runtime telemetry (task queues, polls, activity
// and workflow task latencies) and the orchestrator's own: workflow code records them (src/workflows/metrics.ts),
// but for the gauges of what is true now (sessions halted, proxy slots), which the orchestration worker samples.
import type { Client } from '@temporalio/client';
import type { MetricMeter } from '@temporalio/common';
import type { TelemetryOptions } from '@temporalio/worker';
import {
  DOWNTIME_BUCKETS,
  MetricNames,
  PROXY_REGISTRY_WORKFLOW_ID,
  proxyQueries,
  SearchAttributes,
  WorkflowTypes,
} from './contract';

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

/** Runs `sample` now and then every `everyMs` until the returned function stops it; a sample that fails is skipped. */
function sampleEvery(everyMs: number, sample: () => Promise<void>): () => void {
  let timer: NodeJS.Timeout | undefined;
  let stopped = false;
  const run = async (): Promise<void> => {
    try {
      await sample();
    } catch {
      // Kept: the next sample sets the values again.
    }
    if (!stopped) timer = setTimeout(() => void run(), everyMs).unref();
  };
  void run();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

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
  return sampleEvery(everyMs, async () => gauge.set((await client.workflow.count(HALTED_SESSIONS_QUERY)).count));
}

/**
 * Publishes the proxy slots leased, offered (online) and asked for by waiting sessions, as the slot registry answers
 * its query every `everyMs`. Every orchestration worker publishes the same values, whichever of them runs the
 * registry's workflow tasks: set from workflow code, they stayed stale on a worker that no longer ran them. A failed
 * query (no registry yet, the server away) keeps the last values. Returns a function that stops it.
 */
export function publishProxySlots(client: Client, meter: MetricMeter, everyMs = 10_000): () => void {
  const tagged = meter.withTags({ namespace: client.options.namespace });
  const inUse = tagged.createGauge(MetricNames.slotsInUse, 'int', undefined, 'Proxy slots leased to sessions');
  const offered = tagged.createGauge(MetricNames.slotsCapacity, 'int', undefined, 'Proxy slots offered (online)');
  const waiting = tagged.createGauge(
    MetricNames.slotsWaiting,
    'int',
    undefined,
    'Proxy slots asked for by sessions that wait',
  );
  return sampleEvery(everyMs, async () => {
    const view = await client.workflow.getHandle(PROXY_REGISTRY_WORKFLOW_ID).query(proxyQueries.slots);
    for (const p of view.proxies) {
      inUse.set(p.leasedTo.length, { proxy: p.name });
      offered.set(p.enabled && p.online ? p.slots : 0, { proxy: p.name });
    }
    waiting.set(view.waiting.reduce((n, w) => n + w.slots, 0));
  });
}
