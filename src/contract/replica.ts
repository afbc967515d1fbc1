import { defineQuery, defineSignal } from '@temporalio/workflow';
import type { ReplicaState } from '../domain/replica-state';
import type { OperationName } from './operations';
import type { DowntimeBreakdown } from './planned-failover';

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

/** Sessions of jobs and planned failovers, and the operations that finish a failover. */
export type SessionKind = 'jobRun' | 'plannedFailover' | OperationName;

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
  /** The session or operation working on the replica now. */
  currentSession: SessionRef | null;
  /** Sessions and operations waiting for the replica, in the order they asked. */
  waitingSessions: SessionRef[];
  lastRun: (Omit<SessionRef, 'workflowId'> & { at: string; outcome: string }) | null;
  lastRejection: RejectionRecord | null;
  /** Downtime of the last planned failover of this VM. */
  lastDowntime: DowntimeBreakdown | null;
  /** While in Failback: the production VM the replica's data went back to. */
  failbackTo: { host: string; vm: string } | null;
}

/** What a session reports to its replica's entity while it holds the replica. */
export interface SessionReport {
  sessionId: string;
  state?: ReplicaState;
  restorePoints?: RestorePointSummary[];
  outcome?: string;
  downtime?: DowntimeBreakdown;
}

export interface ReplicaEntityInput {
  vm: string;
  job: string;
  /** Carried over by continue-as-new: the view, and the payloads of queued operations. */
  carried?: Omit<ReplicaView, 'vm' | 'job'> & { queuedOperations: QueuedOperation[] };
}

export interface QueuedOperation {
  operationId: string;
  operation: OperationName;
  payload: unknown;
  /** Sent as an update: its caller waits for the outcome. */
  viaUpdate: boolean;
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
