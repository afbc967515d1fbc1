// The bad-input matrix: for every entry point (workflow inputs, signals, updates, halted-session decisions, the
// project CLI, the lab's HTTP API, the configuration and estate files), inputs that must be refused with an error
// naming the field and saying what is wrong, and change nothing. test/integration/bad-input.test.ts runs each case
// against a real server and lab and checks that nothing changed; docs/bad-input.md shows the same table
// (`node --import tsx test/bad-input-matrix.ts` prints it).

export type EntryPoint =
  | 'plannedFailover input'
  | 'replicationJob input'
  | 'operation update'
  | 'operation signal'
  | 'proxy registry signal'
  | 'halted-session decision'
  | 'project CLI'
  | 'lab HTTP'
  | 'configuration file'
  | 'estate file';

/**
 * How a request is signed: by its requester's key as it leaves (the default, as the project CLI does), not at all, or
 * by its requester's key as if that many minutes ago.
 */
export type Signing = { signing?: 'unsigned' | { minutesAgo: number } };

/** What one case sends; the test knows how to send each kind. */
export type Send =
  | ({ kind: 'start'; workflow: 'plannedFailover' | 'replicationJob'; input: unknown } & Signing)
  | ({ kind: 'update' | 'signal'; operation: string; payload: unknown } & Signing)
  | ({ kind: 'proxySignal'; payload: unknown } & Signing)
  | ({ kind: 'decision'; decision: 'retry' | 'abort' | 'forceFailover'; payload: unknown } & Signing)
  | { kind: 'cli'; args: string[] }
  | { kind: 'http'; method: 'GET' | 'PUT' | 'POST'; path: string; body?: string; contentType?: string }
  | { kind: 'configuration'; yaml: string }
  | { kind: 'estate'; estate: unknown };

export interface BadInputCase {
  entry: EntryPoint;
  /** What is wrong with the input, in a few words. */
  what: string;
  send: Send;
  /** The field the error must name. */
  field: string;
  /** Text the error message must contain, beside the field. */
  says: string;
}

const who = { requestedBy: 'alice', reason: 'matrix' };
const pf = (input: unknown): Extract<Send, { kind: 'start' }> => ({
  kind: 'start',
  workflow: 'plannedFailover',
  input,
});
const job = (input: unknown): Extract<Send, { kind: 'start' }> => ({
  kind: 'start',
  workflow: 'replicationJob',
  input,
});
const update = (operation: string, payload: unknown): Send => ({ kind: 'update', operation, payload });
const signal = (operation: string, payload: unknown): Send => ({ kind: 'signal', operation, payload });
const decision = (d: 'retry' | 'abort' | 'forceFailover', payload: unknown): Extract<Send, { kind: 'decision' }> => ({
  kind: 'decision',
  decision: d,
  payload,
});
const cli = (...args: string[]): Send => ({ kind: 'cli', args });
const http = (method: 'GET' | 'PUT' | 'POST', path: string, body?: string, contentType?: string): Send => ({
  kind: 'http',
  method,
  path,
  ...(body !== undefined ? { body } : {}),
  ...(contentType ? { contentType } : {}),
});

/** A valid configuration file, for the cases to break one field of. */
export const GOOD_CONFIGURATION = `hosts:
  - { name: prod-a, role: production, adapter: { type: lab, url: 'http://127.0.0.1:7300' } }
  - { name: dr-a, role: dr, adapter: { type: lab, url: 'http://127.0.0.1:7300' } }
proxies:
  - { name: proxy-a, slots: 2 }
users:
  - { name: alice, roles: [BackupAdministrator] }
jobs:
  - { name: sql, vms: [vm1], targetHost: dr-a }
`;
const configuration = (from: string, to: string): Send => {
  if (!GOOD_CONFIGURATION.includes(from)) throw new Error(`the good configuration has no '${from}'`);
  return { kind: 'configuration', yaml: GOOD_CONFIGURATION.replace(from, to) };
};

/** A valid estate, for the cases to break one field of. */
export const goodEstate = (vm: Record<string, unknown> = {}, site: Record<string, unknown> = {}) => ({
  sites: [
    {
      name: 'production',
      role: 'production',
      hosts: [{ name: 'prod-a', vms: [{ name: 'vm1', disks: [{ id: 'os', size: '4MiB' }], ...vm }] }],
      ...site,
    },
    { name: 'dr', role: 'dr', hosts: [{ name: 'dr-a' }] },
  ],
});

const VM_PATH = '/v1/hosts/prod-a/vms/vm1';

export const BAD_INPUT_CASES: BadInputCase[] = [
  // plannedFailover, as started from the Temporal CLI, the Web UI or a script.
  {
    entry: 'plannedFailover input',
    what: 'not an object',
    send: pf('sql01'),
    field: '(input)',
    says: 'must be a JSON object',
  },
  { entry: 'plannedFailover input', what: 'vms missing', send: pf({ ...who }), field: 'vms', says: 'is required' },
  {
    entry: 'plannedFailover input',
    what: 'vms empty',
    send: pf({ vms: [], ...who }),
    field: 'vms',
    says: 'must name at least one VM',
  },
  {
    entry: 'plannedFailover input',
    what: 'a VM name with a slash',
    send: pf({ vms: ['vm1/x'], ...who }),
    field: 'vms[0]',
    says: 'must be a VM name',
  },
  {
    entry: 'plannedFailover input',
    what: 'the same VM twice, in other case',
    send: pf({ vms: ['vm1', 'VM1'], ...who }),
    field: 'vms[1]',
    says: 'is already named at vms[0]',
  },
  {
    entry: 'plannedFailover input',
    what: 'reason only blanks',
    send: pf({ vms: ['vm1'], requestedBy: 'alice', reason: '   ' }),
    field: 'reason',
    says: 'must not be empty',
  },
  {
    entry: 'plannedFailover input',
    what: 'requestedBy not a string',
    send: pf({ vms: ['vm1'], reason: 'r', requestedBy: 7 }),
    field: 'requestedBy',
    says: 'must be a string',
  },
  {
    entry: 'plannedFailover input',
    what: 'maxParallelJobs 0',
    send: pf({ vms: ['vm1'], ...who, options: { maxParallelJobs: 0 } }),
    field: 'options.maxParallelJobs',
    says: 'must be at least 1',
  },
  {
    entry: 'plannedFailover input',
    what: 'shutdownTimeoutSeconds a fraction',
    send: pf({ vms: ['vm1'], ...who, options: { shutdownTimeoutSeconds: 1.5 } }),
    field: 'options.shutdownTimeoutSeconds',
    says: 'must be a whole number',
  },
  {
    entry: 'plannedFailover input',
    what: 'an unknown option',
    send: pf({ vms: ['vm1'], ...who, options: { skipVerification: true } }),
    field: 'options.skipVerification',
    says: 'is not a known field',
  },
  {
    entry: 'plannedFailover input',
    what: 'a VM in no job',
    send: pf({ vms: ['ghost'], ...who }),
    field: 'vms[0]',
    says: "'ghost'",
  },
  {
    entry: 'plannedFailover input',
    what: 'a requester without the failover roles',
    send: pf({ vms: ['vm2'], reason: 'r', requestedBy: 'carol' }),
    field: 'requestedBy',
    says: 'carol',
  },
  {
    entry: 'plannedFailover input',
    what: 'unsigned',
    send: { ...pf({ vms: ['vm2'], ...who }), signing: 'unsigned' },
    field: 'signature',
    says: 'unsigned: this orchestrator accepts only signed requests',
  },
  {
    entry: 'plannedFailover input',
    what: 'a signature without its time and nonce',
    send: pf({ vms: ['vm2'], ...who, signature: `${'A'.repeat(86)}==` }),
    field: 'issuedAt',
    says: 'is required with signature',
  },
  {
    entry: 'plannedFailover input',
    what: 'by a user nobody configured',
    send: { ...pf({ vms: ['vm2'], reason: 'r', requestedBy: 'zed' }), signing: 'unsigned' },
    field: 'requestedBy',
    says: "unknown user 'zed'",
  },

  // replicationJob, as a schedule, the CLI or a script starts it.
  {
    entry: 'replicationJob input',
    what: 'job missing',
    send: job({ requestedBy: 'alice' }),
    field: 'job',
    says: 'is required',
  },
  {
    entry: 'replicationJob input',
    what: 'a job name with a space',
    send: job({ job: 'my job', requestedBy: 'alice' }),
    field: 'job',
    says: 'must be a job name',
  },
  {
    entry: 'replicationJob input',
    what: 'vms empty',
    send: job({ job: 'job-vm1', requestedBy: 'alice', vms: [] }),
    field: 'vms',
    says: 'must name at least one VM',
  },
  {
    entry: 'replicationJob input',
    what: 'proxyWaitTimeoutSeconds 0',
    send: job({ job: 'job-vm1', requestedBy: 'alice', options: { proxyWaitTimeoutSeconds: 0 } }),
    field: 'options.proxyWaitTimeoutSeconds',
    says: 'must be at least 1',
  },
  {
    entry: 'replicationJob input',
    what: 'a user who may not replicate',
    send: job({ job: 'job-vm1', requestedBy: 'erin' }),
    field: 'requestedBy',
    says: 'erin',
  },
  {
    entry: 'replicationJob input',
    what: 'signed 10 minutes ago (valid for 5)',
    send: { ...job({ job: 'job-vm1', requestedBy: 'alice' }), signing: { minutesAgo: 10 } },
    field: 'issuedAt',
    says: 'expired',
  },
  {
    entry: 'replicationJob input',
    what: 'a nonce too short',
    send: job({
      job: 'job-vm1',
      requestedBy: 'alice',
      issuedAt: '2026-12-07T10:00:00Z',
      nonce: 'abc',
      signature: `${'A'.repeat(86)}==`,
    }),
    field: 'nonce',
    says: 'must be 16 to 128',
  },

  // Operations on replica/<vm>, as updates (the caller gets the refusal) and as signals (recorded in the state).
  {
    entry: 'operation update',
    what: 'undoFailover without a reason',
    send: update('undoFailover', { requestedBy: 'alice' }),
    field: 'reason',
    says: 'is required',
  },
  {
    entry: 'operation update',
    what: 'undoFailover powerOnSource as text',
    send: update('undoFailover', { ...who, powerOnSource: 'yes' }),
    field: 'powerOnSource',
    says: 'must be true or false',
  },
  {
    entry: 'operation update',
    what: 'permanentFailover without confirm',
    send: update('permanentFailover', { ...who }),
    field: 'confirm',
    says: 'must be true',
  },
  {
    entry: 'operation update',
    what: 'failback to an unknown kind of target',
    send: update('failback', { ...who, target: 'elsewhere' }),
    field: 'target',
    says: 'must be "original"',
  },
  {
    entry: 'operation update',
    what: 'failback to a new VM with a bad host name',
    send: update('failback', { ...who, target: { newVm: { name: 'vm1-new', host: 'prod a' } } }),
    field: 'target',
    says: 'must be',
  },
  {
    entry: 'operation update',
    what: 'failover with both restorePointId and at',
    send: update('failover', { ...who, restorePointId: 'rp-1', at: '2026-11-25T10:00:00Z' }),
    field: 'restorePointId',
    says: 'give exactly one of restorePointId or at',
  },
  {
    entry: 'operation update',
    what: 'failover at a time without a zone',
    send: update('failover', { ...who, at: '2026-11-25 10:00' }),
    field: 'at',
    says: 'must be an ISO 8601 time',
  },
  {
    entry: 'operation update',
    what: 'commitFailback with an unknown field',
    send: update('commitFailback', { ...who, force: true }),
    field: 'force',
    says: 'is not a known field',
  },
  {
    entry: 'operation update',
    what: 'undoFailback with a payload that is a list',
    send: update('undoFailback', ['alice']),
    field: '(input)',
    says: 'must be a JSON object',
  },
  {
    entry: 'operation signal',
    what: 'failback without requestedBy',
    send: signal('failback', { reason: 'r' }),
    field: 'requestedBy',
    says: 'is required',
  },
  {
    entry: 'operation signal',
    what: 'permanentFailover with confirm false',
    send: signal('permanentFailover', { ...who, confirm: false }),
    field: 'confirm',
    says: 'must be true',
  },
  {
    entry: 'operation signal',
    what: 'failover with neither restorePointId nor at',
    send: signal('failover', { ...who }),
    field: 'restorePointId',
    says: 'give exactly one of restorePointId or at',
  },

  {
    entry: 'operation update',
    what: 'undoFailover with an issue time that is no time',
    send: update('undoFailover', {
      ...who,
      issuedAt: 'yesterday',
      nonce: 'n'.repeat(24),
      signature: `${'A'.repeat(86)}==`,
    }),
    field: 'issuedAt',
    says: 'must be the ISO 8601 time',
  },
  {
    entry: 'operation signal',
    what: 'undoFailback with a signature that is not base64',
    send: signal('undoFailback', {
      ...who,
      issuedAt: '2026-12-07T10:00:00Z',
      nonce: 'n'.repeat(24),
      signature: 'not base64!',
    }),
    field: 'signature',
    says: 'must be an Ed25519 signature',
  },

  // setProxyOnline on the proxy-slots registry, as the Temporal CLI sends it (the project CLI checks it first).
  {
    entry: 'proxy registry signal',
    what: 'online as text',
    send: { kind: 'proxySignal', payload: { proxy: 'proxy-a', online: 'no', requestedBy: 'alice' } },
    field: 'online',
    says: 'must be true or false',
  },
  {
    entry: 'proxy registry signal',
    what: 'a proxy nobody configured',
    send: { kind: 'proxySignal', payload: { proxy: 'proxy-z', online: false, requestedBy: 'alice' } },
    field: 'proxy',
    says: "'proxy-z' is no proxy the registry knows",
  },

  {
    entry: 'proxy registry signal',
    what: 'without requestedBy',
    send: { kind: 'proxySignal', payload: { proxy: 'proxy-a', online: false } },
    field: 'requestedBy',
    says: 'is required',
  },
  {
    entry: 'proxy registry signal',
    what: 'unsigned',
    send: {
      kind: 'proxySignal',
      payload: { proxy: 'proxy-a', online: false, requestedBy: 'alice' },
      signing: 'unsigned',
    },
    field: 'signature',
    says: 'unsigned',
  },

  // Decisions on a session halted in its critical window.
  {
    entry: 'halted-session decision',
    what: 'retry without requestedBy',
    send: decision('retry', { reason: 'r' }),
    field: 'requestedBy',
    says: 'is required',
  },
  {
    entry: 'halted-session decision',
    what: 'abort with an empty reason',
    send: decision('abort', { requestedBy: 'alice', reason: '' }),
    field: 'reason',
    says: 'must not be empty',
  },
  {
    entry: 'halted-session decision',
    what: 'forceFailover with an unknown field',
    send: decision('forceFailover', { ...who, point: 2 }),
    field: 'point',
    says: 'is not a known field',
  },
  {
    entry: 'halted-session decision',
    what: 'abort signed 10 minutes ago',
    send: { ...decision('abort', { ...who }), signing: { minutesAgo: 10 } },
    field: 'issuedAt',
    says: 'expired',
  },
  {
    entry: 'halted-session decision',
    what: 'retry by a viewer',
    send: decision('retry', { requestedBy: 'erin', reason: 'r' }),
    field: 'requestedBy',
    says: 'erin',
  },

  // The project CLI: refused before it connects to anything (exit code 2).
  {
    entry: 'project CLI',
    what: 'planned without --vm',
    send: cli('planned', '--reason', 'r', '--user', 'alice'),
    field: '--vm',
    says: 'not specified',
  },
  {
    entry: 'project CLI',
    what: 'planned --max-parallel-jobs not a number',
    send: cli('planned', '--vm', 'vm1', '--reason', 'r', '--user', 'alice', '--max-parallel-jobs', 'two'),
    field: '--max-parallel-jobs',
    says: 'whole number',
  },
  {
    entry: 'project CLI',
    what: 'planned with a bad VM name',
    send: cli('planned', '--vm', 'vm 1', '--reason', 'r', '--user', 'alice'),
    field: 'vms[0]',
    says: 'must be a VM name',
  },
  {
    entry: 'project CLI',
    what: 'decide with an unknown decision',
    send: cli('decide', 'rollback', '--session', 'session/vm1/x', '--user', 'alice', '--reason', 'r'),
    field: 'decision',
    says: 'must be retry, abort or forceFailover',
  },
  {
    entry: 'project CLI',
    what: 'failover-to --at not a time',
    send: cli('failover-to', '--vm', 'vm2', '--user', 'alice', '--reason', 'r', '--at', 'yesterday'),
    field: 'at',
    says: 'must be an ISO 8601 time',
  },

  {
    entry: 'project CLI',
    what: 'proxy offline with a bad proxy name',
    send: cli('proxy', 'offline', 'proxy a', '--user', 'alice'),
    field: 'proxy',
    says: 'must be a proxy name',
  },

  {
    entry: 'project CLI',
    what: 'sign an operation that does not exist',
    send: cli('sign', 'reboot', '--input', '{"requestedBy":"alice"}'),
    field: 'operation',
    says: 'must be one of plannedFailover',
  },
  {
    entry: 'project CLI',
    what: 'sign an update without the workflow it goes to',
    send: cli('sign', 'undoFailover', '--input', '{"requestedBy":"alice","reason":"r"}'),
    field: '--workflow-id',
    says: 'undoFailover is sent to a workflow',
  },
  {
    entry: 'project CLI',
    what: 'keys create for a name with a slash',
    send: cli('keys', 'create', '--user', '../alice'),
    field: '--user',
    says: 'must be a user name',
  },

  // The lab's HTTP API, as an adapter or a script calls it.
  {
    entry: 'lab HTTP',
    what: 'a body that is not JSON',
    send: http('POST', `${VM_PATH}/power`, '{"action":', 'application/json'),
    field: 'body',
    says: 'JSON',
  },
  {
    entry: 'lab HTTP',
    what: 'an endpoint that does not exist',
    send: http('GET', `${VM_PATH}/snapshots`),
    field: `${VM_PATH}/snapshots`,
    says: 'no such endpoint',
  },
  {
    entry: 'lab HTTP',
    what: 'power with an unknown action',
    send: http('POST', `${VM_PATH}/power`, '{"action":"reboot"}', 'application/json'),
    field: 'body.action',
    says: '',
  },
  {
    entry: 'lab HTTP',
    what: 'power on with sourceOff as text',
    send: http('POST', `${VM_PATH}/power`, '{"action":"on","sourceOff":"yes"}', 'application/json'),
    field: 'body.sourceOff',
    says: '',
  },
  {
    entry: 'lab HTTP',
    what: 'shutdown with a negative timeout',
    send: http('POST', `${VM_PATH}/power`, '{"action":"shutdown","timeoutMs":-1}', 'application/json'),
    field: 'body.timeoutMs',
    says: '',
  },
  {
    entry: 'lab HTTP',
    what: 'a checkpoint id with a space',
    send: http('PUT', `${VM_PATH}/checkpoints/bad%20id`),
    field: 'params.checkpointId',
    says: '',
  },
  {
    entry: 'lab HTTP',
    what: 'digests with a negative start block',
    send: http('GET', `${VM_PATH}/disks/os/digests?checkpointId=none&startBlock=-1&count=4`),
    field: 'query.startBlock',
    says: '',
  },
  {
    entry: 'lab HTTP',
    what: 'a page limit over 100000',
    send: http('GET', `${VM_PATH}/disks/os/allocated?checkpointId=none&limit=100001`),
    field: 'query.limit',
    says: '',
  },
  {
    entry: 'lab HTTP',
    what: 'a replica with a disk size not a whole number of blocks',
    send: http(
      'PUT',
      '/v1/hosts/dr-a/replicas/r-matrix',
      '{"sourceVm":"vm1","disks":[{"id":"os","sizeBytes":1000}]}',
      'application/json',
    ),
    field: 'body.disks.0.sizeBytes',
    says: '',
  },
  {
    entry: 'lab HTTP',
    what: 'a fault of an unknown kind',
    send: http('PUT', '/v1/lab/faults/prod-a', '{"kind":"explode"}', 'application/json'),
    field: 'body.kind',
    says: '',
  },
  {
    entry: 'lab HTTP',
    what: 'a JSON body of 5 MiB, over the 4 MiB limit',
    send: http(
      'PUT',
      '/v1/lab/faults/prod-a',
      `{"kind":"slow","latencyMs":1,"pad":"${'x'.repeat(5 * 1024 * 1024)}"}`,
      'application/json',
    ),
    field: 'body',
    says: 'too large',
  },

  // The configuration file, as the workers and the CLI read it.
  {
    entry: 'configuration file',
    what: 'not YAML',
    send: { kind: 'configuration', yaml: 'hosts: [\n' },
    field: 'line 2',
    says: 'Flow sequence',
  },
  {
    entry: 'configuration file',
    what: 'proxy slots 0',
    send: configuration('{ name: proxy-a, slots: 2 }', '{ name: proxy-a, slots: 0 }'),
    field: 'proxies[0].slots',
    says: 'at least 1',
  },
  {
    entry: 'configuration file',
    what: 'a job targeting an unknown host',
    send: configuration('targetHost: dr-a', 'targetHost: dr-b'),
    field: 'jobs[0].targetHost',
    says: 'dr-b',
  },
  {
    entry: 'configuration file',
    what: 'a user key that is no Ed25519 key line',
    send: configuration('roles: [BackupAdministrator] }', "roles: [BackupAdministrator], keys: ['ssh-ed25519 AAAA'] }"),
    field: 'users[0].keys[0]',
    says: 'must be an Ed25519 public key line',
  },
  {
    entry: 'configuration file',
    what: 'signed requests valid for 0 minutes',
    send: configuration('proxies:', 'requests: { validityMinutes: 0 }\nproxies:'),
    field: 'requests.validityMinutes',
    says: 'must be at least 1',
  },
  {
    entry: 'configuration file',
    what: 'an unknown role',
    send: configuration('roles: [BackupAdministrator]', 'roles: [Root]'),
    field: 'users[0].roles[0]',
    says: 'must be one of BackupAdministrator',
  },
  {
    entry: 'configuration file',
    what: 'an adapter URL that is not one',
    send: configuration(
      "adapter: { type: lab, url: 'http://127.0.0.1:7300' } }\n  - { name: dr-a",
      "adapter: { type: lab, url: 'not a url' } }\n  - { name: dr-a",
    ),
    field: 'hosts[0].adapter.url',
    says: '',
  },
  {
    entry: 'configuration file',
    what: 'plain http:// to a host API off this machine',
    send: configuration(
      "url: 'http://127.0.0.1:7300' } }\n  - { name: dr-a",
      "url: 'http://10.0.0.5:7400' } }\n  - { name: dr-a",
    ),
    field: 'hosts[0].adapter.url',
    says: 'loopback',
  },
  {
    entry: 'configuration file',
    what: 'an https:// host without the tls block',
    send: configuration(
      "url: 'http://127.0.0.1:7300' } }\n  - { name: dr-a",
      "url: 'https://kvm01:7400' } }\n  - { name: dr-a",
    ),
    field: 'tls',
    says: 'is required',
  },

  // The estate file, as the lab reads it.
  {
    entry: 'estate file',
    what: 'a disk size that is not a size',
    send: { kind: 'estate', estate: goodEstate({ disks: [{ id: 'os', size: 'big' }] }) },
    field: 'sites.0.hosts.0.vms.0.disks.0.size',
    says: '',
  },
  {
    entry: 'estate file',
    what: 'a negative write rate',
    send: { kind: 'estate', estate: goodEstate({ writeRate: -1 }) },
    field: 'sites.0.hosts.0.vms.0.writeRate',
    says: '',
  },
  {
    entry: 'estate file',
    what: 'a site role that does not exist',
    send: { kind: 'estate', estate: goodEstate({}, { role: 'backup' }) },
    field: 'sites.0.role',
    says: '',
  },
];

/** The table in docs/bad-input.md, one row a case. */
export function renderBadInputTable(cases: readonly BadInputCase[] = BAD_INPUT_CASES): string {
  const cell = (s: string) => s.replaceAll('|', '\\|');
  const rows = cases.map(
    (c, i) => `| ${i + 1} | ${c.entry} | ${cell(c.what)} | \`${cell(c.field)}\` | ${c.says ? cell(c.says) : '—'} |`,
  );
  return [
    '| # | entry point | bad input | field named | the message says |',
    '| --- | --- | --- | --- | --- |',
    ...rows,
  ].join('\n');
}

if (process.argv[1]?.endsWith('bad-input-matrix.ts')) console.log(renderBadInputTable());
