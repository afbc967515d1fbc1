// The short chaos runs of `npm test`: a few rounds of the fault suite (test/chaos/) on the lab, once with a fixed seed
// and once with a random one, and two rounds on real guests of two KVM hosts with a fixed seed and the faults only
// real hosts suffer; each printed so that a failure can be replayed with `npm run chaos -- [--hypervisor kvm] --seed S`.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { KVM_FAULTS } from './chaos/hosts';
import type { ChaosSummary } from './chaos/summary';
import { randomSeed } from './chaos/random';

async function chaos(
  seed: number,
  rounds: number,
  args: string[] = [],
): Promise<{ code: number; output: string; summary: ChaosSummary }> {
  const out = await mkdtemp(join(tmpdir(), 'pf-chaos-test-'));
  try {
    const child = spawn(
      process.execPath,
      [
        ...['--import', 'tsx', 'test/chaos/main.ts', '--seed', String(seed), '--rounds', String(rounds)],
        ...['--out', out, ...args],
      ],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let output = '';
    child.stdout.on('data', (d: Buffer) => (output += d.toString()));
    child.stderr.on('data', (d: Buffer) => (output += d.toString()));
    const code = await new Promise<number>((resolve) => child.once('exit', (c) => resolve(c ?? 1)));
    const summary = JSON.parse(await readFile(join(out, `seed-${seed}`, 'summary.json'), 'utf8')) as ChaosSummary;
    return { code, output, summary };
  } finally {
    await rm(out, { recursive: true, force: true });
  }
}

/** No violation, every round run with invariants checked, faults injected; the kinds injected. */
function assertClean(summary: ChaosSummary, code: number, output: string, rounds: number): string[] {
  const violations = summary.rounds.flatMap((r) => r.violations.map((v) => `round ${r.round}: ${v.name}: ${v.detail}`));
  assert.deepEqual(violations, [], output.slice(-6000));
  assert.equal(code, 0, output.slice(-6000));
  assert.equal(summary.rounds.length, rounds, 'every round ran');
  for (const r of summary.rounds)
    assert.ok(r.invariantsChecked > 20, `round ${r.round} checked only ${r.invariantsChecked} invariants`);
  const injected = summary.rounds
    .flatMap((r) => Object.entries(r.faults))
    .filter(([k, n]) => k !== 'continueAsNew' && n)
    .map(([k]) => k);
  assert.ok(injected.length > 0, 'faults were injected');
  return injected;
}

describe('the short chaos run', { concurrency: false }, () => {
  for (const [seed, rounds] of [
    [20261201, 3],
    [randomSeed(), 2],
  ] as const) {
    it(`seed ${seed}, ${rounds} rounds: faults injected, invariants checked, none violated`, async (t) => {
      t.diagnostic(`replay: npm run chaos -- --seed ${seed} --rounds ${rounds}`);
      const { code, output, summary } = await chaos(seed, rounds);
      assertClean(summary, code, output, rounds);
    });
  }

  it('on real VMs: two rounds of the faults only KVM hosts suffer, invariants of real guests checked, none violated', async (t) => {
    const [seed, rounds] = [20261207, 2];
    t.diagnostic(
      `replay: npm run chaos -- --hypervisor kvm --seed ${seed} --rounds ${rounds} --faults ${KVM_FAULTS.join(',')}`,
    );
    const { code, output, summary } = await chaos(seed, rounds, [
      '--hypervisor',
      'kvm',
      '--faults',
      KVM_FAULTS.join(','),
    ]);
    const injected = assertClean(summary, code, output, rounds);
    assert.equal(summary.hypervisor, 'kvm');
    for (const kind of injected) assert.ok((KVM_FAULTS as readonly string[]).includes(kind), `${kind} is a KVM fault`);
    const checked = Object.keys(Object.assign({}, ...summary.rounds.map((r) => r.checked)) as Record<string, number>);
    for (const invariant of [
      'no storage daemon outlives its host process',
      'no domain but the VMs and their replicas',
      'no block job left once the round settled',
      'each point equals its checkpoint, byte for byte',
    ])
      assert.ok(checked.includes(invariant), `${invariant}: checked`);
  });
});
