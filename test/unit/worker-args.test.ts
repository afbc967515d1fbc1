import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { parseConfiguration } from '../../src/config/load';
import { proxyTaskQueue, TASK_QUEUE } from '../../src/contract';
import {
  ALL_ROLES,
  DEFAULT_CONFIG_PATH,
  parseWorkerArgs,
  taskQueuesPolledBy,
  workerRolesFor,
  WorkerArgsError,
  type WorkerArgs,
  type WorkerRoles,
} from '../../src/worker-args';

const config = parseConfiguration(`
hosts:
  - { name: prod, role: production, adapter: { type: lab, url: http://127.0.0.1:7300 } }
  - { name: dr, role: dr, adapter: { type: lab, url: http://127.0.0.1:7300 } }
proxies:
  - { name: proxy01, slots: 2 }
  - { name: proxy02, slots: 2 }
  - { name: proxy03, slots: 1 }
users:
  - { name: alice, roles: [BackupAdministrator] }
`);

const noEnv = {};

function parsed(argv: string[], env: NodeJS.ProcessEnv = noEnv): WorkerArgs {
  const args = parseWorkerArgs(argv, env);
  assert.ok(!('help' in args), `expected arguments, got help for ${argv.join(' ')}`);
  return args;
}

const rolesOf = (...argv: string[]): WorkerRoles => workerRolesFor(parsed(argv), config);

/** The message a refused command line gets: from the parsing, or from checking it against the configuration. */
function refusal(...argv: string[]): string {
  try {
    rolesOf(...argv);
  } catch (err) {
    assert.ok(err instanceof WorkerArgsError, `expected a WorkerArgsError, got ${String(err)}`);
    return err.message;
  }
  return assert.fail(`expected ${argv.join(' ')} to be refused`);
}

describe('the worker command line', () => {
  it('runs every worker with the default configuration when given no flag', () => {
    assert.deepEqual(parsed([]), { configPath: DEFAULT_CONFIG_PATH });
    assert.deepEqual(rolesOf(), ALL_ROLES);
  });

  it('takes the configuration from --config, else from PF_CONFIG', () => {
    assert.equal(parsed([], { PF_CONFIG: 'site.yaml' }).configPath, 'site.yaml');
    assert.equal(parsed(['--config', 'other.yaml'], { PF_CONFIG: 'site.yaml' }).configPath, 'other.yaml');
  });

  it('runs only the orchestration for --only orchestration', () => {
    assert.deepEqual(rolesOf('--only', 'orchestration'), { orchestration: true, proxies: [] });
  });

  it('runs only the named proxies for --only proxy <name...>, before or after --config', () => {
    assert.deepEqual(rolesOf('--only', 'proxy', 'proxy01'), { orchestration: false, proxies: ['proxy01'] });
    assert.deepEqual(parsed(['--only', 'proxy', 'proxy03', 'proxy01', '--config', 'c.yaml']), {
      configPath: 'c.yaml',
      only: { role: 'proxy', proxies: ['proxy03', 'proxy01'] },
    });
    assert.deepEqual(parsed(['--config', 'c.yaml', '--only', 'proxy', 'proxy02']).only, {
      role: 'proxy',
      proxies: ['proxy02'],
    });
  });

  it('refuses an unknown role, naming --only and what it takes', () => {
    assert.equal(
      refusal('--only', 'workflows'),
      "The worker command line was refused (1 problem): --only: must be orchestration or proxy <name...>, not 'workflows'",
    );
  });

  it('refuses proxy without names, and orchestration with names', () => {
    assert.match(refusal('--only', 'proxy'), /--only: proxy needs the names of the proxies to run/);
    assert.match(refusal('--only', 'orchestration', 'proxy01'), /--only: orchestration takes no names, not 'proxy01'/);
    assert.match(refusal('--only', 'proxy', 'proxy01', 'proxy01'), /--only: names 'proxy01' more than once/);
  });

  it('refuses a proxy the configuration does not have, listing the ones it has', () => {
    assert.equal(
      refusal('--only', 'proxy', 'proxy01', 'proxy9', '--config', 'site.yaml'),
      "The worker command line was refused (1 problem): --only: site.yaml has no proxy 'proxy9'; " +
        "its proxies are 'proxy01', 'proxy02', 'proxy03'",
    );
  });

  it('serves metrics where --metrics says, else where PF_METRICS_ADDRESS says, else nowhere', () => {
    assert.equal(parsed([]).metricsAddress, undefined);
    assert.equal(parsed(['--metrics', '0.0.0.0:9464']).metricsAddress, '0.0.0.0:9464');
    assert.equal(parsed([], { PF_METRICS_ADDRESS: '127.0.0.1:9500' }).metricsAddress, '127.0.0.1:9500');
    assert.equal(parsed(['--metrics', 'host:1'], { PF_METRICS_ADDRESS: '127.0.0.1:9500' }).metricsAddress, 'host:1');
    assert.match(refusal('--metrics', '9464'), /--metrics: must be host:port, as in 127\.0\.0\.1:9464/);
    assert.match(refusal('--metrics', 'localhost:99999'), /--metrics: has a port above 65535/);
  });

  it('refuses unknown flags, flags without their value and stray arguments, naming them', () => {
    assert.match(refusal('--proxy', 'proxy01'), /unknown option '--proxy'/);
    assert.match(refusal('--only'), /option '--only <role\.\.\.>' argument missing/);
    assert.match(refusal('--config'), /option '--config <file>' argument missing/);
    assert.match(refusal('--config', ''), /--config: must name a file/);
    assert.match(refusal('orchestration'), /too many arguments/);
  });

  it('gives the help text for --help, naming both roles', () => {
    const args = parseWorkerArgs(['--help'], noEnv);
    assert.ok('help' in args);
    assert.match(args.help, /--only <role\.\.\.>/);
    assert.match(args.help, /--only proxy proxy01/);
  });
});

describe('the task queues a worker process polls', () => {
  it('are the orchestration queue and every proxy queue for all roles, only its own otherwise', () => {
    const proxyQueues = ['proxy01', 'proxy02', 'proxy03'].map(proxyTaskQueue);
    assert.deepEqual(taskQueuesPolledBy(ALL_ROLES, config), [TASK_QUEUE, ...proxyQueues]);
    assert.deepEqual(taskQueuesPolledBy(rolesOf('--only', 'orchestration'), config), [TASK_QUEUE]);
    assert.deepEqual(taskQueuesPolledBy(rolesOf('--only', 'proxy', 'proxy03', 'proxy01'), config), [
      proxyTaskQueue('proxy01'),
      proxyTaskQueue('proxy03'),
    ]);
  });
});
