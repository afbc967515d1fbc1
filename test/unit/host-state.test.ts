// The KVM agent's state file under concurrent changes (review C2): every change that resolved is in memory and on
// disk, the file always loads, and a failed save changes nothing.
import assert from 'node:assert/strict';
import { mkdtemp, readdir, rm, writeFile, mkdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { HostState, type ReplicaRecord } from '../../agent/state';

const replica = (sourceVm: string): ReplicaRecord => ({
  sourceVm,
  disks: [{ id: 'vda', sizeBytes: 65536 }],
  points: [],
  headPointId: null,
  merging: null,
  definition: null,
  domainUuid: null,
  running: false,
  sealingRunning: null,
  consolidating: false,
  consolidated: false,
});

describe('the KVM agent state file', () => {
  let dir: string;
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'pf-host-state-'));
  });
  after(() => rm(dir, { recursive: true, force: true }));

  test('two concurrent changes of different records, 100 rounds: both resolve, both in memory and on disk', async () => {
    const stateDir = join(dir, 'two');
    const state = await HostState.load(stateDir);
    for (let round = 0; round < 100; round++) {
      await Promise.all([
        state.setReplica(`a${round}`, replica(`vm-a${round}`)),
        state.update(`b${round}`, (d) => void (d.writeFence = `fence-${round}`)),
      ]);
      assert.equal(state.replica(`a${round}`)?.sourceVm, `vm-a${round}`);
      assert.equal(state.domain(`b${round}`).writeFence, `fence-${round}`);
    }
    const loaded = await HostState.load(stateDir);
    assert.equal(loaded.replicaNames().length, 100);
    for (let round = 0; round < 100; round++) {
      assert.equal(loaded.replica(`a${round}`)?.sourceVm, `vm-a${round}`);
      assert.equal(loaded.domain(`b${round}`).writeFence, `fence-${round}`);
    }
  });

  test('six writers started a few ms apart, 200 changes each: none lost, the file loads, no temporary left', async () => {
    const stateDir = join(dir, 'six');
    const state = await HostState.load(stateDir);
    const writer = async (w: number) => {
      await new Promise((r) => setTimeout(r, w));
      for (let i = 0; i < 200; i++) {
        // Read-modify-write of the writer's own record, as the agent does under its per-domain lock.
        const r = state.replica(`w${w}`) ?? replica(`vm${w}`);
        r.points.push({
          id: `p${i}`,
          createdAt: new Date(0).toISOString(),
          kind: 'regular',
          crashConsistent: true,
          metadata: {},
          bytesWritten: i,
          sealed: true,
        });
        await state.setReplica(`w${w}`, r);
        await state.update(`d${w}`, (d) => void (d.writeFence = `f${i}`));
      }
    };
    await Promise.all([0, 1, 2, 3, 4, 5].map(writer));
    const loaded = await HostState.load(stateDir);
    for (const s of [state, loaded])
      for (let w = 0; w < 6; w++) {
        assert.deepEqual(
          s.replica(`w${w}`)?.points.map((p) => p.id),
          Array.from({ length: 200 }, (_, i) => `p${i}`),
        );
        assert.equal(s.domain(`d${w}`).writeFence, 'f199');
      }
    assert.deepEqual(await readdir(stateDir), ['host-state.json']);
  });

  test('a failed save rejects its changes and leaves memory and disk as they were', async () => {
    const stateDir = join(dir, 'failing');
    const state = await HostState.load(stateDir);
    await state.setReplica('kept', replica('vm-kept'));
    // The file's place taken by a non-empty directory: the rename over it fails.
    await rm(join(stateDir, 'host-state.json'));
    await mkdir(join(stateDir, 'host-state.json'));
    await writeFile(join(stateDir, 'host-state.json', 'x'), '');
    const results = await Promise.allSettled([
      state.setReplica('lost', replica('vm-lost')),
      state.update('vm', (d) => void (d.writeFence = 'never')),
    ]);
    assert.deepEqual(
      results.map((r) => r.status),
      ['rejected', 'rejected'],
    );
    assert.equal(state.replica('lost'), null);
    assert.equal(state.domain('vm').writeFence, null);
    assert.equal(state.replica('kept')?.sourceVm, 'vm-kept');
    // Saving works again once the file can be written: the next change is saved with what was saved before.
    await rm(join(stateDir, 'host-state.json'), { recursive: true });
    await state.setReplica('later', replica('vm-later'));
    const loaded = await HostState.load(stateDir);
    assert.deepEqual(loaded.replicaNames(), ['kept', 'later']);
    assert.deepEqual(await readdir(stateDir), ['host-state.json']);
  });

  test('a change that throws is refused alone; the others of its batch are saved', async () => {
    const stateDir = join(dir, 'throwing');
    const state = await HostState.load(stateDir);
    const results = await Promise.allSettled([
      state.update('a', (d) => void (d.writeFence = 'a')),
      state.update('b', (d) => {
        d.writeFence = 'half-way';
        throw new Error('refused');
      }),
      state.update('c', (d) => void (d.writeFence = 'c')),
    ]);
    assert.deepEqual(
      results.map((r) => r.status),
      ['fulfilled', 'rejected', 'fulfilled'],
    );
    const loaded = await HostState.load(stateDir);
    assert.equal(loaded.domain('a').writeFence, 'a');
    assert.equal(loaded.domain('b').writeFence, null);
    assert.equal(loaded.domain('c').writeFence, 'c');
  });

  test('temporary files a crash left beside the state file are removed at load', async () => {
    const stateDir = join(dir, 'leftovers');
    await (await HostState.load(stateDir)).setReplica('r', replica('vm'));
    await writeFile(join(stateDir, 'host-state.json.0123456789abcdef.tmp'), '{"half');
    const loaded = await HostState.load(stateDir);
    assert.deepEqual(loaded.replicaNames(), ['r']);
    assert.deepEqual(await readdir(stateDir), ['host-state.json']);
  });
});
