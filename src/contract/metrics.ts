// The orchestrator's own Prometheus metrics: part of the public contract, since operators' dashboards and alerts
// name them. The README ("Metrics") lists each with its labels and a sample query.
export const MetricNames = {
  downtime: 'planned_failover_downtime_seconds',
  downtimePart: 'planned_failover_downtime_part_seconds',
  bytesCopied: 'planned_failover_bytes_copied_total',
  sessions: 'planned_failover_sessions_total',
  halts: 'planned_failover_halts_total',
  haltDecisions: 'planned_failover_halt_decisions_total',
  /** Counted in visibility by the orchestration worker (src/metrics.ts), not recorded by workflows. */
  sessionsHalted: 'planned_failover_sessions_halted',
  slotsInUse: 'planned_failover_proxy_slots_in_use',
  slotsCapacity: 'planned_failover_proxy_slots_capacity',
  slotsWaiting: 'planned_failover_proxy_slots_waiting',
} as const;

/** The histograms' buckets, in seconds: a planned failover's downtime is seconds to minutes. */
export const DOWNTIME_BUCKETS = [0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 120, 300, 600];
