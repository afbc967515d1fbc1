// The invariants checked after every round, from the DR and production hosts' data, the recorder's log of what
// the hosts were told, and Temporal's histories and visibility: never from a workflow's own report.
import { setTimeout as delay } from 'node:timers/promises';
import { WorkflowFailedError, type Client } from '@temporalio/client';
import { ApplicationFailure } from '@temporalio/common';
import { replicaNameOf } from '../../src/activities/inventory';
import {
  FailureTypes,
  PROXY_REGISTRY_WORKFLOW_ID,
  proxyQueries,
  WorkflowTypes,
  type PlannedFailoverSessionResult,
  type ReplicaView,
  type ReplicationJobResult,
} from '../../src/contract';
import { stateFromHost, type ReplicaState } from '../../src/domain/replica-state';
import { PointMetadata } from '../../src/domain/restore-points';
import type { HypervisorPort, ReplicaInfo } from '../../src/hypervisor/port';
import { jobOf, type ChaosEstate } from './estate';
import type { ChaosHosts } from './hosts';
import { pointDigest } from './images';
import type { Recorder } from './recorder';

/** What the suite remembers across rounds: the points it saw and checked, and what it did itself. */
export class Ledger {
  /** Sealed point ids per VM at the end of the last round, oldest first. */
  readonly points = new Map<string, string[]>();
  /**
   * Points above the head of a replica that runs from an older point (a regular failover): the DR host drops that
   * abandoned branch when the running state is sealed (failback), so they may go.
   */
  readonly abandoned = new Map<string, Set<string>>();
  /** Points that were on a host once and are gone: none of them may come back. */
  readonly gone = new Set<string>();
  readonly verifiedPoints = new Set<string>();
  /** VMs whose replica runs from a regular failover (production may run beside it: other data). */
  readonly regularFailover = new Set<string>();
  /** Runs the suite terminated or reset itself: `workflowId/runId`. */
  readonly endedBySuite = new Set<string>();
  /** Power records already checked. */
  powerChecked = 0;
  /**
   * Helper point 1 of each session forced to fail over to it: a replica running from one of these runs from data
   * older than its source at power-off, as its session said (a later refused request may be the entity's last run).
   */
  readonly forcedToHelper1 = new Set<string>();
}

export interface Check {
  name: string;
  ok: boolean;
  detail?: string;
}

export class Checks {
  readonly list: Check[] = [];
  /** How many times each invariant was checked. */
  readonly byName: Record<string, number> = {};
  count = 0;

  check(name: string, ok: boolean, detail?: string): void {
    this.count++;
    this.byName[name] = (this.byName[name] ?? 0) + 1;
    if (!ok) this.list.push({ name, ok, detail });
  }

  get violations(): Check[] {
    return this.list;
  }
}

export const CLOSING_RUN_PREFIX = 'job-closing-';
/** The registry's longest wait between two checks of its holders (src/workflows/holders.ts), and some slack. */
const HOLDER_CHECK_BOUND_MS = 5 * 60_000 + 30_000;
const TERMINAL_OK = new Set(['COMPLETED', 'CONTINUED_AS_NEW']);
const KNOWN_FAILURES = new Set<string>(Object.values(FailureTypes));
const ROUND_TYPES = [
  WorkflowTypes.plannedFailover,
  WorkflowTypes.plannedFailoverSession,
  WorkflowTypes.replicationJob,
  WorkflowTypes.replicationSession,
  WorkflowTypes.replicaOperation,
];

/** Every workflow the round started ended in a way that leaves a state an operator can act on. */
export async function checkWorkflows(client: Client, since: Date, ledger: Ledger, checks: Checks): Promise<number> {
  const types = ROUND_TYPES.map((t) => `"${t}"`).join(', ');
  let seen = 0;
  for await (const wf of client.workflow.list({
    query: `WorkflowType IN (${types}) AND StartTime >= "${since.toISOString()}"`,
  })) {
    // The closing job runs are checked through their results (and run after the settle, so may still show).
    if ([wf.workflowId, wf.parentExecution?.workflowId].some((w) => w?.startsWith(CLOSING_RUN_PREFIX))) continue;
    seen++;
    const id = `${wf.workflowId}/${wf.runId}`;
    const status = wf.status.name;
    const parent = wf.parentExecution ? `${wf.parentExecution.workflowId}/${wf.parentExecution.runId}` : undefined;
    const bySuite = ledger.endedBySuite.has(id) || (parent !== undefined && ledger.endedBySuite.has(parent));
    if (TERMINAL_OK.has(status)) continue;
    if (status === 'TERMINATED' || status === 'CANCELLED') {
      checks.check('workflow ended by the suite only', bySuite, `${wf.type} ${id} is ${status}`);
      continue;
    }
    if (status === 'FAILED') {
      const failure: unknown = await client.workflow
        .getHandle(wf.workflowId, wf.runId)
        .result()
        .then(
          () => undefined,
          (e: unknown) => e,
        );
      const cause = failure instanceof WorkflowFailedError ? failure.cause : undefined;
      const type = typeOf(cause);
      checks.check(
        'workflow failed with a typed reason',
        type !== undefined || bySuite,
        `${wf.type} ${id} failed untyped: ${cause?.message ?? String(failure)}`,
      );
      continue;
    }
    checks.check('workflow settled', false, `${wf.type} ${id} is ${status}`);
  }
  return seen;
}

/** The type of the first ApplicationFailure in the cause chain (an activity's failure carries the host's). */
function typeOf(failure: unknown): string | undefined {
  for (let f = failure; f instanceof Error; f = f.cause) {
    if (f instanceof ApplicationFailure && f.type)
      return KNOWN_FAILURES.has(f.type) || f.type.includes('Error') ? f.type : undefined;
  }
  return undefined;
}

export interface HostFacts {
  production: { powerState: string } | null;
  replica: ReplicaInfo | null;
}

export async function hostFacts(port: HypervisorPort, estate: ChaosEstate, vm: string): Promise<HostFacts> {
  const production = await port.getVm({ host: estate.productionHost, vm });
  const replica = await port.getReplica({ host: estate.drHost, replica: replicaNameOf(vm) }).catch((e: unknown) => {
    if (e instanceof Error && /not found|404/i.test(e.message)) return null;
    throw e;
  });
  return { production, replica };
}

const sealedOf = (r: ReplicaInfo | null) => (r?.points ?? []).filter((p) => p.sealed);

/** One VM after the round: its entity, its hosts, its points and its data. */
export async function checkVm(
  hosts: ChaosHosts,
  recorder: Recorder,
  ledger: Ledger,
  checks: Checks,
  vm: string,
  view: ReplicaView,
  facts: HostFacts,
  /** The entity's view once the round settled, before the closing job run became its last run. */
  settledView: ReplicaView,
): Promise<void> {
  const { production, replica } = facts;
  const state = view.state;
  const { estate, direct } = hosts;
  const disks = estate.vmDisks[vm]!;
  const sealed = sealedOf(replica);
  // A failed operation leaves its state for the operator to finish (an undo whose power-on was refused stays in
  // Failover, to be undone again), and the entity's lastRun says so.
  const failed = settledView.lastRun?.outcome.includes('failed') ?? false;

  // The entity agrees with the DR host.
  if (replica) {
    const fromHost: ReplicaState = stateFromHost(
      {
        exists: true,
        sealedPoints: sealed.length,
        consolidated: replica.consolidated,
        hasRunningLayer: replica.hasRunningLayer,
        powerState: replica.powerState,
        headKind: sealed.find((p) => p.id === replica.headPointId)?.kind ?? null,
      },
      state === 'Failback' ? 'Failback' : null,
    );
    // A failback cut off after it sealed its protective point leaves the replica off on it; the entity stays in
    // Failover with the unfinished failback named, for the next failback to finish from that point.
    const cutOffFailback =
      state === 'Failover' &&
      view.unfinishedFailback != null &&
      fromHost === 'Ready' &&
      sealed.find((p) => p.id === replica.headPointId)?.kind === 'failback-protective';
    checks.check(
      'entity state matches the DR host',
      fromHost === state || failed || cutOffFailback,
      `${vm}: entity ${state}, host ${fromHost}; last run ${settledView.lastRun?.kind}: ${settledView.lastRun?.outcome}`,
    );
  } else checks.check('entity state matches the DR host', state === 'Unseeded', `${vm}: entity ${state}, no replica`);

  // Power: never both on the same data, never both off with nothing saying why.
  const prodOn = production?.powerState !== 'Off';
  const replicaOn = replica !== null && replica.powerState !== 'Off';
  if (state === 'Ready' || state === 'Unseeded') ledger.regularFailover.delete(vm);
  checks.check(
    'production and replica never run on the same data',
    !(prodOn && replicaOn) || ledger.regularFailover.has(vm),
    `${vm}: production ${production?.powerState}, replica ${replica?.powerState}, state ${state}`,
  );
  const offWithReason = state === 'Failback' || view.attention !== null || failed;
  checks.check(
    'no VM left off without a workflow that says so',
    prodOn || replicaOn || offWithReason,
    `${vm}: production and replica both off in state ${state}`,
  );
  if ((state === 'Ready' || state === 'Unseeded') && !prodOn)
    checks.check(
      'a Ready VM runs in production',
      view.attention !== null || failed,
      `${vm}: production off, no attention`,
    );

  // Points: none lost but the oldest (retention) or all (permanent failover), none duplicated, none back.
  const before = ledger.points.get(vm) ?? [];
  const now = sealed.map((p) => p.id);
  const abandoned = ledger.abandoned.get(vm) ?? new Set<string>();
  const removed = before.filter((id) => !now.includes(id) && !abandoned.has(id));
  const prefix = before.filter((id) => !abandoned.has(id)).slice(0, removed.length);
  checks.check(
    'no restore point lost',
    state === 'PermanentFailover' || removed.every((id) => prefix.includes(id)),
    `${vm}: gone ${removed.join(', ')}, not the oldest of ${before.join(', ')}`,
  );
  const head = now.indexOf(replica?.headPointId ?? '');
  if (replica?.hasRunningLayer && head >= 0) ledger.abandoned.set(vm, new Set(now.slice(head + 1)));
  else if (!replica?.hasRunningLayer) ledger.abandoned.delete(vm);
  for (const id of removed) ledger.gone.add(id);
  checks.check(
    'nothing gone comes back',
    now.every((id) => !ledger.gone.has(id)),
    `${vm}: ${now.filter((id) => ledger.gone.has(id)).join(', ')} came back`,
  );
  const fromCheckpoint = sealed.map((p) => p.metadata[PointMetadata.sourceCheckpoint]).filter((c) => c);
  checks.check(
    'no restore point duplicated',
    new Set(fromCheckpoint).size === fromCheckpoint.length && new Set(now).size === now.length,
    `${vm}: ${fromCheckpoint.join(', ')}`,
  );
  ledger.points.set(vm, now);

  // Data: every new point equals the checkpoint it was copied from, byte for byte.
  for (const point of sealed) {
    if (ledger.verifiedPoints.has(point.id)) continue;
    const checkpoint = point.metadata[PointMetadata.sourceCheckpoint];
    const taken = checkpoint ? recorder.checkpoints.get(checkpoint) : undefined;
    if (!taken) continue;
    const digest = await pointDigest(direct, estate.drHost, vm, disks, point.id);
    checks.check(
      'each point equals its checkpoint, byte for byte',
      taken.digests.includes(digest),
      `${vm}: ${point.id} from ${checkpoint}`,
    );
    ledger.verifiedPoints.add(point.id);
  }

  // After a planned failover the replica started from exactly the powered-off source; after a failback that did
  // not power production on, production holds exactly the failback-protective point.
  if (!prodOn && replica) {
    // A failover forced to helper point 1 runs from data older than the source at power-off, and says so.
    const forcedOlder =
      ledger.forcedToHelper1.has(replica.headPointId ?? '') ||
      /forced failover to helper restore point 1/.test(settledView.lastRun?.outcome ?? '');
    const expected =
      state === 'Failover' && settledView.lastRun?.kind === 'plannedFailover' && !forcedOlder
        ? replica.headPointId
        : state === 'Failback' && recorder.writtenSinceOff(vm)
          ? sealed.filter((p) => p.kind === 'failback-protective').at(-1)?.id
          : undefined;
    if (expected) {
      const [source, point] = await Promise.all([
        hosts.sourceImage(vm),
        pointDigest(direct, estate.drHost, vm, disks, expected),
      ]);
      checks.check(
        state === 'Failover' ? 'replica equals the powered-off source' : 'production equals the protective point',
        source === point,
        `${vm}: point ${expected}`,
      );
    }
  }
}

/** What the round's planned-failover sessions did, read once from their histories and results. */
export interface RoundSessions {
  /**
   * Per VM, the sessions that asked for its source's power-off. A reset run of a request is the request made again:
   * its new session may stop a source that an operator's abort of the old one powered on again.
   */
  stopsAsked: Map<string, number>;
  /** The helper point 1 of each session forced to fail over to it. */
  forcedToHelper1: string[];
}

/** The planned-failover sessions started since `since`, each read once. */
export async function roundSessions(client: Client, since: Date): Promise<RoundSessions> {
  const out: RoundSessions = { stopsAsked: new Map(), forcedToHelper1: [] };
  for await (const wf of client.workflow.list({
    query: `WorkflowType="${WorkflowTypes.plannedFailoverSession}" AND StartTime >= "${since.toISOString()}"`,
  })) {
    const handle = client.workflow.getHandle(wf.workflowId, wf.runId);
    const history = await handle.fetchHistory();
    const stops = history.events?.some(
      (e) => e.activityTaskScheduledEventAttributes?.activityType?.name === 'shutDownSource',
    );
    const vm = wf.workflowId.split('/')[1]!;
    if (stops) out.stopsAsked.set(vm, (out.stopsAsked.get(vm) ?? 0) + 1);
    if (wf.status.name !== 'COMPLETED') continue;
    const result = (await handle.result()) as PlannedFailoverSessionResult;
    if (result.outcome === 'forcedFailover' && result.dataLoss !== undefined && result.sessionId)
      out.forcedToHelper1.push(`rp-${result.sessionId}-helper1`);
  }
  return out;
}

/** No production VM was stopped more often than sessions asked for it: a stale or repeated stop is a violation. */
export function checkPower(
  estate: ChaosEstate,
  recorder: Recorder,
  ledger: Ledger,
  checks: Checks,
  asked: Map<string, number>,
): void {
  const fresh = recorder.power.slice(ledger.powerChecked);
  ledger.powerChecked = recorder.power.length;
  const stops = new Map<string, number>();
  for (const r of fresh) {
    if (r.host !== estate.productionHost || r.status >= 300) continue;
    const stopped = (r.action === 'shutdown' && r.outcome === 'off') || (r.action === 'off' && r.already === false);
    if (stopped) stops.set(r.vm, (stops.get(r.vm) ?? 0) + 1);
  }
  for (const [vm, n] of stops) {
    const sessions = asked.get(vm) ?? 0;
    checks.check(
      'a production VM is stopped once per request',
      n <= Math.max(1, sessions),
      `${vm}: ${n} stops, ${sessions} session(s) asked for one`,
    );
  }
  for (const r of recorder.takeResults()) checks.check(r.name, r.ok, r.detail);
}

/** No proxy slot leased once everything settled, and every proxy back online. */
export async function checkSlots(client: Client, checks: Checks): Promise<void> {
  // Once the round settled every lease is a dead holder's. The registry checks its holders less often the longer
  // they ran (at most every five minutes): it may take that long to find one that was terminated.
  const registry = client.workflow.getHandle(PROXY_REGISTRY_WORKFLOW_ID);
  const deadline = Date.now() + HOLDER_CHECK_BOUND_MS;
  let view = await registry.query(proxyQueries.slots);
  while (view.proxies.some((p) => p.leasedTo.length > 0) && Date.now() < deadline) {
    await delay(2_000);
    view = await registry.query(proxyQueries.slots);
  }
  for (const p of view.proxies) {
    checks.check('no proxy slot leaked', p.leasedTo.length === 0, `${p.name} leased to ${p.leasedTo.join(', ')}`);
    checks.check('every proxy online after the round', p.online, `${p.name} offline`);
  }
  checks.check('nobody waits for a slot', view.waiting.length === 0, `${view.waiting.length} waiting`);
}

/** The closing job run: every VM replicated, or skipped because its state says so; no entity wedged. */
export function checkClosingRun(
  estate: ChaosEstate,
  results: Map<string, ReplicationJobResult | Error>,
  views: Map<string, ReplicaView>,
  checks: Checks,
): void {
  for (const job of estate.jobs) {
    const result = results.get(job.name);
    if (!result || result instanceof Error) {
      checks.check('the closing job run completes', false, `${job.name}: ${result?.message ?? 'not run'}`);
      continue;
    }
    for (const vm of job.vms) {
      const session = result.sessions.find((s) => s.vm === vm);
      const state = views.get(vm)?.state;
      const expected = state === 'Ready' || state === 'Unseeded' ? 'replicated' : 'skipped';
      checks.check(
        'the closing job run serves every VM',
        session?.outcome === expected,
        `${vm} (${state}): ${session?.outcome ?? 'no session'} ${session?.detail ?? ''}`,
      );
    }
  }
}

/** After the closing job run, a Ready replica keeps no more points than its job's retention. */
export function checkRetention(
  estate: ChaosEstate,
  vm: string,
  facts: HostFacts,
  view: ReplicaView,
  checks: Checks,
): void {
  if (view.state !== 'Ready') return;
  const keep = jobOf(estate, vm).restorePoints;
  const n = sealedOf(facts.replica).length;
  checks.check('retention keeps the job’s number of points', n <= keep, `${vm}: ${n} points, keep ${keep}`);
}
