import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { forceTarget, replicaMayRun, retryFrom, WindowSteps } from '../../src/domain/critical-window';
import { hostRefusesReplication, stateFromHost, type HostReplicaFacts } from '../../src/domain/replica-state';
import {
  dataInstantOf,
  newestBackupAfter,
  pointAtOrBefore,
  pointsAfterHead,
  PointMetadata,
  sourceOf,
} from '../../src/domain/restore-points';

describe('the points a failback drops', () => {
  const points = [{ id: 'p1' }, { id: 'p2' }, { id: 'p3' }];
  it('are those after the head: a replica failed over to an older point', () => {
    assert.deepEqual(pointsAfterHead(points, 'p1'), [{ id: 'p2' }, { id: 'p3' }]);
    assert.deepEqual(pointsAfterHead(points, 'p3'), []);
    assert.deepEqual(pointsAfterHead(points, null), [], 'no head: nothing to say');
    assert.deepEqual(pointsAfterHead(points, 'gone'), []);
  });
});

describe('choosing a restore point by time', () => {
  const points = [
    { id: 'p1', createdAt: '2026-11-25T08:30:00.000Z' },
    { id: 'p2', createdAt: '2026-11-25T09:30:00.400Z' },
  ];

  it('compares instants, not text: an offset time means what it says', () => {
    // 10:00+02:00 is 08:00Z, before both points; as text it would sort after both.
    assert.equal(pointAtOrBefore(points, '2026-11-25T10:00:00+02:00'), undefined);
    assert.equal(pointAtOrBefore(points, '2026-11-25T11:00:00+02:00')?.id, 'p1');
  });

  it('counts fractions of a second', () => {
    assert.equal(pointAtOrBefore(points, '2026-11-25T09:30:00Z')?.id, 'p1');
    assert.equal(pointAtOrBefore(points, '2026-11-25T09:30:00.400Z')?.id, 'p2');
  });

  it('takes the newest point at or before the time, in any listing order', () => {
    assert.equal(pointAtOrBefore([...points].reverse(), '2026-11-26T00:00:00Z')?.id, 'p2');
  });
});

describe('where a restore point came from', () => {
  it('reads the provenance a session records, and the 0.1.0 backup time', () => {
    const meta = {
      [PointMetadata.sourceKind]: 'checkpoint',
      [PointMetadata.sourceHost]: 'prod-a',
      [PointMetadata.sourceVm]: 'vm1',
      [PointMetadata.sourceTime]: '2026-11-25T08:00:00.000Z',
    };
    assert.deepEqual(sourceOf(meta), { kind: 'checkpoint', host: 'prod-a', vm: 'vm1', at: '2026-11-25T08:00:00.000Z' });
    assert.deepEqual(sourceOf({ sourceBackup: 'b1', sourceBackupTime: '2026-11-25T07:00:00.000Z' }), {
      kind: 'backup',
      backupId: 'b1',
      at: '2026-11-25T07:00:00.000Z',
    });
    assert.deepEqual(sourceOf({}), { kind: 'unknown' });
  });

  it('takes a point without provenance for no newer than its own creation', () => {
    const created = '2026-11-25T09:00:00.000Z';
    assert.equal(dataInstantOf({ createdAt: created, metadata: {} }), Date.parse(created));
    assert.equal(
      dataInstantOf({ createdAt: created, metadata: { [PointMetadata.sourceTime]: '2026-11-25T08:59:00.000Z' } }),
      Date.parse('2026-11-25T08:59:00.000Z'),
    );
  });

  it('never offers a backup older than the head it would sit on', () => {
    const backups = [
      { id: 'old', createdAt: '2026-11-25T07:00:00.000Z' },
      { id: 'new', createdAt: '2026-11-25T08:00:00.000Z' },
    ];
    assert.equal(newestBackupAfter(backups, Date.parse('2026-11-25T07:30:00Z'))?.id, 'new');
    assert.equal(newestBackupAfter(backups, Date.parse('2026-11-25T08:00:00Z')), undefined);
    assert.equal(newestBackupAfter(backups, Date.parse('2026-11-25T09:00:00Z')), undefined);
    assert.equal(newestBackupAfter(backups, null)?.id, 'new');
    assert.equal(newestBackupAfter([], null), undefined);
  });
});

describe('a replica state rebuilt from its DR host', () => {
  const facts = (over: Partial<HostReplicaFacts>): HostReplicaFacts => ({
    exists: true,
    sealedPoints: 3,
    consolidated: false,
    hasRunningLayer: false,
    powerState: 'Off',
    headKind: 'regular',
    ...over,
  });

  it('reads each state from what the host holds', () => {
    assert.equal(stateFromHost(facts({ exists: false, sealedPoints: 0 }), null), 'Unseeded');
    assert.equal(stateFromHost(facts({ sealedPoints: 0 }), null), 'Unseeded');
    assert.equal(stateFromHost(facts({}), null), 'Ready');
    assert.equal(stateFromHost(facts({ hasRunningLayer: true, powerState: 'Running' }), null), 'Failover');
    assert.equal(stateFromHost(facts({ powerState: 'Starting' }), null), 'Failover');
    // Consolidated wins over everything: a permanent failover is never taken for an empty replica.
    assert.equal(
      stateFromHost(facts({ consolidated: true, sealedPoints: 0, powerState: 'Running' }), null),
      'PermanentFailover',
    );
  });

  it('tells Failback from Ready by the last completed operation', () => {
    const protective = facts({ headKind: 'failback-protective' });
    assert.equal(stateFromHost(protective, 'Failback'), 'Failback');
    assert.equal(stateFromHost(protective, 'Ready'), 'Ready');
    assert.equal(stateFromHost(facts({}), 'Failback'), 'Ready');
  });

  it('refuses a job run into a replica that runs or became production, whatever the entity says', () => {
    assert.equal(hostRefusesReplication(facts({})), undefined);
    assert.equal(hostRefusesReplication(facts({ consolidated: true }))?.state, 'PermanentFailover');
    assert.equal(hostRefusesReplication(facts({ hasRunningLayer: true }))?.state, 'Failover');
  });
});

describe('decisions from every step of the critical window', () => {
  it('retries the step that failed; a verified mismatch copies again', () => {
    for (const step of WindowSteps) assert.equal(retryFrom(step, false), step);
    assert.equal(retryFrom('verify', true), 'copy');
  });

  it('takes the final checkpoint again before a copy or verification is retried, and only then', () => {
    for (const step of WindowSteps)
      for (const mismatch of [false, true])
        assert.equal(
          retryFrom(step, mismatch, true),
          step === 'copy' || step === 'verify' ? 'checkpoint' : step,
          `${step}, mismatch ${mismatch}`,
        );
  });

  it('forces to helper point 2 only when the host shows it sealed, and boots again after a failed power-on', () => {
    for (const step of WindowSteps) {
      assert.equal(forceTarget(step, false).point, 'helper1', step);
      assert.equal(forceTarget(step, true).point, 'helper2', step);
      assert.equal(forceTarget(step, true).from, step === 'powerOn' ? 'powerOn' : 'switch', step);
    }
  });

  it('powers the replica off before the source goes on only where it may have started', () => {
    assert.deepEqual(
      WindowSteps.filter((s) => replicaMayRun(s)),
      ['powerOn'],
    );
  });
});
