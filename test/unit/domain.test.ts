import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { allocateSlots, type ProxyChoice } from '../../src/domain/proxy-slots';
import { checkTransition, jobRunSkipReason, ReplicaOperations, ReplicaStates } from '../../src/domain/replica-state';
import { checkAccess, type Role } from '../../src/domain/roles';

describe('replica state machine', () => {
  const allowed: Record<string, string> = {
    'Unseeded jobRun': 'Ready',
    'Ready jobRun': 'Ready',
    'Ready plannedFailover': 'Failover',
    'Ready failover': 'Failover',
    'Failover undoFailover': 'Ready',
    'Failover permanentFailover': 'PermanentFailover',
    'Failover failback': 'Failback',
    'Failback commitFailback': 'Ready',
    'Failback undoFailback': 'Failover',
  };

  it('allows exactly the transitions of the product table, and refuses every other with a reason', () => {
    for (const state of ReplicaStates) {
      for (const op of ReplicaOperations) {
        const check = checkTransition(state, op);
        const to = allowed[`${state} ${op}`];
        if (to) assert.deepEqual(check, { allowed: true, to }, `${state} ${op}`);
        else {
          assert.equal(check.allowed, false, `${state} ${op} should be refused`);
          if (!check.allowed) assert.match(check.reason, new RegExp(op));
        }
      }
    }
  });

  it('says why a never-replicated replica cannot fail over', () => {
    const check = checkTransition('Unseeded', 'plannedFailover');
    assert.ok(!check.allowed && /never been replicated/.test(check.reason));
  });

  it('skips failed-over and failing-back replicas in job runs', () => {
    assert.equal(jobRunSkipReason('Ready'), undefined);
    assert.equal(jobRunSkipReason('Unseeded'), undefined);
    for (const state of ['Failover', 'Failback', 'PermanentFailover'] as const) assert.ok(jobRunSkipReason(state));
  });
});

describe('roles', () => {
  const cases: [Role[], boolean][] = [
    [['BackupAdministrator'], true],
    [['BackupOperator', 'RestoreOperator'], true],
    [['BackupOperator'], false],
    [['RestoreOperator'], false],
    [['BackupViewer'], false],
    [['BackupViewer', 'RestoreOperator'], false],
  ];
  it('lets Backup Administrator, or Backup Operator with Restore Operator, fail over', () => {
    for (const [roles, ok] of cases) assert.equal(checkAccess('u', roles, 'failover').allowed, ok, roles.join('+'));
  });
  it('refuses unknown users and lets any role view', () => {
    const unknown = checkAccess('mallory', undefined, 'view');
    assert.ok(!unknown.allowed && /unknown user 'mallory'/.test(unknown.reason));
    assert.equal(checkAccess('erin', ['BackupViewer'], 'view').allowed, true);
    const refused = checkAccess('carol', ['BackupOperator'], 'failover');
    assert.ok(!refused.allowed && /carol.*BackupOperator.*needs Backup Administrator/.test(refused.reason));
  });
});

describe('proxy slot allocation', () => {
  const table = (): [ProxyChoice, ProxyChoice] => [
    { name: 'p1', slots: 2, enabled: true, online: true, leased: 0 },
    { name: 'p2', slots: 1, enabled: true, online: true, leased: 0 },
  ];

  it('spreads over the least-loaded proxies', () => {
    assert.deepEqual(allocateSlots(table(), 'auto', 2), ['p1', 'p2']);
    assert.deepEqual(allocateSlots(table(), 'auto', 3), ['p1', 'p2', 'p1']);
    const busy = table();
    busy[0].leased = 1;
    assert.deepEqual(allocateSlots(busy, 'auto', 1), ['p2']);
  });

  it('waits when too few slots are free, and respects the allowed list', () => {
    const t = table();
    t[0].leased = 2;
    assert.equal(allocateSlots(t, 'auto', 2), undefined);
    assert.deepEqual(allocateSlots(t, 'auto', 1), ['p2']);
    assert.equal(allocateSlots(t, ['p1'], 1), undefined);
  });

  it('gives a session all slots of its proxies when it has more disks than they have slots', () => {
    assert.deepEqual(allocateSlots(table(), ['p2'], 4), ['p2']);
  });

  it('never leases offline or disabled proxies, nor one the request does not declare', () => {
    const t = table();
    t[0].online = false;
    t[1].enabled = false;
    assert.equal(allocateSlots(t, 'auto', 1), undefined);
    // A proxy removed from the configuration is simply not among the request's choices.
    assert.deepEqual(allocateSlots([table()[1]], 'auto', 2), ['p2']);
  });

  it('breaks ties by code-point order, whatever the locale', () => {
    // localeCompare puts 'a' before 'B' in most locales; code-point order puts 'B' (66) before 'a' (97).
    const tie = [
      { name: 'a', slots: 1, enabled: true, online: true, leased: 0 },
      { name: 'B', slots: 1, enabled: true, online: true, leased: 0 },
    ];
    assert.deepEqual(allocateSlots(tie, 'auto', 1), ['B']);
  });
});
