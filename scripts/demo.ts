// `npm run demo`: sets up what is missing, starts the Temporal server with its Web UI, the lab with the demo
// estate and the orchestrator's workers, and shows the main job. It keeps running so you can try the Temporal
// CLI against it. Ctrl-C, SIGTERM or SIGHUP, an error or a second run's refusal: it stops everything it started.
// `npm run demo -- --hypervisor kvm` tells the same story on real guests: two KVM hosts (private libvirt
// instances with our host process each) instead of the lab.
import { mkdirSync, openSync, writeSync } from 'node:fs';
import { join, relative } from 'node:path';
import { ApplicationFailure } from '@temporalio/common';
import { Runtime } from '@temporalio/worker';
import { labServerNames, loadEstate } from '../lab/estate';
import { startLab } from '../lab/server';
import { followSessions } from '../src/cli/progress';
import { plannedFailoverTable, replicationJobTable } from '../src/cli/report';
import { startPlannedFailover, startReplicationJob } from '../src/client';
import { connectHypervisor } from '../src/config/hypervisor';
import { loadConfiguration } from '../src/config/load';
import type { Configuration } from '../src/config/schema';
import { FailureTypes, TASK_QUEUE, type PlannedFailoverResult } from '../src/contract';
import { DEMO_CLIENT, DEMO_SITE_DIR, ensureSite, serverTlsFiles } from '../src/host-api/certificates';
import { LabControl, HostApiHypervisor } from '../src/hypervisor/host-api-adapter';
import type { ClosablePort } from '../src/hypervisor/routed';
import { createLogger, logLevelFromEnv } from '../src/logging';
import { prometheusTelemetry, publishHaltedSessions, publishProxySlots } from '../src/metrics';
import { createOrchestrator, type Orchestrator } from '../src/orchestrator';
import { syncJobSchedules } from '../src/schedules';
import { DEFAULT_CONFIG_TEMPLATE } from '../src/worker-args';
import { ensureDemoConfiguration } from '../src/config/demo';
import { keysIn, userKeyDir } from '../src/identity/keys';
import { signingClient } from '../src/identity/signing';
import { ensureTemporalCli, projectRoot, startDevServer } from './lib/dev-server';
import { finishEarlierDemo } from './lib/earlier-demo';
import { startKvmDemoSite, type KvmDemoSite } from './lib/kvm-site';
import { describeError } from './lib/errors';
import { DemoPidFile } from './lib/pid-file';
import { demoPortsFromEnv, refuseTakenPorts, type DemoPorts } from './lib/ports';
import { StopPath, StopRequested } from './lib/stop';

const dataDir = join(projectRoot, '.data');
const serverDir = join(dataDir, 'temporal');
const labDir = join(dataDir, 'lab');
const kvmDir = join(dataDir, 'kvm');
const siteDir = join(projectRoot, DEMO_SITE_DIR);
const KVM_CONFIG_PATH = 'config/planned-failover-kvm.yaml';

/** The demo's one flag; anything else is refused by name before anything starts. */
function hypervisorFromArgs(args: readonly string[]): 'lab' | 'kvm' {
  if (args.length === 0) return 'lab';
  const [flag, value] = args;
  if (flag !== '--hypervisor' || args.length !== 2)
    throw new Error(`usage: npm run demo [-- --hypervisor lab|kvm]; not understood: ${args.join(' ')}`);
  if (value !== 'lab' && value !== 'kvm') throw new Error(`--hypervisor: '${value}' is neither lab nor kvm`);
  return value;
}
const logFile = join(dataDir, 'demo.log');
const shown = (path: string): string => relative(process.cwd(), path) || '.';

const stop = new StopPath((line) => console.log(line));
/** The story; once stopping, work still in flight has nothing more to tell. */
const say = (line: string): void => {
  if (!stop.requested) console.log(line);
};
/** Set once the planned failover's result is shown: a stop after it is the demo's normal end. */
let shownResult = false;

async function main(): Promise<void> {
  const hypervisorKind = hypervisorFromArgs(process.argv.slice(2));
  const ports = demoPortsFromEnv();
  const pidFile = new DemoPidFile(join(dataDir, 'demo.pid'), join(serverDir, 'temporal.db'));
  await pidFile.claim(ports, say);
  process.on('exit', () => pidFile.release());
  await refuseTakenPorts(ports);

  // Operator logs (the SDK's, the workers' and the lab's) go to a file, so that the terminal tells the story.
  // Written synchronously: no line is lost when the process exits.
  mkdirSync(dataDir, { recursive: true });
  const logFd = openSync(logFile, 'a');
  const logger = createLogger(logLevelFromEnv(), { write: (line: string) => writeSync(logFd, line) });
  // The stop path handles the signals: the SDK's own handler would stop the workers under a waiting demo.
  Runtime.install({
    logger,
    shutdownSignals: [],
    telemetryOptions: prometheusTelemetry(`127.0.0.1:${ports.workerMetrics}`),
  });
  logger.info('Demo started', { pid: process.pid, ...ports });
  say(`Demo running as pid ${process.pid} (Ctrl-C or kill -TERM ${process.pid} stops it).`);
  say(`Operator logs (the SDK's and the workers' JSON lines): ${shown(logFile)}`);

  const cli = ensureTemporalCli();
  const address = `127.0.0.1:${ports.temporal}`;
  const uiUrl = `http://127.0.0.1:${ports.ui}`;
  const serverLog = join(serverDir, 'server.log');
  say(`Starting the Temporal server at ${address} (state in ${shown(serverDir)}, its log in ${shown(serverLog)})...`);
  const server = await startDevServer({
    cli,
    port: ports.temporal,
    uiPort: ports.ui,
    metricsPort: ports.serverMetrics,
    dbFile: join(serverDir, 'temporal.db'),
    logFile: serverLog,
    signal: stop.signal,
  });
  stop.defer('the Temporal server', () => server.stop());
  pidFile.recordServer(server.process.pid);
  say(`Temporal server ready. Web UI: ${uiUrl}`);

  let labControl: LabControl | undefined;
  let config: Configuration;
  let hypervisor: ClosablePort;
  let kvmSite: KvmDemoSite | undefined;
  if (hypervisorKind === 'lab') {
    config = loadConfiguration(await demoConfiguration(DEFAULT_CONFIG_TEMPLATE));
    const estatePath = join(projectRoot, 'config', 'estate.yaml');
    await makeCertificates({ lab: labServerNames(await loadEstate(estatePath)) });
    const lab = await startLab({
      estatePath,
      dataDir: labDir,
      port: ports.lab,
      tls: serverTlsFiles(siteDir, 'lab'),
      log: (message) => logger.info(message, { component: 'lab' }),
    });
    stop.defer('the lab', () => lab.stop(), 3_000);
    say(`Lab site started at ${lab.url} (data in ${shown(labDir)}).`);
    labControl = new LabControl({ url: lab.url, tls: config.tls, serverName: 'lab' });
    hypervisor = new HostApiHypervisor({ url: lab.url, tls: config.tls, serverName: 'lab' });
  } else {
    config = loadConfiguration(await demoConfiguration(KVM_CONFIG_PATH));
    await makeCertificates(Object.fromEntries(config.hosts.map((h) => [h.name, [h.name]])));
    say(`Starting the KVM hosts of ${KVM_CONFIG_PATH} (data in ${shown(kvmDir)})...`);
    const site = await startKvmDemoSite({
      config,
      dataDir: kvmDir,
      siteDir,
      say,
      log: (message) => logger.info(message, { component: 'kvm-host' }),
    });
    kvmSite = site;
    stop.defer('the KVM hosts', () => site.stop(), 30_000);
    hypervisor = connectHypervisor(config);
  }

  const orchestrator = await createOrchestrator({
    connectionOptions: { address },
    namespace: 'default',
    config,
    port: hypervisor,
  });
  // Only the workers: the client's connection stays open for calls still in flight, which end with the process.
  stop.defer('the workers', () => orchestrator.stopWorkers());
  await stop.untilStopped(orchestrator.startWorkers());
  // Counted until the process ends (its timer does not hold the process open; a count the stop cuts is skipped).
  publishHaltedSessions(orchestrator.client, Runtime.instance().metricMeter);
  publishProxySlots(orchestrator.client, Runtime.instance().metricMeter);
  say(`Workers polling '${TASK_QUEUE}' and one task queue per proxy.`);

  // Raced against the stop: a client call still in flight then (a result, an update) ends with the process.
  const commands = commandsFor(cli, ports, hypervisorKind);
  const result = await stop.untilStopped(
    showPlannedFailover({
      orchestrator,
      hypervisor,
      labControl,
      uiUrl,
      commands,
      guestsWriting: kvmSite?.guestsWriting,
    }),
  );
  if (kvmSite) {
    say('\nOn the real guests:');
    for (const line of await stop.untilStopped(kvmSite.checkFailover(result))) say(`  ${line}`);
  }
  shownResult = true;
  say(
    `\nMetrics (Prometheus): the workers' at http://127.0.0.1:${ports.workerMetrics}/metrics, the Temporal ` +
      `server's at http://127.0.0.1:${ports.serverMetrics}/metrics`,
  );
  printCommandsToTry(commands, uiUrl, orchestrator.config, hypervisorKind);
  await stop.untilStopped(new Promise<never>(() => undefined));
}

/**
 * The demo site's certificates (.data/certs, which both demo configurations name): its CA, these host API servers'
 * certificates and the workers' client certificate, made when missing.
 */
async function makeCertificates(hosts: Record<string, string[]>): Promise<void> {
  const made = (await ensureSite(siteDir, hosts, [DEMO_CLIENT])).filter((c) => c.made);
  if (made.length > 0)
    say(`Made the site's certificates for mutual TLS: ${made.map((c) => c.name).join(', ')} (in ${shown(siteDir)}).`);
}

interface Demo {
  orchestrator: Orchestrator;
  hypervisor: ClosablePort;
  labControl: LabControl | undefined;
  uiUrl: string;
  commands: DemoCommands;
  /** Resolves once the real guests are up and writing (the lab's guests write from their start). */
  guestsWriting?: (() => Promise<void>) | undefined;
}

async function showPlannedFailover({
  orchestrator,
  hypervisor,
  labControl,
  uiUrl,
  commands,
  guestsWriting,
}: Demo): Promise<PlannedFailoverResult> {
  const { config } = orchestrator;
  // The demo's requests are alice's, signed with her key as the project CLI signs them.
  const client = signingClient(orchestrator.client, keysIn());
  const schedules = await syncJobSchedules(client, config);
  say(`Job schedules from the configuration: ${[...schedules.created, ...schedules.updated].join(', ') || 'none'}.`);

  say('\nFinishing what earlier runs of the demo left...');
  await finishEarlierDemo({
    client,
    hypervisor,
    vms: config.jobs.flatMap((j) => j.vms),
    print: say,
    freshStart: `rm -rf '${serverDir}' '${labDir}' '${kvmDir}' && ${commands.demo}`,
    temporalCommand: commands.temporal,
  });

  // The backup repository is filled by a backup job in real life; the demo plays that job.
  for (const job of config.jobs.filter((j) => j.dataSource === 'backup')) {
    for (const vm of job.vms) await labControl?.takeBackup(vm);
  }

  if (guestsWriting) {
    say('\nWaiting for the guests to boot and write...');
    await guestsWriting();
  }

  for (const pass of ['Seeding the replicas', 'An incremental run while the guests write']) {
    say(`\n${pass}...`);
    const handles = await Promise.all(
      config.jobs.map((job) =>
        startReplicationJob(client, { job: job.name, requestedBy: 'alice', reason: `demo: ${pass}` }),
      ),
    );
    say(replicationJobTable(await Promise.all(handles.map((h) => h.result()))));
  }

  const job = config.jobs[0]!;
  say(`\nPlanned failover of job ${job.name} (${job.vms.join(', ')}) while the guests keep writing...`);
  const failover = await startPlannedFailover(client, {
    vms: job.vms,
    reason: 'demo: datacenter maintenance',
    requestedBy: 'alice',
  });
  const stopFollowing = followSessions(client, failover.workflowId, (line) => say(`  ${line}`));
  let outcome: PlannedFailoverResult;
  try {
    outcome = await failover.result();
  } catch (err) {
    await stopFollowing();
    const incomplete = incompleteResult(err);
    if (incomplete) say(`\n${plannedFailoverTable(incomplete)}`);
    throw new Error('The planned failover did not complete', { cause: err });
  }
  await stopFollowing();
  say(`\n${plannedFailoverTable(outcome)}`);
  say(`${uiUrl}/namespaces/default/workflows/${encodeURIComponent(failover.workflowId)}`);
  return outcome;
}

/** The per-VM result that a failed planned failover carries when only some of its VMs failed over. */
function incompleteResult(err: unknown): PlannedFailoverResult | undefined {
  for (let e: unknown = err; e instanceof Error; e = e.cause) {
    if (e instanceof ApplicationFailure && e.type === FailureTypes.plannedFailoverIncomplete) {
      return e.details?.[0] as PlannedFailoverResult | undefined;
    }
  }
  return undefined;
}

/** The demo's configuration with this machine's keys of its users, made on first run (and said so). */
async function demoConfiguration(template: string): Promise<string> {
  const demo = await ensureDemoConfiguration(join(projectRoot, template));
  if (demo.madeKeys.length > 0)
    say(`Made signing keys for ${demo.madeKeys.join(', ')} (private keys in ${userKeyDir()}, mode 0600).`);
  return demo.file;
}

/** Command lines that a user can type against this demo. */
interface DemoCommands {
  /** This demo again, on the same ports. */
  demo: string;
  /** The Temporal CLI with these arguments. */
  temporal: (args: string) => string;
  /** The project CLI, to be followed by its command. */
  project: string;
}

/** The Temporal CLI and the project CLI default to 127.0.0.1:7233: on other ports, each command names the demo's. */
function commandsFor(cli: string, ports: DemoPorts, hypervisorKind: 'lab' | 'kvm'): DemoCommands {
  const address = `127.0.0.1:${ports.temporal}`;
  const defaultAddress = ports.temporal === 7233;
  const portVariables = [
    'PF_TEMPORAL_PORT',
    'PF_TEMPORAL_UI_PORT',
    'PF_LAB_PORT',
    'PF_METRICS_PORT',
    'PF_TEMPORAL_METRICS_PORT',
  ].filter((name) => process.env[name]);
  return {
    demo: `${portVariables.map((name) => `${name}=${process.env[name]} `).join('')}npm run demo${hypervisorKind === 'kvm' ? ' -- --hypervisor kvm' : ''}`,
    temporal: (args) => `${cli} ${args}${defaultAddress ? '' : ` --address ${address}`}`,
    project: `${defaultAddress ? '' : `TEMPORAL_ADDRESS=${address} `}npm run failover --`,
  };
}

function printCommandsToTry(
  commands: DemoCommands,
  uiUrl: string,
  config: Configuration,
  hypervisorKind: 'lab' | 'kvm',
): void {
  const job = config.jobs[0]!;
  const [first, second = first] = job.vms;
  const other = config.jobs[1]?.vms[0] ?? first;
  say(`\nWeb UI: ${uiUrl}/namespaces/default/workflows`);
  say('Try the Temporal CLI from another terminal, for example:');
  // Every request is signed by its requester: `failover sign` prints it signed with the user's key, made on first run.
  const signed = (operation: string, input: string, workflowId?: string) =>
    `--input "$(npm run -s failover -- sign ${operation}${workflowId ? ` --workflow-id ${workflowId}` : ''} --input '${input}')"`;
  const update = (vm: string, name: string, reason: string) =>
    `workflow update execute --workflow-id replica/${vm} --name ${name} ` +
    signed(name, `{"requestedBy":"alice","reason":"${reason}"}`, `replica/${vm}`);
  for (const line of [
    `workflow list --query 'FailoverJob="${job.name}"'`,
    `workflow query --workflow-id replica/${first} --type state`,
    update(first!, 'failback', 'back home'),
    update(first!, 'commitFailback', 'done'),
    update(second!, 'undoFailover', 'undo'),
    `workflow start --task-queue ${TASK_QUEUE} --type plannedFailover ` +
      signed('plannedFailover', `{"vms":["${other}"],"reason":"try it","requestedBy":"bob"}`),
    `workflow list --query 'FailoverRequestedBy="bob"'`,
  ])
    say(`  ${commands.temporal(line)}`);
  say(`or the project CLI: ${commands.project} planned --vm ${other} --reason "try it" --user bob`);
  say(`Press Ctrl-C to stop the workers, ${hypervisorKind === 'lab' ? 'the lab' : 'the KVM hosts'} and the server.`);
}

main().then(
  () => stop.finish(0),
  (err: unknown) => {
    // Work that the stop interrupted fails with an error of its own; the stop is what happened.
    if (err instanceof StopRequested || stop.requested) return stop.finish(shownResult ? 0 : 130);
    return stop.finish(1, `error: ${describeError(err)}`);
  },
);
