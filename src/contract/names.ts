import { defineSearchAttributeKey, SearchAttributeType } from '@temporalio/common';

/** The task queue every orchestrator worker polls. Part of the public contract: users type it. */
export const TASK_QUEUE = 'planned-failover';

/** Workflow types of the public contract. */
export const WorkflowTypes = {
  plannedFailover: 'plannedFailover',
  /** One run of a replication job: a session per VM. */
  replicationJob: 'replicationJob',
  /** One VM's replication session (a child of a job run). */
  replicationSession: 'replicationSession',
  /** One VM's planned failover session (a child of plannedFailover). */
  plannedFailoverSession: 'plannedFailoverSession',
  /** One operation on a replica (undo, failback, ...), a child of the replica's entity. */
  replicaOperation: 'replicaOperation',
  /** The long-lived entity of one replica, id replica/<vm>. */
  replica: 'replica',
  /** The registry of proxy task slots, id proxy-slots. */
  proxySlots: 'proxySlots',
  /** The registry of signed requests' nonces, id request-nonces. */
  requestNonces: 'requestNonces',
} as const;

/** Custom search attributes, registered when the server starts (see scripts/temporal-server.ts). */
export const SearchAttributes = {
  FailoverVm: defineSearchAttributeKey('FailoverVm', SearchAttributeType.KEYWORD),
  FailoverJob: defineSearchAttributeKey('FailoverJob', SearchAttributeType.KEYWORD),
  ReplicaState: defineSearchAttributeKey('ReplicaState', SearchAttributeType.KEYWORD),
  FailoverStep: defineSearchAttributeKey('FailoverStep', SearchAttributeType.KEYWORD),
  /** The verified requester of a planned failover, job run, operation or decision. */
  FailoverRequestedBy: defineSearchAttributeKey('FailoverRequestedBy', SearchAttributeType.KEYWORD),
} as const;

/** Failure types a client can branch on (ApplicationFailure.type). */
export const FailureTypes = {
  invalidInput: 'InvalidInput',
  proxyWaitTimedOut: 'ProxyWaitTimedOut',
  configuration: 'ConfigurationError',
  hypervisor: 'HypervisorError',
  /** The requester is unknown, or lacks the roles an operation needs. */
  accessDenied: 'AccessDenied',
  /** The request's signature, time or nonce did not prove its requester: unsigned, forged, expired or replayed. */
  requestNotVerified: 'RequestNotVerified',
  /** Some VMs of a planned failover did not fail over; the details carry the per-VM outcome. */
  plannedFailoverIncomplete: 'PlannedFailoverIncomplete',
  /** The request is valid, but the replica's state does not allow it. */
  wrongState: 'WrongState',
  /** Another session or operation held the replica for longer than the requester would wait. */
  replicaBusy: 'ReplicaBusy',
  /** A copy did not match its source: the data is not what it was copied from. */
  verificationFailed: 'VerificationFailed',
  /** Every VM moved, but zero data loss was not proven for some: a mismatch, or a comparison that could not run. */
  zeroDataLossUnproven: 'ZeroDataLossUnproven',
  /**
   * An update waited for an operation that is still queued when the entity had to continue as new; the operation
   * stays queued and its outcome will be in the replica's `lastRun`.
   */
  stillQueued: 'StillQueued',
} as const;
