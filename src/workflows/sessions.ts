// What every session does around its own work: hold the replica, lease proxy slots, and always give both back.
import {
  ApplicationFailure,
  CancellationScope,
  condition,
  getExternalWorkflowHandle,
  log,
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
  type ReplicaGrant,
  type SessionRef,
  type SessionReport,
  type SlotLease,
} from '../contract';
import type { Activities } from '../activities';
import type { ReplicationTarget } from '../activities/inventory';
import type { CopyDiskResult, CopySource, CopyVerification } from '../activities/replication';
import { control, copyOptions, failureMessage, showStep, withSummary } from './common';

/**
 * How often a waiting session asks again. The entity or the registry may have been terminated and started afresh
 * meanwhile, knowing nothing of the first request; asking again is harmless to one that still has it.
 */
const ASK_AGAIN_MS = 60_000;

/**
 * Waits, visibly, until the replica's entity grants this session the replica, for at most `waitLimitSeconds`;
 * returns the replica's state and the VM that runs production for it.
 */
export async function acquireReplica(
  vm: string,
  job: string,
  session: Omit<SessionRef, 'workflowId'>,
  waitLimitSeconds: number,
): Promise<ReplicaGrant> {
  let grant: ReplicaGrant | undefined;
  setHandler(sessionGrantedSignal, (g) => {
    grant ??= g;
  });
  showStep('WaitingForReplica', `waiting until no other session works on ${vm}`);
  const request = { vm, job, session: { ...session, workflowId: workflowInfo().workflowId, job } };
  const ask = () => withSummary(control.requestReplicaSession, `Ask replica/${vm} for its turn`, [request]);
  await ask();
  const deadline = Date.now() + waitLimitSeconds * 1000;
  while (!grant) {
    const left = deadline - Date.now();
    if (left <= 0) {
      await releaseReplica(vm, { sessionId: session.sessionId });
      throw ApplicationFailure.create({
        type: FailureTypes.replicaBusy,
        message: `replica/${vm} was busy with another session or operation for ${waitLimitSeconds} s`,
        nonRetryable: true,
      });
    }
    if (!(await condition(() => grant !== undefined, Math.min(left, ASK_AGAIN_MS)))) await ask();
  }
  return grant;
}

export async function reportToReplica(vm: string, report: SessionReport): Promise<void> {
  await getExternalWorkflowHandle(replicaWorkflowId(vm)).signal(replicaSignals.reportSession, report);
}

/**
 * Gives the replica back, also from a cancelled session. A failure to signal (the entity is gone) must not turn
 * the session's own result into a failure: a new entity rebuilds its state and takes the replica back by itself.
 */
export async function releaseReplica(vm: string, report: SessionReport): Promise<void> {
  await CancellationScope.nonCancellable(() =>
    getExternalWorkflowHandle(replicaWorkflowId(vm)).signal(replicaSignals.releaseSession, report),
  ).catch((err: unknown) => log.warn('Could not give the replica back', { vm, error: failureMessage(err) }));
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
  const ask = () =>
    withSummary(control.requestProxySlots, `Ask for ${wish.slots} proxy slot(s)`, [
      { ...request, workflowId: workflowInfo().workflowId },
    ]);
  await ask();
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
    const granted = await condition(() => leases !== undefined, Math.min(left, ASK_AGAIN_MS), {
      summary: 'Waiting for a free proxy slot',
    });
    if (!granted) await ask();
  }
  return leases;
}

/** Gives the slots back (or withdraws the request); like releaseReplica, never fails the session. */
export async function releaseProxySlots(sessionId: string): Promise<void> {
  await CancellationScope.nonCancellable(() =>
    getExternalWorkflowHandle(PROXY_REGISTRY_WORKFLOW_ID).signal(proxySignals.releaseSlots, { sessionId }),
  ).catch((err: unknown) => log.warn('Could not give the proxy slots back', { sessionId, error: failureMessage(err) }));
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
  /** The DR host proves each block against the source's digest of it as it stores it (CopyDiskInput.verify). */
  verify?: boolean;
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
          ...(p.verify ? { verify: true } : {}),
        },
      ],
      { ...options, taskQueue: lease.taskQueue },
    );
  });
}

export const bytesOf = (copies: readonly CopyDiskResult[]): number => copies.reduce((n, c) => n + c.bytesCopied, 0);

/**
 * The proof verified copies carry together, and what it covers (the blocks change tracking named, or those whose
 * digests differed); none unless every disk's copy was verified as it was stored.
 */
export function storedProofOf(
  copies: readonly CopyDiskResult[],
): (CopyVerification & { method: 'tracked-blocks' | 'all-blocks' }) | undefined {
  if (copies.length === 0 || copies.some((c) => c.verification === undefined)) return undefined;
  return {
    blocksCompared: copies.reduce((n, c) => n + c.verification!.blocksCompared, 0),
    mismatchedBlocks: copies.reduce((n, c) => n + c.verification!.mismatchedBlocks, 0),
    method: copies.every((c) => c.mode === 'tracked') ? 'tracked-blocks' : 'all-blocks',
  };
}
