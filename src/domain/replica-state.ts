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

/** What a DR host says about a replica: the facts its state is rebuilt from when its entity lost it. */
export interface HostReplicaFacts {
  /** False when the DR host has no such replica (it was never seeded). */
  exists: boolean;
  sealedPoints: number;
  consolidated: boolean;
  hasRunningLayer: boolean;
  powerState: 'Running' | 'Off' | 'Starting' | 'Stopping';
  /** The kind of the point the replica shows, when it has one. */
  headKind: string | null;
}

/**
 * The replica's state from the DR host's facts. The host cannot tell Failback from Ready (in both the replica is
 * off on its failback-protective point): the state the last completed operation left, from Temporal's histories,
 * tells those two apart.
 */
export function stateFromHost(facts: HostReplicaFacts, lastOperationState: ReplicaState | null): ReplicaState {
  if (!facts.exists) return 'Unseeded';
  if (facts.consolidated) return 'PermanentFailover';
  if (facts.hasRunningLayer || facts.powerState !== 'Off') return 'Failover';
  if (facts.sealedPoints === 0) return 'Unseeded';
  if (facts.headKind === 'failback-protective' && lastOperationState === 'Failback') return 'Failback';
  return 'Ready';
}

/** Why no session may write into the replica the DR host shows (a job run, a planned failover), whatever its entity believes. */
export function hostRefusesReplication(facts: HostReplicaFacts): { state: ReplicaState; reason: string } | undefined {
  if (facts.consolidated)
    return {
      state: 'PermanentFailover',
      reason: 'the DR host holds the replica as a production VM (permanent failover)',
    };
  if (facts.hasRunningLayer || facts.powerState !== 'Off')
    return { state: 'Failover', reason: `the replica runs on the DR host (${facts.powerState}, failed over)` };
  return undefined;
}
