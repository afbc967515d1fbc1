import { defineQuery, defineSignal } from '@temporalio/workflow';
import type { ReplicaState } from '../domain/replica-state';
import type { PointSource } from '../domain/restore-points';
import type { OperationName } from './operations';
import type { DowntimeBreakdown, FullVerification } from './planned-failover';

/** The id of a replica's entity workflow: one per replica, the owner of its state. */
export const replicaWorkflowId = (vm: string): string => `replica/${vm}`;

/** A restore point as last read from the DR host (the host is the truth). */
export interface RestorePointSummary {
  id: string;
  createdAt: string;
  kind: string;
  bytesWritten: number;
  crashConsistent: boolean;
  /** Where and when its data came from. */
  source: PointSource;
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

/** A request for the replica: the session, and the job its configuration puts the VM in now. */
export interface SessionRequest extends SessionRef {
  job: string;
}

export interface RejectionRecord {
  at: string;
  operation: string;
  requestedBy: string;
  reason: string;
}

export interface VmLocation {
  host: string;
  vm: string;
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
  /** The whole-disk comparison of the last planned failover, and which session made it. */
  lastVerification: (FullVerification & { sessionId: string }) | null;
  /** While in Failback: the production VM the replica's data went back to. */
  failbackTo: VmLocation | null;
  /**
   * The VM that runs production for this replica when it is not the one the job names (after a failback to a
   * restored or new VM was committed): job runs and planned failovers read it instead. Null: the job's VM.
   */
  productionVm: VmLocation | null;
  /** Something an operator should look at, found when the state was rebuilt (e.g. a source left off). */
  attention: string | null;
  /**
   * A failback onto the production VM that did not finish (it failed or was terminated), so the VM's disks may be
   * partly overwritten: undoFailover does not power it on until a failback finishes.
   */
  unfinishedFailback?: { operationId: string; vm: string; at: string } | null;
}

/** What a session reports to its replica's entity while it holds the replica. */
export interface SessionReport {
  sessionId: string;
  state?: ReplicaState;
  restorePoints?: RestorePointSummary[];
  outcome?: string;
  downtime?: DowntimeBreakdown;
  verification?: FullVerification;
}

export interface ReplicaEntityInput {
  vm: string;
  job: string;
  /** Carried over by continue-as-new: the view, the payloads of queued operations, whether the holder was adopted. */
  carried?: Omit<ReplicaView, 'vm' | 'job'> & { queuedOperations: QueuedOperation[]; holderAdopted?: boolean };
}

export interface QueuedOperation {
  operationId: string;
  operation: OperationName;
  payload: unknown;
  /** Sent as an update: its caller waits for the outcome. */
  viaUpdate: boolean;
  /** When the entity received it (workflow time, ms): its signature's age is judged then, however long it queued. */
  receivedAt?: number;
}

/** What the entity rebuilds its state from when it has none: the DR host, and Temporal's own histories. */
export interface RebuiltReplicaState {
  state: ReplicaState;
  restorePoints: RestorePointSummary[];
  failbackTo: VmLocation | null;
  productionVm: VmLocation | null;
  /** A session or operation of this VM still running and past its wait: it holds the replica. */
  holder: SessionRef | null;
  attention: string | null;
  /** What the state was derived from, for the log and the history. */
  evidence: string;
}

export const replicaSignals = {
  requestSession: defineSignal<[SessionRequest]>('requestSession'),
  /** Progress and outcome from the session that holds the replica; ignored from any other. */
  reportSession: defineSignal<[SessionReport]>('reportSession'),
  releaseSession: defineSignal<[SessionReport]>('releaseSession'),
};

export const replicaQueries = {
  state: defineQuery<ReplicaView>('state'),
};

/** Sent to a session by its replica's entity when the session may start. */
export interface ReplicaGrant {
  state: ReplicaState;
  productionVm: VmLocation | null;
}
export const sessionGrantedSignal = defineSignal<[ReplicaGrant]>('sessionGranted');
