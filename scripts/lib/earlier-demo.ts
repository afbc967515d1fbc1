// What a demo run finds of earlier runs on the same state, and how it brings every replica back to Ready. Only the
// public contract is used (workflow types, updates, the state query, search attributes), so that this keeps
// working while the workflows behind it change.
import { setTimeout as delay } from 'node:timers/promises';
import { WorkflowNotFoundError, type Client, type WorkflowExecutionInfo } from '@temporalio/client';
import {
  haltedSessionUpdates,
  operationUpdates,
  replicaQueries,
  replicaWorkflowId,
  SearchAttributes,
  WorkflowTypes,
  type ReplicaView,
} from '../../src/contract';
import type { HypervisorPort } from '../../src/hypervisor/port';
import { describeError } from './errors';

const who = { requestedBy: 'alice', reason: 'demo: finish what an earlier run left' };

const runningFailovers =
  `(WorkflowType="${WorkflowTypes.plannedFailover}" OR WorkflowType="${WorkflowTypes.plannedFailoverSession}")` +
  ' AND ExecutionStatus="Running"';
const haltedSessions = `WorkflowType="${WorkflowTypes.plannedFailoverSession}" AND ExecutionStatus="Running" AND FailoverStep="Halted"`;

export interface EarlierDemoOptions {
  client: Client;
  /** The lab, to power on source VMs that an earlier run left off. */
  hypervisor: HypervisorPort;
  vms: string[];
  print: (line: string) => void;
  /** The commands that delete the demo's state, for what cannot be brought back. */
  freshStart: string;
  /** A Temporal CLI command line with these arguments, against the demo's server. */
  temporalCommand: (args: string) => string;
  /** How long planned failovers of an earlier run may take to finish. */
  waitMs?: number;
}

/**
 * Brings every demo VM's replica back to Ready, whatever earlier runs left: waits for their planned failovers
 * (aborting halted sessions), undoes failovers, commits failbacks and powers on source VMs left off. Throws, with
 * what to do, when a replica's state cannot be read or it was failed over permanently.
 */
export async function finishEarlierDemo(options: EarlierDemoOptions): Promise<void> {
  const { print } = options;
  let didSomething = await settleEarlierFailovers(options);

  const views = new Map<string, ReplicaView | undefined>();
  const unreadable: string[] = [];
  for (const vm of options.vms) {
    try {
      views.set(vm, await readState(options.client, vm));
    } catch (err) {
      unreadable.push(`  ${replicaWorkflowId(vm)}: ${describeError(err)}`);
    }
  }
  if (unreadable.length > 0) {
    throw new Error(
      [
        'The state of these replicas cannot be read, so the demo cannot bring them back to Ready:',
        ...unreadable,
        'If the workflows changed since the earlier run (its histories no longer replay), start afresh:',
        `  ${options.freshStart}`,
      ].join('\n'),
    );
  }
  const permanent = options.vms.filter((vm) => views.get(vm)?.state === 'PermanentFailover');
  if (permanent.length > 0) {
    throw new Error(
      `${permanent.join(', ')} failed over permanently in an earlier run: the replica became the production VM, ` +
        `which cannot be undone. To start the demo afresh:\n  ${options.freshStart}`,
    );
  }

  for (const vm of options.vms) {
    const view = views.get(vm);
    if (view && view.state !== 'Ready' && view.state !== 'Unseeded') {
      await bringToReady(options, vm);
      didSomething = true;
    }
  }
  if (await powerOnIdleSources(options)) didSomething = true;
  if (!didSomething) print('  Nothing to finish: every replica is Ready or was never replicated.');
}

/** Aborts halted sessions and waits, bounded, until no planned failover of an earlier run runs. */
async function settleEarlierFailovers(options: EarlierDemoOptions): Promise<boolean> {
  const { client, print } = options;
  const waitMs = options.waitMs ?? 180_000;
  const deadline = Date.now() + waitMs;
  const aborted = new Set<string>();
  let waitingFor = '';
  for (;;) {
    for await (const session of client.workflow.list({ query: haltedSessions })) {
      // Once each: visibility may still show Halted for a moment after the abort.
      if (aborted.has(session.workflowId)) continue;
      aborted.add(session.workflowId);
      const vm = session.typedSearchAttributes.get(SearchAttributes.FailoverVm) ?? session.workflowId;
      print(
        `  ${vm}: session ${session.workflowId} of an earlier run is halted in the critical window; aborting it...`,
      );
      const outcome = await client.workflow
        .getHandle(session.workflowId)
        .executeUpdate(haltedSessionUpdates.abort, { args: [who] })
        .then(
          (detail) => `aborted: ${detail}`,
          (err: unknown) => `abort refused (${describeError(err)}); it goes on by itself`,
        );
      print(`  ${vm}: ${outcome}`);
    }
    const running: WorkflowExecutionInfo[] = [];
    for await (const wf of client.workflow.list({ query: runningFailovers })) running.push(wf);
    if (running.length === 0) return aborted.size > 0 || waitingFor !== '';
    const described = running.map(describeRun).join(', ');
    if (Date.now() > deadline) {
      throw new Error(
        `Planned failovers of an earlier run still run after ${waitMs / 1000} s: ${described}.\n` +
          `Watch them in the Web UI, decide halted sessions, or terminate them ` +
          `(${options.temporalCommand('workflow terminate --workflow-id <id>')}), then run the demo again.`,
      );
    }
    // A line when a workflow starts or ends, not at each step: the Web UI shows those.
    const ids = running.map((wf) => wf.workflowId).join(' ');
    if (ids !== waitingFor) {
      print(`  Waiting (at most ${Math.round((deadline - Date.now()) / 1000)} s) for an earlier run's ${described}`);
      waitingFor = ids;
    }
    await delay(1_000);
  }
}

function describeRun(wf: WorkflowExecutionInfo): string {
  const vm = wf.typedSearchAttributes.get(SearchAttributes.FailoverVm);
  const step = wf.typedSearchAttributes.get(SearchAttributes.FailoverStep);
  return vm ? `session of ${vm}${step ? ` at ${step}` : ''}` : wf.workflowId;
}

/** The replica's view; undefined when its entity does not exist: a VM that was never replicated. */
async function readState(client: Client, vm: string): Promise<ReplicaView | undefined> {
  const attempts = 5;
  for (let attempt = 1; ; attempt++) {
    try {
      return await client.workflow.getHandle(replicaWorkflowId(vm)).query(replicaQueries.state);
    } catch (err) {
      if (err instanceof WorkflowNotFoundError) return undefined;
      // A worker that is still starting, or a busy server, answers a query late or not at all: ask again.
      if (attempt === attempts) throw new Error(`no answer to the state query after ${attempts} tries`, { cause: err });
      await delay(1_000 * attempt);
    }
  }
}

/** Undoes a failover or commits a failback, and reads the state again, until the replica is Ready. */
async function bringToReady(options: EarlierDemoOptions, vm: string): Promise<void> {
  const { client, print } = options;
  let view = await readState(client, vm);
  for (let round = 1; round <= 3 && view && view.state !== 'Ready'; round++) {
    const operation =
      view.state === 'Failover' ? 'undoFailover' : view.state === 'Failback' ? 'commitFailback' : undefined;
    if (!operation) throw new Error(`${vm}: the demo does not know how to bring a replica in state ${view.state} back`);
    print(`  ${vm}: its replica is in state ${view.state} from an earlier run; ${operation}...`);
    try {
      const outcome = await client.workflow
        .getHandle(replicaWorkflowId(vm))
        .executeUpdate(operationUpdates[operation], { args: [who] });
      print(`  ${vm}: ${outcome.detail}`);
    } catch (err) {
      // Another operation may have changed the state first: the state read next says what is left to do.
      print(`  ${vm}: ${operation} did not finish: ${describeError(err)}`);
    }
    view = await readState(client, vm);
  }
  if (view && view.state !== 'Ready') {
    throw new Error(`${vm}'s replica is still in state ${view.state}; see ${replicaWorkflowId(vm)} in the Web UI.`);
  }
}

/** Source VMs that are off while no session or operation holds their replica were left off: power them on. */
async function powerOnIdleSources(options: EarlierDemoOptions): Promise<boolean> {
  const { client, hypervisor, print } = options;
  let poweredOn = false;
  for (const host of await hypervisor.listHosts()) {
    if (host.role !== 'production') continue;
    for (const vm of await hypervisor.listVms(host.name)) {
      if (vm.kind !== 'source' || vm.powerState !== 'Off' || !options.vms.includes(vm.name)) continue;
      const view = await readState(client, vm.name);
      const holder = view?.currentSession ?? view?.waitingSessions[0];
      if (holder) {
        print(`  ${vm.name}: off, and ${holder.workflowId} holds its replica; left as it is.`);
        continue;
      }
      await hypervisor.powerOn({ host: host.name, vm: vm.name });
      print(`  ${vm.name}: was off with no workflow holding it; powered on.`);
      poweredOn = true;
    }
  }
  return poweredOn;
}
