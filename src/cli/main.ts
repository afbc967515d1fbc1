// The project CLI: `npm run failover -- <command>`. Exit codes: 0 done, 1 the operation failed, 2 bad input.
import { Command, CommanderError, InvalidArgumentError } from 'commander';
import { WorkflowFailedError, WorkflowUpdateFailedError, type Client } from '@temporalio/client';
import { ApplicationFailure } from '@temporalio/common';
import { connectClient, startPlannedFailover, startReplicationJob } from '../client';
import {
  FailureTypes,
  formatProblems,
  haltedSessionUpdates,
  isSignedOperation,
  requestTarget,
  SignedOperations,
  STARTED_OPERATIONS,
  PROXY_REGISTRY_WORKFLOW_ID,
  proxySignals,
  setProxyOnlineSchema,
  replicaQueries,
  replicaWorkflowId,
  validate,
  validatePlannedFailoverInput,
  replicationJobInputSchema,
  operatorRequestSchema,
  operationSchemas,
  operationUpdates,
  type OperationName,
  type OperationOutcome,
  type PlannedFailoverResult,
  type InputProblem,
} from '../contract';
import { loadConfiguration } from '../config/load';
import { createUserKey, keysIn, loadUserKey, signRequest, userKeyFile } from '../identity/keys';
import { signingInterceptor } from '../identity/signing';
import { auditSince, auditTable, sinceOf } from './audit';
import { certificatesReport, certsCreateSchema, createCertificates } from './certs';
import { syncJobSchedules } from '../schedules';
import { DEFAULT_CONFIG_PATH } from '../worker';
import { formatBytes, formatTable } from './format';
import { followOperation, followSessions } from './progress';
import { plannedFailoverTable, replicationJobTable } from './report';

class UsageError extends Error {}

function refuse(what: string, problems: InputProblem[]): never {
  throw new UsageError(formatProblems(what, problems));
}

const wholeNumber = (value: string): number => {
  if (!/^\d+$/.test(value)) throw new InvalidArgumentError('must be a whole number');
  return Number(value);
};

const collect = (value: string, previous: string[] = []): string[] => [
  ...previous,
  ...value.split(',').filter(Boolean),
];

/** A client that signs every request with its requester's key from the per-user key directory. */
async function withClient<T>(run: (client: Client) => Promise<T>): Promise<T> {
  const client = await connectClient(undefined, [signingInterceptor(keysIn())]);
  try {
    return await run(client);
  } finally {
    await client.connection.close();
  }
}

/** The failure a workflow ended with, as the operator should read it, with the result it carries if any. */
function explain(err: unknown): { message: string; type?: string; details?: unknown } {
  if (err instanceof WorkflowFailedError || err instanceof ApplicationFailure) {
    let cause: unknown = err instanceof ApplicationFailure ? err : err.cause;
    while (
      cause instanceof Error &&
      cause.cause instanceof Error &&
      !(cause instanceof ApplicationFailure && cause.type)
    )
      cause = cause.cause;
    if (cause instanceof ApplicationFailure)
      return { message: cause.message, type: cause.type ?? undefined, details: cause.details?.[0] };
    return { message: cause instanceof Error ? cause.message : String(cause) };
  }
  return { message: err instanceof Error ? err.message : String(err) };
}

/** A request refused before anything changed (bad input, an unverified or unauthorized requester) exits 2. */
const refusalExitCode = (type: string | undefined): number =>
  type === FailureTypes.invalidInput || type === FailureTypes.accessDenied || type === FailureTypes.requestNotVerified
    ? 2
    : 1;

const program = new Command()
  .name('failover')
  .description(
    'Planned failover of VMs to their DR replicas, driven through Temporal.\n' +
      "Connection settings are the Temporal CLI's: TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TEMPORAL_API_KEY, temporal.toml profiles.",
  )
  .showHelpAfterError()
  // Bad flags exit 2, like every other refused input; help and --version still exit 0.
  .exitOverride();

program
  .command('planned')
  .description('Move running VMs to their replicas with minimum downtime and zero data loss')
  .requiredOption('--vm <name>', 'a VM to fail over (repeat, or separate with commas)', collect)
  .requiredOption('--reason <text>', 'why; recorded with every session')
  .requiredOption('--user <name>', 'who asks; needs Backup Administrator, or Backup Operator and Restore Operator')
  .option(
    '--max-parallel-jobs <n>',
    'jobs whose VMs move at the same time (VMs of one job always go one by one)',
    wholeNumber,
  )
  .option('--shutdown-timeout <seconds>', 'guest shutdown time before a hard power-off', wholeNumber)
  .option(
    '--pre-sync-passes <n>',
    'extra sync passes before power-off while the delta shrinks (shorter downtime)',
    wholeNumber,
  )
  .option('--pre-sync-target <bytes>', 'stop the extra passes once a pass copies less than this', wholeNumber)
  .option('--proxy-wait <seconds>', 'how long a VM may wait for a free proxy slot', wholeNumber)
  .option('--json', 'print the result as JSON (for scripts)')
  .option('--detach', 'start it and print the workflow id without waiting')
  .addHelpText(
    'after',
    '\nExample:\n  npm run failover -- planned --vm sql01,sql02 --reason "DC maintenance" --user alice\n' +
      '\nEach VM: sync while running (helper restore point 1), guest shutdown, final sync (helper point 2),\n' +
      'verification against the source, switch to the replica, power on. A failure between power-off and\n' +
      'power-on halts the session for an operator: see `failover decide --help`.',
  )
  .action(async (o: Record<string, unknown>) => {
    const options = Object.fromEntries(
      Object.entries({
        maxParallelJobs: o.maxParallelJobs,
        shutdownTimeoutSeconds: o.shutdownTimeout,
        preSyncMaxPasses: o.preSyncPasses,
        preSyncTargetBytes: o.preSyncTarget,
        proxyWaitTimeoutSeconds: o.proxyWait,
      }).filter(([, v]) => v !== undefined),
    );
    const checked = validatePlannedFailoverInput({
      vms: o.vm,
      reason: o.reason,
      requestedBy: o.user,
      ...(Object.keys(options).length > 0 ? { options } : {}),
    });
    if (!checked.ok) refuse('The request', checked.problems);
    await withClient(async (client) => {
      const handle = await startPlannedFailover(client, checked.value);
      const json = Boolean(o.json);
      const say = (line: string) => (json ? process.stderr : process.stdout).write(`${line}\n`);
      say(`Planned failover started: workflow ${handle.workflowId}`);
      if (o.detach) return;
      const stop = followSessions(client, handle.workflowId, (line) => say(`  ${line}`));
      let result: PlannedFailoverResult | undefined;
      let failure: ReturnType<typeof explain> | undefined;
      try {
        result = await handle.result();
      } catch (err) {
        failure = explain(err);
        if (
          failure.type === FailureTypes.plannedFailoverIncomplete ||
          failure.type === FailureTypes.zeroDataLossUnproven
        )
          result = failure.details as PlannedFailoverResult;
      } finally {
        await stop();
      }
      if (json) process.stdout.write(`${JSON.stringify(result ?? { error: failure }, null, 2)}\n`);
      else {
        if (result) say(`\n${plannedFailoverTable(result)}`);
        if (failure) say(`\n${failure.message}`);
      }
      if (failure) process.exitCode = refusalExitCode(failure.type);
    });
  });

program
  .command('replicate')
  .description('Run a replication job now (seeds new replicas, then copies only changes)')
  .requiredOption('--job <name>', 'the replication job, as named in the configuration')
  .requiredOption('--user <name>', 'who asks')
  .option('--vm <name>', 'only these VMs of the job (repeat, or separate with commas)', collect)
  .option('--reason <text>', 'why; recorded with the run')
  .option('--json', 'print the result as JSON')
  .action(async (o: { job: string; user: string; vm?: string[]; reason?: string; json?: boolean }) => {
    const checked = validate(replicationJobInputSchema, {
      job: o.job,
      requestedBy: o.user,
      vms: o.vm,
      reason: o.reason,
    });
    if (!checked.ok) refuse('The request', checked.problems);
    await withClient(async (client) => {
      const handle = await startReplicationJob(client, checked.value);
      if (!o.json) console.log(`Replication job ${o.job} started: workflow ${handle.workflowId}`);
      try {
        const result = await handle.result();
        console.log(o.json ? JSON.stringify(result, null, 2) : replicationJobTable([result]));
        if (result.sessions.some((s) => s.outcome === 'failed')) process.exitCode = 1;
      } catch (err) {
        const failure = explain(err);
        console.error(failure.message);
        process.exitCode = refusalExitCode(failure.type);
      }
    });
  });

program
  .command('state')
  .description("Show a replica's state, restore points, current session and last rejection")
  .requiredOption('--vm <name>', 'the source VM of the replica')
  .option('--json', 'print the state as JSON')
  .action(async (o: { vm: string; json?: boolean }) => {
    await withClient(async (client) => {
      const view = await client.workflow.getHandle(replicaWorkflowId(o.vm)).query(replicaQueries.state);
      if (o.json) return console.log(JSON.stringify(view, null, 2));
      console.log(`${view.vm} (job ${view.job}): ${view.state}`);
      console.log(
        `current session: ${view.currentSession ? `${view.currentSession.sessionId} (${view.currentSession.kind})` : 'none'}`,
      );
      if (view.productionVm) console.log(`production runs on: ${view.productionVm.vm} (${view.productionVm.host})`);
      if (view.attention) console.log(`ATTENTION: ${view.attention}`);
      if (view.lastRun) console.log(`last run: ${view.lastRun.at} ${view.lastRun.outcome}`);
      if (view.lastVerification)
        console.log(
          `last whole-disk verification: ${view.lastVerification.identical === true ? 'identical' : view.lastVerification.identical === false ? `MISMATCH, ${view.lastVerification.mismatchedBlocks} block(s)` : `not run (${view.lastVerification.error ?? 'unknown'})`}; ${view.lastVerification.covered}`,
        );
      if (view.lastRejection)
        console.log(
          `last rejection: ${view.lastRejection.operation} by ${view.lastRejection.requestedBy}: ${view.lastRejection.reason}`,
        );
      console.log(
        `\n${formatTable(
          ['restore point', 'created', 'kind', 'written', 'data from'],
          view.restorePoints.map((p) => [
            p.id,
            p.createdAt,
            p.kind,
            formatBytes(p.bytesWritten),
            [p.source.kind, p.source.vm ?? p.source.backupId, p.source.at].filter(Boolean).join(' '),
          ]),
        )}`,
      );
    });
  });

program
  .command('decide')
  .description('Decide for a halted planned-failover session: retry, abort or forceFailover')
  .argument('<decision>', 'retry | abort | forceFailover')
  .requiredOption('--session <workflowId>', "the halted session's workflow id (session/<vm>/<id>)")
  .requiredOption('--user <name>', 'who decides; needs the failover roles')
  .requiredOption('--reason <text>', 'why; recorded in the history')
  .addHelpText(
    'after',
    '\nretry: run the failed step again.  abort: power the source back on first; the replica stays Ready.\n' +
      'forceFailover: fail over to the newest verified helper point (point 1: what was not synced is recorded lost).\n' +
      'A decision applies to the halt that is current when it arrives; a stale one is refused (exit code 2).\n' +
      'Find halted sessions with: temporal workflow list --query \'FailoverStep="Halted"\'',
  )
  .action(async (decision: string, o: { session: string; user: string; reason: string }) => {
    if (decision !== 'retry' && decision !== 'abort' && decision !== 'forceFailover') {
      refuse('The decision', [{ path: 'decision', message: 'must be retry, abort or forceFailover' }]);
    }
    const checked = validate(operatorRequestSchema, { requestedBy: o.user, reason: o.reason });
    if (!checked.ok) refuse('The decision', checked.problems);
    await withClient(async (client) => {
      try {
        const outcome = await client.workflow
          .getHandle(o.session)
          .executeUpdate(haltedSessionUpdates[decision], { args: [checked.value] });
        console.log(outcome);
      } catch (err) {
        if (!(err instanceof WorkflowUpdateFailedError)) throw err;
        console.error(`${decision} of ${o.session} refused: ${explain(err.cause ?? err).message}`);
        process.exitCode = 2;
      }
    });
  });

/** The operations that finish a failover, each an update of replica/<vm>: the outcome, or why it was refused. */
function operationCommand(
  command: string,
  operation: OperationName,
  description: string,
  configure: (c: Command) => Command,
  payloadOf: (o: Record<string, unknown>) => Record<string, unknown>,
): void {
  configure(
    program
      .command(command)
      .description(description)
      .requiredOption('--vm <name>', 'the source VM of the replica')
      .requiredOption('--user <name>', 'who asks; needs Backup Administrator, or Backup Operator and Restore Operator')
      .requiredOption('--reason <text>', 'why; recorded in the history')
      .option('--json', 'print the outcome as JSON'),
  ).action(async (o: Record<string, unknown>) => {
    const payload = { requestedBy: o.user, reason: o.reason, ...payloadOf(o) };
    const checked = validate(operationSchemas[operation], payload);
    if (!checked.ok) refuse(`The ${operation} request`, checked.problems);
    const vm = String(o.vm);
    await withClient(async (client) => {
      const handle = client.workflow.getHandle(replicaWorkflowId(vm));
      // Progress goes to stderr, so that stdout holds only the outcome (the JSON with --json).
      const stop = followOperation(client, vm, checked.value, (line) => process.stderr.write(`  ${line}\n`));
      let outcome: OperationOutcome;
      try {
        outcome = await handle.executeUpdate(operationUpdates[operation], { args: [checked.value] });
      } catch (err) {
        if (!(err instanceof WorkflowUpdateFailedError)) throw err;
        console.error(`${operation} of ${vm} refused: ${explain(err.cause ?? err).message}`);
        process.exitCode = 2;
        return;
      } finally {
        await stop();
      }
      console.log(o.json ? JSON.stringify(outcome, null, 2) : `${vm}: ${outcome.state}. ${outcome.detail}`);
    });
  });
}

operationCommand(
  'undo',
  'undoFailover',
  'Undo a failover: replica off, its changes discarded, state Ready; the source is powered on',
  (c) => c.option('--no-power-on-source', 'leave the source VM off'),
  (o) => ({ powerOnSource: o.powerOnSource !== false }),
);
operationCommand(
  'permanent',
  'permanentFailover',
  'Make a failover permanent: restore points merged and deleted, the replica is production (irreversible)',
  (c) => c.option('--confirm', 'required: says you know this cannot be undone'),
  (o) => (o.confirm ? { confirm: true } : {}),
);
operationCommand(
  'failback',
  'failback',
  "Ship the replica's changes back to production (the original VM by default), keep a protective point",
  (c) =>
    c
      .option('--to-restored <vm>', 'fail back to a VM restored elsewhere, found by name')
      .option('--to-new <vm@host>', 'fail back to a new VM created on a production host (full copy)')
      .option('--no-power-on', 'leave the production VM off afterwards')
      .option(
        '--confirm',
        'needed when the production VM runs (as after a regular failover): its guest is shut down and what it wrote since the failover is overwritten',
      ),
  (o) => {
    const target =
      typeof o.toRestored === 'string'
        ? { restoredVm: o.toRestored }
        : typeof o.toNew === 'string'
          ? { newVm: { name: o.toNew.split('@')[0], host: o.toNew.split('@')[1] } }
          : 'original';
    return { target, powerOnProduction: o.powerOn !== false, ...(o.confirm ? { confirm: true } : {}) };
  },
);
operationCommand(
  'commit-failback',
  'commitFailback',
  'Commit a failback: state Ready, replication resumes',
  (c) => c,
  () => ({}),
);
operationCommand(
  'undo-failback',
  'undoFailback',
  'Undo a failback: production VM off, the replica runs again from its pre-failback state',
  (c) => c,
  () => ({}),
);
operationCommand(
  'failover-to',
  'failover',
  'Regular failover to a chosen restore point (helper points included); the source is untouched',
  (c) =>
    c
      .option('--point <id>', 'the restore point id')
      .option('--at <time>', 'the newest point at or before this ISO time'),
  (o) => ({ ...(o.point ? { restorePointId: o.point } : {}), ...(o.at ? { at: o.at } : {}) }),
);

program
  .command('schedules')
  .description(
    'Make the Temporal Schedules of replication jobs match the configuration (workers do it when they start)',
  )
  .option('--config <file>', 'the configuration file', process.env.PF_CONFIG ?? DEFAULT_CONFIG_PATH)
  .action(async (o: { config: string }) => {
    const config = loadConfiguration(o.config);
    await withClient(async (client) => {
      const sync = await syncJobSchedules(client, config);
      for (const [what, ids] of Object.entries(sync) as [string, string[]][])
        for (const id of ids) console.log(`${what}: ${id}`);
      if (Object.values(sync).every((ids: string[]) => ids.length === 0)) console.log('No job has a schedule.');
    });
  });

program
  .command('proxy')
  .description('Take a proxy offline (no new copies; running ones finish) or bring it back')
  .argument('<state>', 'offline | online')
  .argument('<proxy>', 'the proxy name, as in the configuration')
  .requiredOption('--user <name>', 'who asks; needs Backup Administrator')
  .option('--reason <text>', 'why; recorded in the history')
  .action(async (state: string, proxy: string, o: { user: string; reason?: string }) => {
    if (state !== 'offline' && state !== 'online')
      refuse('The proxy command', [{ path: 'state', message: 'must be offline or online' }]);
    const checked = validate(setProxyOnlineSchema, {
      proxy,
      online: state === 'online',
      requestedBy: o.user,
      ...(o.reason ? { reason: o.reason } : {}),
    });
    if (!checked.ok) refuse('The proxy command', checked.problems);
    await withClient(async (client) => {
      // Sent as signed; a signal cannot answer, so the registry's lastRejection (the `slots` query) says a refusal.
      await client.workflow.getHandle(PROXY_REGISTRY_WORKFLOW_ID).signal(proxySignals.setProxyOnline, checked.value);
      console.log(`Asked to take proxy ${proxy} ${state}; a refusal shows in: failover slots`);
    });
  });

program
  .command('audit')
  .description('Who asked for what: every request verified (or refused) since a time, from the histories')
  .requiredOption('--since <time>', 'how far back: 30m, 24h, 7d, or an ISO time')
  .option('--user <name>', 'only the requests that named this user')
  .option('--json', 'print the records as JSON')
  .action(async (o: { since: string; user?: string; json?: boolean }) => {
    const since = sinceOf(o.since);
    if (!since) refuse('The audit command', [{ path: '--since', message: 'must be like 30m, 24h, 7d or an ISO time' }]);
    await withClient(async (client) => {
      const records = await auditSince(client, since, o.user);
      console.log(o.json ? JSON.stringify(records, null, 2) : auditTable(records));
    });
  });

const keys = program
  .command('keys')
  .description("Operators' signing keys (Ed25519): every request is signed by its requester");

keys
  .command('create')
  .description(
    "Make a user's key pair: the private key in the per-user configuration directory (mode 0600), and print the " +
      'public-key line to add to the user in the configuration',
  )
  .requiredOption('--user <name>', 'the user, as named in the configuration')
  .option('--file <path>', 'where to keep the private key', undefined)
  .action(async (o: { user: string; file?: string }) => {
    // The user's name becomes the key file's name: a name as the configuration allows it, never a path.
    if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(o.user))
      refuse('The keys command', [
        {
          path: '--user',
          message: 'must be a user name as in the configuration: letters, digits, dots, dashes, underscores',
        },
      ]);
    const made = await createUserKey(o.file ?? userKeyFile(o.user));
    console.log(`Private key of ${o.user}: ${made.file} (mode 0600; keep it with ${o.user} alone)`);
    console.log(`Fingerprint: ${made.keyId}`);
    console.log(`Add to ${o.user} in the configuration (keep the old key listed until every signer has the new one):`);
    console.log(`    keys: ['${made.publicKey}']`);
  });

program
  .command('sign')
  .description(
    "Print a request signed with its requester's key, for the Temporal CLI's --input " +
      '(the project CLI signs by itself); valid for the configured minutes, once',
  )
  .argument('<operation>', `one of: ${SignedOperations.join(', ')}`)
  .requiredOption(
    '--input <json>',
    'the request, with requestedBy and reason, e.g. \'{"requestedBy":"alice","reason":"..."}\'',
  )
  .option('--workflow-id <id>', 'the workflow a signal or update goes to (replica/<vm>, a session, proxy-slots)')
  .option('--key <file>', "the private key (default: the requester's in the per-user configuration directory)")
  .addHelpText(
    'after',
    '\nExample:\n  temporal workflow update execute --workflow-id replica/sql01 --name undoFailover \\\n' +
      '    --input "$(npm run -s failover -- sign undoFailover --workflow-id replica/sql01 \\\n' +
      '      --input \'{"requestedBy":"alice","reason":"test over"}\')"',
  )
  .action((operation: string, o: { input: string; workflowId?: string; key?: string }) => {
    if (!isSignedOperation(operation))
      refuse('The sign command', [{ path: 'operation', message: `must be one of ${SignedOperations.join(', ')}` }]);
    const started = STARTED_OPERATIONS.includes(operation);
    if (!started && !o.workflowId)
      refuse('The sign command', [
        { path: '--workflow-id', message: `is required: ${operation} is sent to a workflow` },
      ]);
    let request: unknown;
    try {
      request = JSON.parse(o.input);
    } catch (err) {
      refuse('The sign command', [{ path: '--input', message: `is not JSON: ${(err as Error).message}` }]);
    }
    const requestedBy = (request as { requestedBy?: unknown } | null)?.requestedBy;
    if (request === null || typeof request !== 'object' || Array.isArray(request) || typeof requestedBy !== 'string')
      refuse('The sign command', [{ path: '--input', message: 'must be a JSON object with requestedBy' }]);
    const key = o.key ? loadUserKey(o.key) : keysIn()(requestedBy);
    const target = requestTarget(operation, o.workflowId);
    console.log(JSON.stringify(signRequest(operation, target, request as Record<string, unknown>, key)));
  });

const certs = program
  .command('certs')
  .description("The host API's certificates of a site (mutual TLS between the workers and the hosts' API servers)");

certs
  .command('create')
  .description(
    "Make the site's CA if missing and every named certificate that is missing or not valid for its names; " +
      'prints paths and fingerprints, never keys',
  )
  .requiredOption('--dir <dir>', 'the site directory: ca.crt, ca.key, <name>.crt and <name>.key (keys mode 0600)')
  .option(
    '--hosts <names>',
    "host certificates: each KVM host's name (or `lab`), repeat or separate with commas",
    collect,
  )
  .option('--clients <names>', 'client certificates: the workers, the CLI (repeat or separate with commas)', collect)
  .option(
    '--host-names <host=names>',
    'more subjectAltName entries of a host: kvm01=kvm01.example.com,10.0.0.5 (repeat per host)',
    (value: string, previous: string[] = []) => [...previous, value],
  )
  .option('--days <n>', 'validity of the host and client certificates it makes (default 730; the CA: 3650)')
  .option('--reissue', 'make the named host and client certificates again even if valid')
  .option('--new-ca', 'make a new CA (every certificate of the old one stops working) and the named certificates again')
  .addHelpText(
    'after',
    '\nExample:\n  npm run failover -- certs create --dir site --hosts kvm01,kvm-dr01 --clients workers \\\n' +
      '    --host-names kvm01=kvm01.example.com,10.0.0.5',
  )
  .action(async (o: Record<string, unknown>) => {
    const checked = validate(certsCreateSchema, {
      '--dir': o.dir,
      '--hosts': o.hosts,
      '--clients': o.clients,
      '--host-names': o.hostNames,
      '--days': o.days,
      '--reissue': o.reissue ?? false,
      '--new-ca': o.newCa ?? false,
    });
    if (!checked.ok) refuse('certs create', checked.problems);
    console.log(certificatesReport(checked.value['--dir'], await createCertificates(checked.value)));
  });

program.parseAsync().catch((err: unknown) => {
  if (err instanceof CommanderError) {
    process.exitCode = err.exitCode === 0 ? 0 : 2; // commander has printed its message already
  } else if (err instanceof UsageError) {
    console.error(err.message);
    process.exitCode = 2;
  } else {
    console.error(`error: ${explain(err).message}`);
    process.exitCode = 1;
  }
});
