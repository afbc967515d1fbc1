// One round: operations chosen from each VM's state, faults at random moments while they run, halted sessions
// decided as an operator would, then healing, settling, a closing job run and the invariants.
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { setTimeout as delay } from 'node:timers/promises';
import { randomUUID } from 'node:crypto';
import type { Client } from '@temporalio/client';
import {
  haltedSessionUpdates,
  operationSignals,
  operationUpdates,
  PROXY_REGISTRY_WORKFLOW_ID,
  proxySignals,
  replicaQueries,
  replicaWorkflowId,
  sessionQueries,
  TASK_QUEUE,
  WorkflowTypes,
  type OperationName,
  type ReplicaView,
  type ReplicationJobResult,
} from '../../src/contract';
import { replicaNameOf } from '../../src/activities/inventory';
import type { HypervisorPort } from '../../src/hypervisor/port';
import { jobOf, OPERATOR, PROXIES, vmsOf } from './estate';
import { type ChaosHosts, type FaultContext, type FaultKind, type HostFaultKind, SUITE_FAULTS } from './hosts';
import {
  checkClosingRun,
  checkPower,
  roundSessions,
  checkRetention,
  checkSlots,
  checkVm,
  checkWorkflows,
  Checks,
  CLOSING_RUN_PREFIX,
  hostFacts,
  type Ledger,
} from './invariants';
import type { ChaosSite } from './processes';
import type { Chance } from './random';
import type { Recorder } from './recorder';

const run = promisify(execFile);

export interface World {
  client: Client;
  site: ChaosSite;
  hosts: ChaosHosts;
  /** The kinds of fault this run injects (the hosts' own and the suite's, or those the command line named). */
  faultKinds: readonly FaultKind[];
  recorder: Recorder;
  /** What the suite does as an operator on the hosts goes through the recorder, like the workers' calls. */
  operatorPort: HypervisorPort;
  cli: string;
  ledger: Ledger;
  /** Faults injected so far over the run, by kind: the rarest are picked first. */
  totals: Record<FaultKind, number>;
  log: (line: string) => void;
}

export interface RoundRecord {
  round: number;
  seed: number;
  operations: Record<string, number>;
  faults: Partial<Record<FaultKind, number>>;
  decisions: Record<string, number>;
  invariantsChecked: number;
  /** Checks by invariant. */
  checked: Record<string, number>;
  violations: { name: string; detail?: string }[];
  notes: string[];
  durationMs: number;
  /** Where the round's time went: its faults' window, healing, settling, the closing runs and the checks. */
  phasesMs: Record<string, number>;
}

const request = (why: string) => ({ requestedBy: OPERATOR, reason: `chaos: ${why}` });
const RUNNING_TYPES = [
  WorkflowTypes.plannedFailover,
  WorkflowTypes.plannedFailoverSession,
  WorkflowTypes.replicationJob,
  WorkflowTypes.replicationSession,
  WorkflowTypes.replicaOperation,
];
const runningQuery = `ExecutionStatus="Running" AND WorkflowType IN (${RUNNING_TYPES.map((t) => `"${t}"`).join(', ')})`;

const messageOf = (e: unknown): string => (e instanceof Error ? e.message : String(e));

async function attempt<T>(what: () => Promise<T>): Promise<T | undefined> {
  try {
    return await what();
  } catch {
    return undefined;
  }
}

/** The entity's view; undefined while the server or the worker is away, null when the replica has none yet. */
async function viewOf(client: Client, vm: string): Promise<ReplicaView | undefined> {
  return attempt(() => client.workflow.getHandle(replicaWorkflowId(vm)).query(replicaQueries.state));
}

async function views(client: Client, vms: string[], within = 120_000): Promise<Map<string, ReplicaView>> {
  const deadline = Date.now() + within;
  const out = new Map<string, ReplicaView>();
  for (;;) {
    for (const vm of vms) {
      if (out.has(vm)) continue;
      const view = await viewOf(client, vm);
      if (view) out.set(vm, view);
    }
    if (out.size === vms.length) return out;
    if (Date.now() > deadline)
      throw new Error(`no state from the entities of ${vms.filter((v) => !out.has(v)).join(', ')}`);
    await delay(1000);
  }
}

export class Round {
  readonly record: RoundRecord;
  private readonly started = new Date();
  private readonly updates: Promise<void>[] = [];
  private readonly timers: Promise<void>[] = [];

  constructor(
    private readonly w: World,
    private readonly chance: Chance,
    round: number,
  ) {
    this.record = {
      round,
      seed: chance.seed,
      operations: {},
      faults: {},
      decisions: {},
      invariantsChecked: 0,
      checked: {},
      violations: [],
      notes: [],
      durationMs: 0,
      phasesMs: {},
    };
  }

  get since(): Date {
    return this.started;
  }

  private get estate() {
    return this.w.hosts.estate;
  }

  private get vms(): string[] {
    return vmsOf(this.estate);
  }

  private count(into: Record<string, number>, key: string): void {
    into[key] = (into[key] ?? 0) + 1;
  }

  private note(line: string): void {
    this.record.notes.push(line);
    this.w.log(`  ${line}`);
  }

  // Operations -------------------------------------------------------------------------------------------------

  /** One operation per VM, chosen from its state as the entity and the hosts show it; started at once. */
  async startOperations(): Promise<void> {
    const c = this.chance;
    const { productionHost } = this.estate;
    const current = await views(this.w.client, this.vms);
    const failovers: string[] = [];
    const jobRuns = new Map<string, string[]>();
    for (const vm of this.vms) {
      const view = current.get(vm)!;
      const prod = await this.w.hosts.direct.getVm({ host: productionHost, vm });
      let op: string;
      if (view.state === 'Unseeded') op = 'jobRun';
      else if (view.state === 'Ready') op = c.weighted({ plannedFailover: 5, jobRun: 3, failover: 1, none: 1 });
      else if (view.state === 'Failover')
        op = c.weighted({
          undoFailover: 4,
          failback: 4,
          permanentFailover: this.estate.retirable.has(vm) ? 1 : 0,
          none: 1,
        });
      else if (view.state === 'Failback') op = c.weighted({ commitFailback: 1, undoFailback: 1 });
      else op = 'none';
      if (op === 'none') continue;
      this.count(this.record.operations, op);
      if (op === 'plannedFailover') failovers.push(vm);
      else if (op === 'jobRun') {
        const job = jobOf(this.estate, vm).name;
        jobRuns.set(job, [...(jobRuns.get(job) ?? []), vm]);
      } else {
        const payload: Record<string, unknown> = request(op);
        if (op === 'failover') {
          const points = view.restorePoints;
          payload.restorePointId = c.pick(points).id;
          this.w.ledger.regularFailover.add(vm);
        }
        if (op === 'permanentFailover') payload.confirm = true;
        if (op === 'commitFailback' && prod.powerState === 'Off') {
          // A failback without power-on: the operator starts production and looks at it before committing.
          this.note(`operator powers ${vm} on to check it before committing the failback`);
          await this.w.operatorPort.powerOn({ host: productionHost, vm });
        }
        if (op === 'failback') {
          payload.powerOnProduction = c.chance(0.7);
          payload.confirm = prod.powerState !== 'Off';
        }
        this.operate(vm, op as OperationName, payload);
      }
    }
    if (failovers.length > 0) {
      const preSync = c.chance(0.4) ? c.int(1, 3) : 0;
      if (preSync > 0) this.count(this.record.operations, 'preSyncPasses');
      await this.w.client.workflow.start(WorkflowTypes.plannedFailover, {
        taskQueue: TASK_QUEUE,
        workflowId: `pf-chaos-${randomUUID()}`,
        args: [
          {
            vms: failovers,
            ...request(`planned failover, round ${this.record.round}`),
            options: { preSyncMaxPasses: preSync, maxParallelJobs: c.int(1, 3), shutdownTimeoutSeconds: 10 },
          },
        ],
      });
    }
    for (const [job, vms] of jobRuns) {
      await this.w.client.workflow.start(WorkflowTypes.replicationJob, {
        taskQueue: TASK_QUEUE,
        workflowId: `job-chaos-${randomUUID()}`,
        args: [{ job, vms, ...request(`job run, round ${this.record.round}`) }],
      });
    }
  }

  /** Half by signal (fire and forget), half by update (the suite waits for the outcome in the background). */
  private operate(vm: string, op: OperationName, payload: object): void {
    const handle = this.w.client.workflow.getHandle(replicaWorkflowId(vm));
    if (this.chance.chance(0.5)) {
      this.updates.push(
        handle
          .signal(operationSignals[op], payload)
          .catch((e: unknown) => this.note(`${op} ${vm} signal: ${messageOf(e)}`)),
      );
      return;
    }
    this.updates.push(
      handle.executeUpdate(operationUpdates[op], { args: [payload] }).then(
        (o) => this.w.log(`  ${op} ${vm}: ${o.state} (${o.detail})`),
        (e: unknown) => this.note(`${op} ${vm} update: ${messageOf(e)}`),
      ),
    );
  }

  // Faults ------------------------------------------------------------------------------------------------------

  /** One to three faults, at random moments in the first seconds of the round; the rarest kinds first. */
  scheduleFaults(): void {
    const kinds = this.w.faultKinds;
    const n = this.chance.int(1, 3);
    for (let i = 0; i < n; i++) {
      const fewest = Math.min(...kinds.map((k) => this.w.totals[k]));
      const rare = kinds.filter((k) => this.w.totals[k] === fewest);
      const kind = this.chance.chance(0.6) ? this.chance.pick(rare) : this.chance.pick(kinds);
      const at = this.chance.int(0, this.w.hosts.timing.faultWindowMs);
      const fork = this.chance.fork();
      this.w.totals[kind]++; // counted when chosen, so that the next choice sees it; undone if nothing to hit
      this.timers.push(
        delay(at).then(() =>
          this.inject(kind, fork).then(
            (hit) => {
              if (hit) this.count(this.record.faults, kind);
              else this.w.totals[kind]--;
            },
            (e: unknown) => {
              this.w.totals[kind]--;
              this.note(`fault ${kind} could not be injected: ${messageOf(e).split('\n')[0]}`);
            },
          ),
        ),
      );
    }
  }

  private async inject(kind: FaultKind, c: Chance): Promise<boolean> {
    const { site } = this.w;
    const down = c.int(0, 4_000);
    if (!(SUITE_FAULTS as readonly string[]).includes(kind)) {
      const ctx: FaultContext = {
        chance: c,
        downMs: down,
        note: (line) => this.note(line),
        sessionInWindow: (ms) => this.sessionInWindow(ms),
        later: (step) => void this.timers.push(step.then(() => undefined)),
      };
      return this.w.hosts.inject(kind as HostFaultKind, ctx);
    }
    switch (kind) {
      case 'workflowWorkerKill':
        this.note(`SIGKILL workflow worker, restart after ${down} ms`);
        await site.workflowWorker.bounce(down);
        return true;
      case 'proxyWorkerKill': {
        const proxy = site.proxyWorkers.get(c.pick(PROXIES))!;
        this.note(`SIGKILL ${proxy.name}, restart after ${down} ms`);
        await proxy.bounce(down);
        return true;
      }
      case 'serverRestart': {
        const hard = c.chance(0.5);
        this.note(`Temporal server ${hard ? 'SIGKILL' : 'SIGTERM'}, restart after ${down / 2} ms`);
        await site.bounceServer(hard, down / 2);
        return true;
      }
      case 'terminate':
      case 'reset':
        return this.endWorkflow(kind, c);
      case 'proxyOffline': {
        const proxy = c.pick(PROXIES);
        const back = c.int(2_000, 10_000);
        this.note(`${proxy} offline for ${back} ms`);
        await this.setProxyOnline(proxy, false);
        this.timers.push(delay(back).then(() => this.setProxyOnline(proxy, true).catch(() => undefined)));
        return true;
      }
      default:
        return false;
    }
  }

  private setProxyOnline(proxy: string, online: boolean): Promise<void> {
    return this.w.client.workflow
      .getHandle(PROXY_REGISTRY_WORKFLOW_ID)
      .signal(proxySignals.setProxyOnline, { proxy, online, requestedBy: 'alice' });
  }

  private async endWorkflow(kind: 'terminate' | 'reset', c: Chance): Promise<boolean> {
    const targets: { workflowId: string; runId: string; type: string }[] = [];
    for await (const wf of this.w.client.workflow.list({ query: runningQuery }))
      targets.push({ workflowId: wf.workflowId, runId: wf.runId, type: wf.type });
    if (targets.length === 0) return false;
    const target = c.pick(targets);
    this.w.ledger.endedBySuite.add(`${target.workflowId}/${target.runId}`);
    if (kind === 'terminate') {
      this.note(`terminate ${target.type} ${target.workflowId}`);
      await this.w.client.workflow.getHandle(target.workflowId, target.runId).terminate('chaos: terminated');
      return true;
    }
    const to = c.pick(['FirstWorkflowTask', 'LastWorkflowTask']);
    this.note(`reset ${target.type} ${target.workflowId} to its ${to}`);
    await run(this.w.cli, [
      'workflow',
      'reset',
      '--workflow-id',
      target.workflowId,
      '--run-id',
      target.runId,
      '--type',
      to,
      '--reason',
      'chaos: reset',
      '--address',
      this.w.site.address,
    ]);
    return true;
  }

  /** A planned failover session between its source's power-off and its replica's power-on, if one comes soon. */
  private async sessionInWindow(ms: number): Promise<string | undefined> {
    const steps = ['PoweringOffSource', 'FinalSync', 'Verifying', 'Switching', 'PoweringOnReplica'];
    const query =
      `ExecutionStatus="Running" AND WorkflowType="${WorkflowTypes.plannedFailoverSession}" AND ` +
      `FailoverStep IN (${steps.map((st) => `"${st}"`).join(', ')})`;
    const end = Date.now() + ms;
    while (Date.now() < end) {
      const found = await attempt(async () => {
        for await (const wf of this.w.client.workflow.list({ query })) return wf.workflowId;
        return undefined;
      });
      if (found) return found;
      await delay(250);
    }
    return undefined;
  }

  // Operators ---------------------------------------------------------------------------------------------------

  /** Decides every halted session: retry, abort or force, at random; a session refused twice is aborted. */
  private readonly refusals = new Map<string, number>();
  /** Set once the round's faults are cleared: a decision from then on must work, not halt again. */
  private healed = false;
  /** The decisions taken once healed, and what each led to. */
  private readonly healedDecisions: { what: string; haltedAgain: boolean }[] = [];

  private async decideHalts(): Promise<void> {
    const halted: string[] = [];
    for await (const wf of this.w.client.workflow.list({
      query: `ExecutionStatus="Running" AND WorkflowType="${WorkflowTypes.plannedFailoverSession}" AND FailoverStep="Halted"`,
    }))
      halted.push(wf.workflowId);
    for (const id of halted) {
      const handle = this.w.client.workflow.getHandle(id);
      const progress = await attempt(() => handle.query(sessionQueries.progress));
      if (!progress?.halted) continue;
      const refused = this.refusals.get(id) ?? 0;
      const decision = refused >= 2 ? 'abort' : this.chance.weighted({ retry: 5, abort: 3, forceFailover: 2 } as const);
      this.count(this.record.decisions, decision);
      const healed = this.healed;
      await handle
        .executeUpdate(haltedSessionUpdates[decision], { args: [request(`${decision} halt ${progress.halted.id}`)] })
        .then(
          (answer) => {
            this.w.log(`  ${decision} ${id}: ${answer}`);
            if (healed)
              this.healedDecisions.push({
                what: `${decision} ${id}: ${answer}`,
                haltedAgain: /halted again/.test(answer),
              });
          },
          (e: unknown) => {
            this.refusals.set(id, refused + 1);
            this.note(`${decision} ${id} refused: ${messageOf(e)}`);
          },
        );
    }
  }

  // Settling ----------------------------------------------------------------------------------------------------

  /** Lets the round run for a while, deciding halts as they come, until its workflows are done or time is up. */
  async runFor(ms: number): Promise<void> {
    const end = Date.now() + ms;
    while (Date.now() < end) {
      await attempt(() => this.samplePower());
      await attempt(() => this.decideHalts());
      if ((await attempt(() => this.running()))?.length === 0) return;
      await delay(1_000);
    }
  }

  /** Production and replica seen running at once while the round runs (not only at its end). */
  readonly overlaps = new Set<string>();

  private async samplePower(): Promise<void> {
    const { productionHost, drHost } = this.estate;
    for (const vm of this.vms) {
      if (this.w.ledger.regularFailover.has(vm)) continue;
      const [prod, replica] = await Promise.all([
        this.w.hosts.direct.getVm({ host: productionHost, vm }),
        this.w.hosts.direct.getReplica({ host: drHost, replica: replicaNameOf(vm) }),
      ]);
      if (prod.powerState !== 'Off' && replica.powerState !== 'Off')
        this.overlaps.add(`${vm}: production ${prod.powerState}, replica ${replica.powerState}`);
    }
  }

  /** Clears every fault, brings back every process and proxy. */
  async heal(): Promise<void> {
    await Promise.all(this.timers);
    await Promise.all(this.updates.splice(0).map((u) => Promise.race([u, delay(1_000)])));
    const restarted = await this.w.site.heal(() => this.w.hosts.heal((line) => this.note(line)));
    if (restarted.length > 0) this.note(`healed: started ${restarted.join(', ')}`);
    for (const proxy of PROXIES) await this.setProxyOnline(proxy, true);
    this.healed = true;
  }

  /**
   * The round's workflows still running and not halted. An entity may still name a holder that was terminated: it
   * checks its holder only while someone waits, which the closing job run does.
   */
  private async running(): Promise<string[]> {
    const ids: string[] = [];
    for await (const wf of this.w.client.workflow.list({ query: runningQuery }))
      ids.push(`${wf.type} ${wf.workflowId}`);
    return ids;
  }

  /** Every workflow of the round done (halts decided); false if that does not happen in time. */
  async settle(ms: number): Promise<string[]> {
    const end = Date.now() + ms;
    let quietPolls = 0;
    let running: string[] | undefined = [];
    while (Date.now() < end) {
      await attempt(() => this.decideHalts());
      running = await attempt(() => this.running());
      quietPolls = running?.length === 0 ? quietPolls + 1 : 0;
      if (quietPolls >= 2) return [];
      await delay(1_000);
    }
    return running ?? ['(the server did not answer)'];
  }

  /** A VM that its entity says is off with nothing running for it: the operator powers it on. */
  async tendAttention(): Promise<void> {
    const { productionHost } = this.estate;
    const current = await views(this.w.client, this.vms);
    for (const [vm, view] of current) {
      if (!view.attention || !(view.state === 'Ready' || view.state === 'Unseeded')) continue;
      const prod = await this.w.hosts.direct.getVm({ host: productionHost, vm });
      if (prod.powerState !== 'Off') continue;
      this.note(`operator powers ${vm} on after the entity's attention: ${view.attention}`);
      await this.w.operatorPort.powerOn({ host: productionHost, vm });
    }
  }

  /** What an operator does once the round settled, after the hosts' own faults (a crashed VM powered on, ...). */
  async afterSettle(): Promise<void> {
    const current = await views(this.w.client, this.vms);
    await this.w.hosts.afterSettle(current, this.w.operatorPort, (line) => this.note(line));
  }

  /** The entities' views once the round settled (kept for the invariants: the closing run becomes lastRun). */
  settledViews = new Map<string, ReplicaView>();

  /** A run of every job once the round settled: it must serve each VM as its state says. */
  async closingRuns(): Promise<Map<string, ReplicationJobResult | Error>> {
    this.settledViews = await views(this.w.client, this.vms);
    const results = new Map<string, ReplicationJobResult | Error>();
    await Promise.all(
      this.estate.jobs.map(async (job) => {
        try {
          const handle = await this.w.client.workflow.start(WorkflowTypes.replicationJob, {
            taskQueue: TASK_QUEUE,
            workflowId: `${CLOSING_RUN_PREFIX}${randomUUID()}`,
            args: [{ job: job.name, ...request(`closing run, round ${this.record.round}`) }],
          });
          const result = await Promise.race([
            handle.result() as Promise<ReplicationJobResult>,
            delay(180_000).then(() => new Error('did not finish in 180 s')),
          ]);
          results.set(job.name, result);
        } catch (e) {
          results.set(job.name, e instanceof Error ? e : new Error(String(e)));
        }
      }),
    );
    return results;
  }

  // Invariants --------------------------------------------------------------------------------------------------

  async check(stillRunning: string[], closing: Map<string, ReplicationJobResult | Error>): Promise<Checks> {
    const checks = new Checks();
    const { client, hosts, recorder, ledger } = this.w;
    checks.check('the round settles', stillRunning.length === 0, `still running: ${stillRunning.join(', ')}`);
    await checkWorkflows(client, this.started, ledger, checks);
    const sessions = await roundSessions(client, this.started);
    for (const point of sessions.forcedToHelper1) ledger.forcedToHelper1.add(point);
    const current = await views(client, this.vms);
    await hosts.check({ checks, since: this.started, ledger, views: current, settledViews: this.settledViews });
    checkClosingRun(this.estate, closing, current, checks);
    for (const vm of this.vms) {
      const facts = await hostFacts(hosts.direct, this.estate, vm);
      await checkVm(hosts, recorder, ledger, checks, vm, current.get(vm)!, facts, this.settledViews.get(vm)!);
      checkRetention(this.estate, vm, facts, current.get(vm)!, checks);
    }
    checkPower(this.estate, recorder, ledger, checks, sessions.stopsAsked);
    for (const d of this.healedDecisions)
      checks.check('a decision taken once the faults are cleared works', !d.haltedAgain, d.what);
    checks.check(
      'production and replica never run on the same data',
      this.overlaps.size === 0,
      [...this.overlaps].join('; '),
    );
    await checkSlots(client, checks);
    this.record.faults.continueAsNew = await this.continuedAsNew();
    this.w.totals.continueAsNew += this.record.faults.continueAsNew;
    return checks;
  }

  private async continuedAsNew(): Promise<number> {
    const query = `ExecutionStatus="ContinuedAsNew" AND CloseTime >= "${this.started.toISOString()}"`;
    let n = 0;
    for await (const _ of this.w.client.workflow.list({ query })) n++;
    return n;
  }

  finish(checks: Checks): RoundRecord {
    this.record.invariantsChecked = checks.count;
    this.record.checked = checks.byName;
    this.record.violations = checks.violations.map((v) => ({ name: v.name, detail: v.detail }));
    this.record.durationMs = Date.now() - this.started.getTime();
    return this.record;
  }
}
