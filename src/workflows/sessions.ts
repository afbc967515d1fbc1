// What every session does around its own work: hold the replica, lease proxy slots, and always give both back.
import {
  ApplicationFailure,
  CancellationScope,
  condition,
  getExternalWorkflowHandle,
  proxyActivities,
  setHandler,
  workflowInfo,
  type ActivityOptions,
} from '@temporalio/workflow';
import {
  FailureTypes,
  PROXY_REGISTRY_WORKFLOW_ID,
  proxySignals,
  replicaSignals,
  replicaWorkflowId,
  sessionGrantedSignal,
  slotsGrantedSignal,
  type ProxyDeclaration,
  type SessionReport,
  type SessionRef,
  type SlotLease,
} from '../contract';
import type { ReplicaState } from '../domain/replica-state';
import type { Activities } from '../activities';
import type { ReplicationTarget } from '../activities/inventory';
import type { CopyDiskResult, CopySource } from '../activities/replication';
import { control, copyOptions, showStep, withSummary } from './common';

/** Waits, visibly, until the replica's entity grants this session the replica; returns the replica's state. */
export async function acquireReplica(
  vm: string,
  job: string,
  session: Omit<SessionRef, 'workflowId'>,
): Promise<ReplicaState> {
  let state: ReplicaState | undefined;
  setHandler(sessionGrantedSignal, (grant) => {
    state ??= grant.state;
  });
  showStep('WaitingForReplica', `waiting until no other session works on ${vm}`);
  await withSummary(control.requestReplicaSession, `Ask replica/${vm} for its turn`, [
    { vm, job, session: { ...session, workflowId: workflowInfo().workflowId } },
  ]);
  await condition(() => state !== undefined);
  return state!;
}

export async function reportToReplica(vm: string, report: SessionReport): Promise<void> {
  await getExternalWorkflowHandle(replicaWorkflowId(vm)).signal(replicaSignals.reportSession, report);
}

export async function releaseReplica(vm: string, report: SessionReport): Promise<void> {
  await CancellationScope.nonCancellable(() =>
    getExternalWorkflowHandle(replicaWorkflowId(vm)).signal(replicaSignals.releaseSession, report),
  );
}

export interface SlotWish {
  sessionId: string;
  slots: number;
  proxies: string[] | 'auto';
  declared: ProxyDeclaration[];
  waitLimitSeconds: number;
}

/**
 * Leases proxy slots, waiting with durable timers while none are free. The wait is visible (FailoverStep
 * WaitingForProxy, a summary on each timer) and ends with a clear failure at the limit.
 */
export async function leaseProxySlots(wish: SlotWish): Promise<SlotLease[]> {
  let leases: SlotLease[] | undefined;
  setHandler(slotsGrantedSignal, (grant) => {
    leases ??= grant.leases;
  });
  const { waitLimitSeconds, ...request } = wish;
  await withSummary(control.requestProxySlots, `Ask for ${wish.slots} proxy slot(s)`, [
    { ...request, workflowId: workflowInfo().workflowId },
  ]);
  const deadline = Date.now() + waitLimitSeconds * 1000;
  while (!leases) {
    const left = deadline - Date.now();
    if (left <= 0) {
      await releaseProxySlots(wish.sessionId);
      throw ApplicationFailure.create({
        type: FailureTypes.proxyWaitTimedOut,
        message: `No proxy slot became free within ${waitLimitSeconds} s`,
        nonRetryable: true,
      });
    }
    showStep('WaitingForProxy', `waiting for ${wish.slots} free proxy slot(s), up to ${Math.ceil(left / 1000)} s more`);
    await condition(() => leases !== undefined, Math.min(left, 60_000), { summary: 'Waiting for a free proxy slot' });
  }
  return leases;
}

export async function releaseProxySlots(sessionId: string): Promise<void> {
  await CancellationScope.nonCancellable(() =>
    getExternalWorkflowHandle(PROXY_REGISTRY_WORKFLOW_ID).signal(proxySignals.releaseSlots, { sessionId }),
  );
}

/** Runs one task per item with at most `lanes` at a time, in order: the disks of a VM over its leased slots. */
export async function inLanes<T, R>(
  items: readonly T[],
  lanes: readonly SlotLease[],
  task: (item: T, lane: SlotLease) => Promise<R>,
): Promise<R[]> {
  const results: R[] = new Array<R>(items.length);
  let next = 0;
  await Promise.all(
    lanes.map(async (lane) => {
      while (next < items.length) {
        const i = next++;
        results[i] = await task(items[i]!, lane);
      }
    }),
  );
  return results;
}

/**
 * Copies every disk's changed blocks into an open restore point, one disk per leased proxy slot at a time,
 * each copy on its proxy's task queue.
 */
export async function copyDisks(p: {
  vm: string;
  target: ReplicationTarget;
  leases: readonly SlotLease[];
  source: CopySource;
  pointId: string;
  replicaHeadPointId: string | null;
  options?: ActivityOptions;
}): Promise<CopyDiskResult[]> {
  const options = p.options ?? copyOptions;
  return inLanes(p.target.disks, p.leases, (disk, lease) => {
    const onProxy = proxyActivities<Activities>({ ...options, taskQueue: lease.taskQueue });
    return withSummary(
      onProxy.copyDisk,
      `Copy changed blocks of ${p.vm}/${disk.id} via ${lease.proxy}`,
      [
        {
          source: p.source,
          disk,
          replica: p.target.replica,
          pointId: p.pointId,
          replicaHeadPointId: p.replicaHeadPointId,
        },
      ],
      { ...options, taskQueue: lease.taskQueue },
    );
  });
}

export const bytesOf = (copies: readonly CopyDiskResult[]): number => copies.reduce((n, c) => n + c.bytesCopied, 0);
