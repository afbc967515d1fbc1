// What the planned-failover tests share: starting a failover, finding a session at a step, halting one in its
// critical window, and whole-disk images of a source VM and of a replica's views, for byte comparisons.
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { WorkflowFailedError, type Client, type WorkflowHandle } from '@temporalio/client';
import { ApplicationFailure } from '@temporalio/common';
import { replicaNameOf } from '../src/activities/inventory';
import {
  replicaQueries,
  replicaWorkflowId,
  sessionQueries,
  TASK_QUEUE,
  WorkflowTypes,
  type PlannedFailoverResult,
  type ReplicaView as ReplicaEntityView,
} from '../src/contract';
import type { ReplicaView } from '../src/hypervisor/port';
import type { LabFault } from '../src/hypervisor/host-api-adapter';
import { within } from './harness';
import { assemble, DR, PROD, type TestLab } from './lab/helpers';

export interface Disk {
  id: string;
  size: number;
}

export const startFailover = (client: Client, input: unknown): Promise<WorkflowHandle> =>
  client.workflow.start(WorkflowTypes.plannedFailover, {
    taskQueue: TASK_QUEUE,
    workflowId: `pf-${randomUUID()}`,
    args: [input],
  });

/** The failure a workflow ended with; fails the test if it completed. */
export async function failureOf(handle: WorkflowHandle): Promise<ApplicationFailure> {
  const err: unknown = await handle.result().then(
    () => undefined,
    (e: unknown) => e,
  );
  assert.ok(err instanceof WorkflowFailedError && err.cause instanceof ApplicationFailure, String(err));
  return err.cause;
}

/** The per-VM outcome a failed plannedFailover carries. */
export async function resultOfFailed(handle: WorkflowHandle): Promise<PlannedFailoverResult> {
  const failure = await failureOf(handle);
  return failure.details?.[0] as PlannedFailoverResult;
}

/** The running planned-failover session of `vm`, once it shows `step` (FailoverStep). */
export async function sessionAt(client: Client, vm: string, step: string, ms = 60_000): Promise<WorkflowHandle> {
  return within(`a session of ${vm} at ${step}`, ms, async () => {
    for await (const wf of client.workflow.list({
      query: `FailoverVm="${vm}" AND FailoverStep="${step}" AND ExecutionStatus="Running" AND WorkflowType="${WorkflowTypes.plannedFailoverSession}"`,
    }))
      return client.workflow.getHandle(wf.workflowId);
    return undefined;
  });
}

/** The session's halt waiting for a decision now, from its progress query (no visibility lag). */
export async function haltOf(session: WorkflowHandle, ms = 60_000) {
  return within(`${session.workflowId} to halt`, ms, async () => {
    const progress = await session.query(sessionQueries.progress);
    return progress.halted ?? undefined;
  });
}

/**
 * Starts a planned failover of `vm` and halts it in its critical window: the fault goes on the host once the
 * session powers the source off, and stays until the caller clears it (or is cleared at once with `clear`).
 */
export async function haltedSession(
  client: Client,
  lab: TestLab,
  vm: string,
  fault: { host: string; fault: LabFault; at?: string } = { host: DR, fault: { kind: 'fail' } },
  options: { clear?: boolean; input?: object } = {},
): Promise<{ handle: WorkflowHandle; session: WorkflowHandle; halt: { id: number; step: string; reason: string } }> {
  const handle = await startFailover(client, {
    vms: [vm],
    reason: 'critical window',
    requestedBy: 'alice',
    ...options.input,
  });
  await sessionAt(client, vm, fault.at ?? 'PoweringOffSource');
  await lab.control.setFault(fault.host, fault.fault);
  const session = await sessionAt(client, vm, 'Halted');
  const halt = await haltOf(session);
  if (options.clear ?? true) await lab.control.clearFaults(fault.host);
  return { handle, session, halt };
}

export const entityState = (client: Client, vm: string): Promise<ReplicaEntityView> =>
  client.workflow.getHandle(replicaWorkflowId(vm)).query(replicaQueries.state);

/** Every disk of a source VM as it is now (through a checkpoint of its own). */
export async function sourceImage(lab: TestLab, vm: string, disks: readonly Disk[], host = PROD): Promise<Buffer[]> {
  const checkpointId = `test-${randomUUID()}`;
  const ref = { host, vm };
  await lab.port.createCheckpoint(ref, checkpointId);
  try {
    return await Promise.all(
      disks.map((d) =>
        assemble(lab.port.readExtents({ ...ref, disk: d.id }, checkpointId, [{ offset: 0, length: d.size }]), d.size),
      ),
    );
  } finally {
    await lab.port.deleteCheckpoint(ref, checkpointId);
  }
}

/** Every disk of a replica through one of its views: a restore point, or its running state. */
export const replicaImage = (lab: TestLab, vm: string, disks: readonly Disk[], view: ReplicaView): Promise<Buffer[]> =>
  Promise.all(
    disks.map((d) =>
      assemble(
        lab.port.readReplicaExtents({ host: DR, replica: replicaNameOf(vm), disk: d.id }, view, [
          { offset: 0, length: d.size },
        ]),
        d.size,
      ),
    ),
  );

export const sameImages = (a: Buffer[], b: Buffer[]): boolean =>
  a.length === b.length && a.every((x, i) => x.equals(b[i]!));

export const powerOf = async (lab: TestLab, vm: string, host = PROD): Promise<string> =>
  (await lab.port.getVm({ host, vm })).powerState;

export const replicaOnHost = (lab: TestLab, vm: string) =>
  lab.port.getReplica({ host: DR, replica: replicaNameOf(vm) });
