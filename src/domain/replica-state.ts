// The replica state machine (product spec, section 3). Pure rules shared by workflows and activities.

export const ReplicaStates = ['Unseeded', 'Ready', 'Failover', 'PermanentFailover', 'Failback'] as const;
export type ReplicaState = (typeof ReplicaStates)[number];

export const ReplicaOperations = [
  'jobRun',
  'plannedFailover',
  'failover',
  'undoFailover',
  'permanentFailover',
  'failback',
  'commitFailback',
  'undoFailback',
] as const;
export type ReplicaOperation = (typeof ReplicaOperations)[number];

/** The state each operation starts from, and the state it leaves on success. */
const transitions: Record<ReplicaOperation, { from: readonly ReplicaState[]; to: ReplicaState }> = {
  jobRun: { from: ['Unseeded', 'Ready'], to: 'Ready' },
  plannedFailover: { from: ['Ready'], to: 'Failover' },
  failover: { from: ['Ready'], to: 'Failover' },
  undoFailover: { from: ['Failover'], to: 'Ready' },
  permanentFailover: { from: ['Failover'], to: 'PermanentFailover' },
  failback: { from: ['Failover'], to: 'Failback' },
  commitFailback: { from: ['Failback'], to: 'Ready' },
  undoFailback: { from: ['Failback'], to: 'Failover' },
};

export type TransitionCheck = { allowed: true; to: ReplicaState } | { allowed: false; reason: string };

export function checkTransition(state: ReplicaState, operation: ReplicaOperation): TransitionCheck {
  const rule = transitions[operation];
  if (rule.from.includes(state)) return { allowed: true, to: rule.to };
  const needs = rule.from.join(' or ');
  const why = state === 'Unseeded' ? 'it has never been replicated' : `it is in state ${state}`;
  return { allowed: false, reason: `${operation} needs a replica in state ${needs}, but ${why}` };
}

/** Job runs skip replicas that are failed over or failing back (their data flows the other way). */
export function jobRunSkipReason(state: ReplicaState): string | undefined {
  if (state === 'Failover' || state === 'Failback') return `replica is in state ${state}; the job skips it`;
  if (state === 'PermanentFailover') return 'replica became the production VM (permanent failover)';
  return undefined;
}
