import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { once } from 'node:events';
import { mkdtempSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { replicaNameOf } from '../../src/activities/inventory';
import { startReplicationJob } from '../../src/client';
import type { AuditRecord } from '../../src/cli/audit';
import { TASK_QUEUE, type PlannedFailoverResult } from '../../src/contract';
import { operatorEnv, startOrchestrator, temporal, testConfiguration, type TestOrchestrator } from '../harness';
import { DR, smallEstate } from '../lab/helpers';
import { kill, runScript, startScript } from '../processes';

describe('the project CLI, as an operator runs it', () => {
  let o: TestOrchestrator;

  before(async () => {
    o = await startOrchestrator({
      estate: smallEstate({ writeRate: 20, shutdownMs: 100, bootMs: 100 }, [
        { name: 'vm2', writeRate: 20, bootMs: 1500 },
      ]),
      configure: (url) => testConfiguration(url, { jobs: [{ name: 'cli', vms: ['vm1', 'vm2'], targetHost: DR }] }),
    });
    await (await startReplicationJob(o.client, { job: 'cli', requestedBy: 'alice' })).result();
  });
  after(() => o?.close());

  /** Runs `failover ...` with the connection settings the Temporal CLI would read. */
  async function failover(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
    return runScript('src/cli/main.ts', args, operatorEnv(o.namespace));
  }

  it('refuses bad input with exit code 2, naming the field, before starting anything', async () => {
    const run = await failover(
      'planned',
      '--vm',
      'vm1,vm1',
      '--reason',
      ' ',
      '--user',
      'alice',
      '--max-parallel-jobs',
      '0',
    );
    assert.equal(run.code, 2);
    assert.match(run.stderr, /options\.maxParallelJobs: must be at least 1/);
    assert.match(run.stderr, /reason: must not be empty/);
    assert.match(run.stderr, /vms\[1\]: 'vm1' is already named at vms\[0\]/);
    const refused = await failover('planned', '--vm', 'vm1', '--reason', 'r', '--user', 'carol');
    assert.equal(refused.code, 2);
    assert.match(refused.stdout + refused.stderr, /user 'carol' holds BackupOperator/);
  });

  it('runs a planned failover with --json for scripts, then an undo', async () => {
    const run = await failover('planned', '--vm', 'vm1', '--reason', 'cli test', '--user', 'bob', '--json');
    assert.equal(run.code, 0, run.stderr);
    const result = JSON.parse(run.stdout) as PlannedFailoverResult;
    assert.equal(result.sessions[0]!.outcome, 'failedOver');
    assert.equal(result.sessions[0]!.verification?.identical, true);
    // Live progress goes to stderr with --json (polled, so a fast step may be missed, but never the end).
    assert.match(run.stderr, /^ {2}vm1: Done$/m);

    const state = await failover('state', '--vm', 'vm1');
    assert.match(state.stdout, /vm1 \(job cli\): Failover/);
    assert.match(state.stdout, /planned-failover-helper/);
    const undo = await failover('undo', '--vm', 'vm1', '--user', 'alice', '--reason', 'done');
    assert.equal(undo.code, 0, undo.stderr);
    assert.match(undo.stdout, /vm1: Ready\. replica off/);
    const again = await failover('undo', '--vm', 'vm1', '--user', 'alice', '--reason', 'twice');
    assert.equal(again.code, 2);
    assert.match(again.stderr, /undoFailover of vm1 refused: undoFailover needs a replica in state Failover/);
  });

  it('makes keys, and signs requests that the Temporal CLI then sends: once, and never unsigned', async () => {
    const home = mkdtempSync(join(tmpdir(), 'pf-keys-'));
    const made = await runScript('src/cli/main.ts', ['keys', 'create', '--user', 'frank'], { XDG_CONFIG_HOME: home });
    assert.equal(made.code, 0, made.stderr);
    const file = join(home, 'planned-failover', 'keys', 'frank.key');
    assert.equal(statSync(file).mode & 0o777, 0o600);
    assert.match(made.stdout, /keys: \['ed25519:[A-Za-z0-9_-]{43}'\]/);
    assert.doesNotMatch(made.stdout, /PRIVATE KEY/);
    const again = await runScript('src/cli/main.ts', ['keys', 'create', '--user', 'frank'], { XDG_CONFIG_HOME: home });
    assert.notEqual(again.code, 0);
    assert.match(again.stderr, /already exists/);

    // alice's request, signed by `failover sign` with her key, started with the Temporal CLI as the README shows.
    const request = JSON.stringify({ job: 'cli', vms: ['vm1'], requestedBy: 'alice', reason: 'signed at the CLI' });
    const signed = await failover('sign', 'replicationJob', '--input', request);
    assert.equal(signed.code, 0, signed.stderr);
    const execute = (input: string) =>
      temporal(
        o.namespace,
        'workflow',
        'execute',
        '--task-queue',
        TASK_QUEUE,
        '--type',
        'replicationJob',
        '--input',
        input,
      ).then(
        ({ stdout }) => stdout,
        (e: { stdout: string; stderr: string }) => `refused: ${e.stdout}${e.stderr}`,
      );
    assert.match(await execute(signed.stdout.trim()), /replicated/);
    assert.match(await execute(signed.stdout.trim()), /refused: [\s\S]*replayed/);
    assert.match(await execute(request), /refused: [\s\S]*unsigned: [\s\S]*failover sign replicationJob/);
  });

  it('prints a readable table without --json', async () => {
    const run = await failover('planned', '--vm', 'vm2', '--reason', 'table', '--user', 'alice');
    assert.equal(run.code, 0, run.stderr);
    assert.match(run.stdout, /VM\s+job\s+outcome\s+downtime\s+shutdown\s+final sync/);
    assert.match(run.stdout, /vm2\s+cli\s+failedOver/);
  });

  it('fails back with its steps on stderr and the outcome on stdout', async () => {
    const run = await failover('failback', '--vm', 'vm2', '--user', 'alice', '--reason', 'home', '--json');
    assert.equal(run.code, 0, run.stderr);
    const outcome = JSON.parse(run.stdout) as { state: string; detail: string };
    assert.equal(outcome.state, 'Failback');
    assert.match(outcome.detail, /verified/);
    // vm2 boots for 1.5 s at the end, so the polled progress sees at least that step.
    assert.match(run.stderr, /^ {2}failback of vm2: powering vm2 on$/m);
  });

  it('says why a planned failover halted and how to decide, and the command it names finishes the failover', async () => {
    await o.lab.control.setFault(DR, { kind: 'fail', path: `^/v1/hosts/${DR}/vms/${replicaNameOf('vm1')}/power$` });
    const env = operatorEnv(o.namespace);
    const planned = await startScript(
      'src/cli/main.ts',
      ['planned', '--vm', 'vm1', '--reason', 'halt', '--user', 'alice'],
      env,
      /From another terminal: npm run failover -- decide/,
    );
    const exited = once(planned.child, 'exit');
    try {
      assert.match(planned.output(), /^ {2}vm1: Halted #1 at powerOn: .+$/m);
      const session = /decide <retry\|abort\|forceFailover> --session (\S+) --user/.exec(planned.readyLine)?.[1];
      assert.match(session ?? '', /^session\/vm1\//);

      await o.lab.control.clearFaults(DR);
      const decided = await failover('decide', 'retry', '--session', session!, '--user', 'alice', '--reason', 'fixed');
      assert.equal(decided.code, 0, decided.stderr);
      const [code] = (await exited) as [number | null];
      assert.equal(code, 0, planned.output());
      // The wait for the decision is part of the downtime, in a column of its own.
      assert.match(planned.output(), /\s+boot\s+halted\s+orchestration\s/);
      assert.match(planned.output(), /vm1\s+cli\s+failedOver\s+(\S+ m?s\s+){5}[1-9][\d.]* s\s/);
      assert.match(
        planned.output(),
        /vm1: halted #1 at powerOn: .+; retry by alice \(key SHA256:[\w-]{16}\) \(fixed\)/,
      );
    } finally {
      await kill(planned.child);
    }
  });
  it('audits who asked for what: verified with their key, or refused with why; the search attribute lists each user', async () => {
    const run = await failover('audit', '--since', '1h', '--json');
    assert.equal(run.code, 0, run.stderr);
    const records = JSON.parse(run.stdout) as AuditRecord[];
    const bobs = records.filter((r) => r.requestedBy === 'bob');
    assert.ok(
      bobs.some((r) => r.operation === 'plannedFailover' && r.verdict === 'accepted' && /^SHA256:/.test(r.keyId ?? '')),
    );
    assert.ok(
      records.some((r) => r.operation === 'retry' && r.verdict === 'accepted' && r.target.startsWith('session/vm1/')),
    );
    assert.ok(
      records.some(
        (r) => r.operation === 'replicationJob' && r.verdict === 'refused' && /unsigned/.test(r.refusal ?? ''),
      ),
    );
    assert.ok(
      records.some(
        (r) => r.requestedBy === 'carol' && r.verdict === 'refused' && /holds BackupOperator/.test(r.refusal ?? ''),
      ),
    );
    const onlyBob = JSON.parse(
      (await failover('audit', '--since', '1h', '--user', 'bob', '--json')).stdout,
    ) as AuditRecord[];
    assert.deepEqual(onlyBob, bobs);
    const table = await failover('audit', '--since', '1h');
    assert.match(table.stdout, /time\s+requested by\s+operation\s+target\s+verdict/);
    const { stdout } = await temporal(
      o.namespace,
      'workflow',
      'list',
      '--query',
      'FailoverRequestedBy="bob"',
      '-o',
      'json',
    );
    const listed = (JSON.parse(stdout) as { type: { name: string } }[]).map((w) => w.type.name);
    assert.ok(listed.includes('plannedFailover'), listed.join(', '));
    const bad = await failover('audit', '--since', 'last week');
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /--since: must be like 30m/);
  });
});
