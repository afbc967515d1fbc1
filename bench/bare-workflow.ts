// The baseline of bench/overhead.ts: a bare Temporal workflow of five no-op activities, one after another.
import { proxyActivities } from '@temporalio/workflow';

export interface BareActivities {
  noop(step: number): Promise<void>;
}

const { noop } = proxyActivities<BareActivities>({ startToCloseTimeout: '1 minute' });

export async function bareWorkflow(): Promise<void> {
  for (let step = 1; step <= 5; step++) await noop(step);
}
