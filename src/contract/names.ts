import { defineSearchAttributeKey, SearchAttributeType } from '@temporalio/common';

/** The task queue every orchestrator worker polls. Part of the public contract: users type it. */
export const TASK_QUEUE = 'planned-failover';

/** Workflow types of the public contract. */
export const WorkflowTypes = {
  plannedFailover: 'plannedFailover',
} as const;

/** Custom search attributes, registered when the server starts (see scripts/temporal-server.ts). */
export const SearchAttributes = {
  FailoverVm: defineSearchAttributeKey('FailoverVm', SearchAttributeType.KEYWORD),
  FailoverJob: defineSearchAttributeKey('FailoverJob', SearchAttributeType.KEYWORD),
  ReplicaState: defineSearchAttributeKey('ReplicaState', SearchAttributeType.KEYWORD),
  FailoverStep: defineSearchAttributeKey('FailoverStep', SearchAttributeType.KEYWORD),
} as const;

/** Failure types a client can branch on (ApplicationFailure.type). */
export const FailureTypes = {
  invalidInput: 'InvalidInput',
  notYetSupported: 'NotYetSupported',
} as const;
