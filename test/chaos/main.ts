// `npm run chaos [-- --hypervisor lab|kvm --seed S --rounds N --minutes M --out DIR]`: the fault suite. Rounds of
// planned failovers, undo, failback, permanent and regular failover and job runs on the lab or on real guests of two
// KVM hosts, with processes killed, the server restarted, workflows terminated or reset, proxies taken offline and
// hosts failing (the lab's injected faults; on KVM host processes, storage daemons and guests killed, libvirtd
// restarted, the DR storage full or its power cut, connections cut or stalled) at random moments drawn from the
// printed seed; invariants from the hosts and the histories after every round. Loopback only; stops by itself
// after N rounds or M minutes, or at the first round that breaks an invariant (its histories are saved).
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { Command, InvalidArgumentError } from 'commander';
import { Client, Connection } from '@temporalio/client';
import { historyToJSON } from '@temporalio/common/lib/proto-utils';
import { ensureTemporalCli, freePort, projectRoot } from '../../scripts/lib/dev-server';
import { connectHypervisor } from '../../src/config/hypervisor';
import { parseConfiguration } from '../../src/config/load';
import { TASK_QUEUE, WorkflowTypes, type ReplicationJobResult } from '../../src/contract';
import { bundleWorkflows } from '../../src/worker';
import { chaosConfiguration, HYPERVISORS, OPERATOR, PROXIES, type Hypervisor } from './estate';
import { FAULT_KINDS, type ChaosHosts, type FaultKind } from './hosts';
import { Ledger } from './invariants';
import { KvmHosts } from './kvm-hosts';
import { LabHosts } from './lab-hosts';
import { ChaosSite } from './processes';
import { Chance, randomSeed } from './random';
import { Recorder } from './recorder';
import { Round, type RoundRecord, type World } from './round';
import { replayCommand, summaryMarkdown, type ChaosSummary } from './summary';
import { makeTestKeys, testSigner } from '../keys';
import { makeTestSite } from '../tls';

const whole = (min: number) => (value: string) => {
  if (!/^\d+$/.test(value) || Number(value) < min) throw new InvalidArgumentError(`must be a whole number ≥ ${min}`);
  return Number(value);
};

function commitOf(): string {
  try {
    return execFileSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: projectRoot, encoding: 'utf8' }).trim();
  } catch {
    return 'unknown';
  }
}

async function saveHistories(client: Client, since: Date, dir: string): Promise<number> {
  mkdirSync(dir, { recursive: true });
  let n = 0;
  const query = `StartTime >= "${since.toISOString()}" OR WorkflowType IN ("${WorkflowTypes.replica}", "${WorkflowTypes.proxySlots}")`;
  for await (const wf of client.workflow.list({ query })) {
    const history = await client.workflow.getHandle(wf.workflowId, wf.runId).fetchHistory();
    writeFileSync(
      join(dir, `${wf.workflowId.replace(/[^A-Za-z0-9._-]/g, '_')}-${wf.runId}.json`),
      historyToJSON(history),
    );
    n++;
  }
  return n;
}

async function main(): Promise<number> {
  const opts = new Command()
    .name('chaos')
    .description('The fault suite: random kills, outages and restarts over many rounds, every invariant checked')
    .option(
      '--hypervisor <lab|kvm>',
      'the lab, or real guests on two KVM hosts (libvirt instances of this machine)',
      'lab',
    )
    .option('--seed <n>', 'the seed to draw every choice from (printed; a random one when omitted)', whole(1))
    .option('--rounds <n>', 'rounds to run', whole(1), 10)
    .option('--minutes <n>', 'start no round after this many minutes', whole(1), 90)
    .option('--out <dir>', 'where the summary (and a failing round’s histories) go', '.chaos')
    .option('--suggest-continue-as-new <events>', 'the server’s continue-as-new suggestion', whole(10), 60)
    .option('--keep-going', 'run the remaining rounds after a violation', false)
    .option(
      '--faults <kinds>',
      'inject only these kinds of fault (a comma list; default: every kind of the hypervisor)',
    )
    .exitOverride()
    .parse()
    .opts<{
      hypervisor: string;
      seed?: number;
      rounds: number;
      minutes: number;
      out: string;
      suggestContinueAsNew: number;
      keepGoing: boolean;
      faults?: string;
    }>();
  if (!HYPERVISORS.includes(opts.hypervisor as Hypervisor))
    throw new InvalidArgumentError(`--hypervisor: must be one of ${HYPERVISORS.join(', ')}, not '${opts.hypervisor}'`);
  const hypervisor = opts.hypervisor as Hypervisor;
  const seed = opts.seed ?? randomSeed();
  const started = Date.now();
  const commit = commitOf(); // the code that runs, even if the checkout moves on meanwhile
  const out = resolve(opts.out, `seed-${seed}`);
  mkdirSync(out, { recursive: true });
  const log = (line: string): void => console.log(line);
  const replay = replayCommand({ hypervisor, seed, roundsPlanned: opts.rounds, faults: opts.faults });
  log(`chaos: ${hypervisor}, seed ${seed}, ${opts.rounds} rounds (replay: ${replay})`);

  const workDir = mkdtempSync(join(tmpdir(), 'pf-chaos-'));
  // The run's certificates (the host API is mutual TLS): the hosts', the recorder's in their place, the workers'.
  await makeTestSite(join(workDir, 'certs'));
  await makeTestKeys(join(workDir, 'keys'));
  const cli = ensureTemporalCli();
  const serverPort = await freePort();
  const hosts: ChaosHosts =
    hypervisor === 'kvm' ? new KvmHosts({ workDir, log }) : new LabHosts({ workDir, port: await freePort() });
  const { estate } = hosts;
  const faultKinds = opts.faults ? opts.faults.split(',').map((k) => k.trim()) : [...hosts.faultKinds];
  const unknown = faultKinds.filter((k) => !(hosts.faultKinds as readonly string[]).includes(k));
  if (unknown.length > 0 || faultKinds.length === 0)
    throw new InvalidArgumentError(
      `--faults: ${unknown.join(', ') || 'none named'}; the ${hypervisor} faults are ${hosts.faultKinds.join(', ')}`,
    );
  const rounds: RoundRecord[] = [];
  const totals = Object.fromEntries(FAULT_KINDS.map((k) => [k, 0])) as Record<FaultKind, number>;
  let client: Client | undefined;
  let site: ChaosSite | undefined;
  let recorder: Recorder | undefined;
  let operatorPort: ReturnType<typeof connectHypervisor> | undefined;
  const summary = (): ChaosSummary => ({
    seed,
    commit,
    hypervisor,
    faultKinds: [...faultKinds, 'continueAsNew'],
    ...(opts.faults ? { faults: opts.faults } : {}),
    startedAt: new Date(started).toISOString(),
    wallTimeSeconds: Math.round((Date.now() - started) / 1000),
    roundsPlanned: opts.rounds,
    suggestContinueAsNew: opts.suggestContinueAsNew,
    rounds,
  });
  const writeSummary = (): void => {
    const s = summary();
    writeFileSync(join(out, 'summary.json'), JSON.stringify(s, null, 2) + '\n');
    writeFileSync(join(out, 'summary.md'), summaryMarkdown(s));
  };
  // Ctrl-C (or a CI timeout) stops every process the suite started: the server and the hosts are detached groups.
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.once(signal, () => {
      log(`chaos: ${signal}, stopping the site (summary so far in ${out})`);
      writeSummary();
      void Promise.allSettled([site?.close()])
        .then(() => hosts.close())
        .then(() => rmSync(workDir, { recursive: true, force: true }))
        .finally(() => process.exit(130));
    });
  }
  try {
    await hosts.start();
    recorder = new Recorder({
      upstreams: await hosts.upstreams(),
      productionHost: estate.productionHost,
      drHost: estate.drHost,
      disksOf: (vm) => estate.vmDisks[vm]!,
      direct: hosts.direct,
      sourceImage: (vm) => hosts.sourceImage(vm),
      poweredOn: (host, vm) => hosts.poweredOn(host, vm),
      runningReplaced: (host, replica) => hosts.runningReplaced(host, replica),
    });
    const recorderUrls = await recorder.listen();
    const urls = await hosts.workerUrls(recorderUrls);
    const configuration = chaosConfiguration(estate, {
      production: urls[estate.productionHost]!,
      dr: urls[estate.drHost]!,
    });
    operatorPort = connectHypervisor(
      parseConfiguration(
        JSON.stringify(
          chaosConfiguration(estate, {
            production: recorderUrls[estate.productionHost]!,
            dr: recorderUrls[estate.drHost]!,
          }),
        ),
        'the operator’s configuration',
      ),
    );
    const { code } = await bundleWorkflows();
    const bundlePath = join(workDir, 'workflow-bundle.js');
    writeFileSync(bundlePath, code);
    site = new ChaosSite({
      workDir,
      cli,
      serverPort,
      configuration,
      proxies: PROXIES,
      bundlePath,
      suggestContinueAsNew: opts.suggestContinueAsNew,
    });
    await site.startServer();
    await site.heal(async () => []);
    // The operator's client signs as the project CLI does; the chaos operations are requests like any other.
    client = new Client({
      connection: await Connection.connect({ address: site.address }),
      namespace: 'default',
      interceptors: { workflow: [testSigner()] },
    });
    const world: World = {
      client,
      site,
      hosts,
      faultKinds: faultKinds as FaultKind[],
      recorder,
      operatorPort,
      cli,
      ledger: new Ledger(),
      totals,
      log,
    };

    // Seeding, without faults: every replica gets its first point before the rounds begin.
    const seeds = await Promise.all(
      estate.jobs.map(async (job) => {
        const handle = await client!.workflow.start(WorkflowTypes.replicationJob, {
          taskQueue: TASK_QUEUE,
          workflowId: `job-seed-${job.name}`,
          args: [{ job: job.name, requestedBy: OPERATOR, reason: 'chaos: seeding' }],
        });
        return (await handle.result()) as ReplicationJobResult;
      }),
    );
    const unseeded = seeds.flatMap((r) => r.sessions.filter((s) => s.outcome !== 'replicated'));
    if (unseeded.length > 0) throw new Error(`seeding failed: ${JSON.stringify(unseeded)}`);

    const master = new Chance(seed);
    let previousSince: Date | undefined;
    for (let i = 1; i <= opts.rounds; i++) {
      if (Date.now() - started > opts.minutes * 60_000) {
        log(`chaos: time is up after ${i - 1} rounds`);
        break;
      }
      const round = new Round(world, master.fork(), i);
      log(`round ${i} (seed ${round.record.seed})`);
      const phases = round.record.phasesMs;
      let mark = Date.now();
      const phase = (name: string) => {
        phases[name] = Date.now() - mark;
        mark = Date.now();
      };
      await round.startOperations();
      round.scheduleFaults();
      await round.runFor(hosts.timing.runForMs);
      phase('run');
      await round.heal();
      phase('heal');
      const stillRunning = await round.settle(300_000);
      await round.afterSettle();
      phase('settle');
      const closing = await round.closingRuns();
      phase('closing');
      const checks = await round.check(stillRunning, closing);
      phase('check');
      const record = round.finish(checks);
      await round.tendAttention();
      rounds.push(record);
      log(
        `round ${i}: ${JSON.stringify(record.operations)} faults ${JSON.stringify(record.faults)} ` +
          `${record.invariantsChecked} checks, ${record.violations.length} violations (${Math.round(record.durationMs / 1000)} s: ` +
          `${Object.entries(phases)
            .map(([k, v]) => `${k} ${Math.round(v / 1000)}`)
            .join(', ')})`,
      );
      writeSummary();
      if (record.violations.length > 0) {
        for (const v of record.violations) log(`  VIOLATION ${v.name}: ${v.detail ?? ''}`);
        // The round before may have left what broke this one (an operation still under way when it was checked).
        const roundDir = join(out, `round-${i}-histories`);
        const saved = await saveHistories(client, previousSince ?? round.since, roundDir);
        await hosts.evidence(roundDir);
        log(`  ${saved} histories, the hosts' logs and the guests' consoles saved in ${roundDir}`);
        if (!opts.keepGoing) break;
      }
      previousSince = round.since;
    }
  } finally {
    writeSummary();
    await client?.connection.close().catch(() => undefined);
    await site?.close();
    await recorder?.close();
    operatorPort?.close();
    await hosts.close();
    try {
      rmSync(workDir, { recursive: true, force: true });
    } catch (e) {
      log(`chaos: ${workDir} stays (${e instanceof Error ? e.message : String(e)})`);
    }
  }
  const s = summary();
  log(summaryMarkdown(s));
  log(`chaos: summary in ${out}/summary.{json,md}`);
  return s.rounds.some((r) => r.violations.length > 0) ? 1 : 0;
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    console.error(err instanceof Error ? (err.stack ?? err.message) : err);
    process.exit(2);
  },
);
