// `npm test [-- files or folders]`: starts one Temporal dev server for the whole run, bundles the workflows
// once, runs every *.test.ts with Node's test runner, and always stops the server, also on failure or Ctrl-C.
// PF_TEST_SUGGEST_CONTINUE_AS_NEW=<events> starts the server with that continue-as-new suggestion, so that the
// long-lived entities continue as new many times during the run (CI runs the integration tests once so).
// PF_TEST_SERVER=<host:port> runs the tests against a Temporal server that is already running (a cluster): no dev
// server is started, and each test file creates its namespaces and search attributes there, as it does on its own.
// A secured one (`npm run cluster -- --secure`) also takes PF_TEST_SERVER_TLS_CA, PF_TEST_SERVER_TLS_SERVER_NAME and
// PF_TEST_SERVER_JWT_KEY: every connection of the tests then goes over TLS with a token (test/server-access.ts).
// PF_TEST_SPLIT_WORKERS=1 runs the orchestrator's workers of the integration tests as an operator deploys them on
// machines of their own (`npm run worker -- --only ...`): not in the test's process but the orchestration in a
// process of its own and each proxy in one of its own (test/harness.ts; a test that hands the workers a hypervisor
// port of its own keeps them in its process). The test files inherit it with the rest of the environment.
import { spawn } from 'node:child_process';
import { mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative, resolve } from 'node:path';
import { ensureTemporalCli, freePort, projectRoot, startDevServer, type DevServer } from '../scripts/lib/dev-server';
import { bundleWorkflows } from '../src/worker';
import { makeTestKeys } from './keys';
import { securedServer } from './server-access';
import { makeTestSite } from './tls';

function testFiles(paths: string[]): string[] {
  const found: string[] = [];
  const visit = (path: string): void => {
    if (statSync(path).isDirectory()) {
      for (const entry of readdirSync(path).sort()) if (entry !== 'node_modules') visit(join(path, entry));
    } else if (path.endsWith('.test.ts')) {
      found.push(relative(projectRoot, path));
    }
  };
  for (const path of paths) visit(resolve(path));
  return found;
}

/** The server to test against instead of a dev server of the run's own, if one is named. */
function externalServer(): string | undefined {
  const value = process.env.PF_TEST_SERVER;
  if (value === undefined || value === '') return undefined;
  if (!/^[A-Za-z0-9.-]+:\d{1,5}$/.test(value)) throw new Error(`PF_TEST_SERVER must be host:port, not '${value}'`);
  return value;
}

function splitWorkers(): boolean {
  const value = process.env.PF_TEST_SPLIT_WORKERS;
  if (value === undefined || value === '' || value === '0') return false;
  if (value !== '1') throw new Error(`PF_TEST_SPLIT_WORKERS must be 1 (or 0), not '${value}'`);
  return true;
}

function suggestedContinueAsNew(): number | undefined {
  const value = process.env.PF_TEST_SUGGEST_CONTINUE_AS_NEW;
  if (value === undefined || value === '') return undefined;
  if (!/^[1-9]\d*$/.test(value))
    throw new Error(`PF_TEST_SUGGEST_CONTINUE_AS_NEW must be a whole number of events, not '${value}'`);
  return Number(value);
}

async function main(): Promise<number> {
  const started = Date.now();
  const suggestContinueAsNew = suggestedContinueAsNew();
  const external = externalServer();
  const split = splitWorkers();
  if (external && suggestContinueAsNew)
    throw new Error(
      'PF_TEST_SUGGEST_CONTINUE_AS_NEW sets up a dev server of its own: it cannot go with PF_TEST_SERVER',
    );
  // Checked here, once, naming the variable: every test process reads them again.
  const secured = securedServer();
  if (secured && !external)
    throw new Error('PF_TEST_SERVER_TLS_CA and the rest secure a server named by PF_TEST_SERVER: it is not set');
  const files = testFiles(process.argv.length > 2 ? process.argv.slice(2) : [join(projectRoot, 'test')]);
  if (files.length === 0) throw new Error('No *.test.ts files found.');

  const cli = ensureTemporalCli();
  const workDir = mkdtempSync(join(tmpdir(), 'pf-test-'));
  let server: DevServer | undefined;
  const cleanup = async (): Promise<void> => {
    await server?.stop();
    rmSync(workDir, { recursive: true, force: true });
  };
  let interrupted = false;
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.once(signal, () => {
      interrupted = true;
      console.error(`\n${signal}: stopping the tests and the Temporal server...`);
      void cleanup().then(() => process.exit(130));
    });
  }
  try {
    let address: string;
    if (external) {
      address = external;
      console.log(
        `Temporal server for tests: ${address} (PF_TEST_SERVER; no dev server started)` +
          (secured
            ? `, over TLS (CA ${secured.caFile})` +
              (secured.key ? ", with tokens for the tests' namespaces signed by PF_TEST_SERVER_JWT_KEY" : '')
            : ''),
      );
    } else {
      server = await startDevServer({
        cli,
        port: await freePort(),
        dbFile: join(workDir, 'temporal.db'),
        logFile: join(workDir, 'server.log'),
        readyTimeoutMs: 120_000,
        ...(suggestContinueAsNew
          ? { dynamicConfig: { 'limit.historyCount.suggestContinueAsNew': suggestContinueAsNew } }
          : {}),
      });
      address = server.address;
      console.log(
        `Temporal dev server for tests at ${address} (${((Date.now() - started) / 1000).toFixed(1)} s)` +
          (suggestContinueAsNew ? `, continue-as-new suggested after ${suggestContinueAsNew} events` : ''),
      );
    }

    if (split)
      console.log('Workers of the integration tests: the orchestration and each proxy in processes of their own');

    // One site for the run's mutual TLS: its CA and the tests' client certificate (PF_TEST_CERTS).
    await makeTestSite(join(workDir, 'certs'));
    // The test users' signing keys (PF_TEST_KEYS).
    await makeTestKeys(join(workDir, 'keys'));

    // Bundling takes seconds; doing it once here saves it in every test file's process.
    const { code } = await bundleWorkflows();
    const bundlePath = join(workDir, 'workflow-bundle.js');
    writeFileSync(bundlePath, code);

    const child = spawn(process.execPath, ['--import', 'tsx', '--test', '--test-reporter=spec', ...files], {
      stdio: 'inherit',
      cwd: projectRoot,
      env: {
        ...process.env,
        PF_TEST_TEMPORAL_ADDRESS: address,
        PF_TEST_TEMPORAL_CLI: cli,
        PF_TEST_WORKFLOW_BUNDLE: bundlePath,
      },
    });
    const exitCode = await new Promise<number>((resolveExit) => child.once('exit', (c) => resolveExit(c ?? 1)));
    console.log(`Test run took ${((Date.now() - started) / 1000).toFixed(1)} s`);
    return exitCode;
  } finally {
    if (!interrupted) await cleanup();
  }
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    console.error(err);
    process.exit(1);
  },
);
