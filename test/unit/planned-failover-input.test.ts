import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { formatProblems, validatePlannedFailoverInput } from '../../src/contract';

function problemsOf(input: unknown): Record<string, string> {
  const result = validatePlannedFailoverInput(input);
  assert.equal(result.ok, false, `expected ${JSON.stringify(input)} to be refused`);
  return result.ok ? {} : Object.fromEntries(result.problems.map((p) => [p.path, p.message]));
}

const valid = { vms: ['sql01', 'web01'], reason: 'DC maintenance', requestedBy: 'alice' };

describe('plannedFailover input', () => {
  it('accepts the contract example and trims text', () => {
    const result = validatePlannedFailoverInput({ ...valid, reason: '  DC maintenance ' });
    assert.deepEqual(result, { ok: true, value: valid });
  });

  it('accepts every known option', () => {
    const options = {
      maxParallelJobs: 2,
      shutdownTimeoutSeconds: 120,
      preSyncMaxPasses: 3,
      preSyncTargetBytes: 1 << 20,
      proxyWaitTimeoutSeconds: 600,
    };
    const result = validatePlannedFailoverInput({ ...valid, options });
    assert.ok(result.ok);
    assert.deepEqual(result.value.options, options);
  });

  it('refuses a missing or empty VM list', () => {
    assert.deepEqual(problemsOf({ ...valid, vms: [] }), { vms: 'must name at least one VM' });
    assert.deepEqual(problemsOf({ reason: 'r', requestedBy: 'a' }), { vms: 'is required' });
    assert.deepEqual(problemsOf({ ...valid, vms: 'sql01' }), { vms: 'must be a list of VM names' });
  });

  it('names every problem at once, with its path', () => {
    const problems = problemsOf({
      vms: ['sql01', 7, '', 'SQL01'],
      reason: '   ',
      requestedBy: 42,
      options: { maxParallelJobs: 0, turbo: true },
      priority: 'high',
    });
    assert.deepEqual(Object.keys(problems).sort(), [
      'options.maxParallelJobs',
      'options.turbo',
      'priority',
      'reason',
      'requestedBy',
      'vms[1]',
      'vms[2]',
      'vms[3]',
    ]);
    assert.match(problems['vms[3]'] ?? '', /already named at vms\[0\]/);
    assert.equal(problems['options.turbo'], 'is not a known field');
    assert.equal(problems.reason, 'must not be empty');
    assert.equal(problems.requestedBy, 'must be a string');
  });

  it('refuses missing requester and reason', () => {
    assert.deepEqual(problemsOf({ vms: ['sql01'] }), { reason: 'is required', requestedBy: 'is required' });
  });

  it('refuses input that is not an object', () => {
    for (const input of [undefined, null, 'sql01', ['sql01'], 3]) {
      assert.deepEqual(Object.keys(problemsOf(input)), ['(input)']);
    }
  });

  it('refuses options of the wrong type or range', () => {
    assert.deepEqual(problemsOf({ ...valid, options: 'fast' }), { options: 'must be an object' });
    assert.deepEqual(problemsOf({ ...valid, options: { preSyncMaxPasses: 1.5, shutdownTimeoutSeconds: '60' } }), {
      'options.preSyncMaxPasses': 'must be a whole number',
      'options.shutdownTimeoutSeconds': 'must be a number',
    });
  });

  it('formats problems into one readable message', () => {
    assert.equal(
      formatProblems('The input', [
        { path: 'vms', message: 'must name at least one VM' },
        { path: 'reason', message: 'is required' },
      ]),
      'The input was refused (2 problems): vms: must name at least one VM; reason: is required',
    );
  });
});
