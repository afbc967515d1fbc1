import { defineQuery, defineSignal } from '@temporalio/workflow';
import type { ReplicaState } from '../domain/replica-state';

/** The id of a replica's entity workflow: one per replica, the owner of its state. */
export const replicaWorkflowId = (vm: string): string => `replica/${vm}`;

/** A restore point as last read from the DR host (the host is the truth). */
export interface RestorePointSummary {
  id: string;
  createdAt: string;
  kind: string;
  bytesWritten: number;
  crashConsistent: boolean;
}

export type SessionKind = 'jobRun' | 'plannedFailover';

export interface SessionRef {
  sessionId: string;
  /** The session's workflow id, signalled when the replica is granted to it. */
  workflowId: string;
  kind: SessionKind;
  requestedBy: string;
  reason: string;
}

export interface RejectionRecord {
  at: string;
  operation: string;
  requestedBy: string;
  reason: string;
}

export interface ReplicaView {
  vm: string;
  job: string;
  state: ReplicaState;
  /** Oldest first. */
  restorePoints: RestorePointSummary[];
  currentSession: SessionRef | null;
  /** Sessions waiting for the replica, in the order they asked. */
  waitingSessions: SessionRef[];
  lastRun: { sessionId: string; at: string; outcome: string } | null;
  lastRejection: RejectionRecord | null;
}

/** What a session reports to its replica's entity while it holds the replica. */
export interface SessionReport {
  sessionId: string;
  state?: ReplicaState;
  restorePoints?: RestorePointSummary[];
  outcome?: string;
}

export interface ReplicaEntityInput {
  vm: string;
  job: string;
  /** Carried over by continue-as-new. */
  carried?: Omit<ReplicaView, 'vm' | 'job'>;
}

export const replicaSignals = {
  requestSession: defineSignal<[SessionRef]>('requestSession'),
  /** Progress and outcome from the session that holds the replica; ignored from any other. */
  reportSession: defineSignal<[SessionReport]>('reportSession'),
  releaseSession: defineSignal<[SessionReport]>('releaseSession'),
};

export const replicaQueries = {
  state: defineQuery<ReplicaView>('state'),
};

/** Sent to a session by its replica's entity when the session may start. */
export const sessionGrantedSignal = defineSignal<[{ state: ReplicaState }]>('sessionGranted');
