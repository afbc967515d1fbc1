import { defineQuery, defineUpdate } from '@temporalio/workflow';
import type { OperatorRequest } from './planned-failover';

/** Updates a halted planned-failover session accepts (the critical window between power-off and power-on). */
export const haltedSessionUpdates = {
  retry: defineUpdate<string, [OperatorRequest]>('retry'),
  abort: defineUpdate<string, [OperatorRequest]>('abort'),
  forceFailover: defineUpdate<string, [OperatorRequest]>('forceFailover'),
};

export interface SessionProgress {
  vm: string;
  step: string;
  detail: string;
  /** The halt waiting for a decision now (see HaltRecord), or null. */
  halted: { id: number; step: string; reason: string; since: string } | null;
}

export const sessionQueries = {
  progress: defineQuery<SessionProgress>('progress'),
};
