import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { summariseComparison, type Comparison } from '../../bench/report/comparisons';
import { renderChart, renderReport, type ReportEntry } from '../../bench/report/render';
import { BENCHMARKS, parseArguments } from '../../bench/run';

const downtime: Comparison = {
  title: 'Controllable downtime',
  unit: 'ms',
  measured: { label: 'planned <failover>', samples: [60, 40, 50, 55, 45] },
  baseline: { label: 'naive move', samples: [100, 120, 80] },
  targets: [
    { text: 'at most 0.1x the naive sync', of: 'ratio', atMost: 0.1 },
    { text: 'at most 0.8 GB/s + 100 ms', of: 'median', atMost: 134 },
  ],
};

const entry = (over: Partial<ReportEntry>, comparisons = [summariseComparison(downtime)]): ReportEntry => ({
  result: { benchmark: 'failover', commit: 'a'.repeat(40), date: '2026-12-07T00:00:00.000Z', rounds: 5 },
  comparisons,
  stale: null,
  chart: 'failover.svg',
  ...over,
});

describe('the benchmark report', () => {
  it('compares medians, keeps the range of the samples, and judges each target', () => {
    const s = summariseComparison(downtime);
    assert.deepEqual(
      [s.measured.median, s.measured.min, s.measured.max, s.measured.count, s.baseline.median],
      [50, 40, 60, 5, 100],
    );
    assert.equal(s.ratio, 0.5);
    assert.deepEqual(
      s.targets.map((t) => [t.value, t.met]),
      [
        [0.5, false],
        [50, true],
      ],
    );
    const even = summariseComparison({ ...downtime, baseline: { label: 'b', samples: [10, 30] }, targets: [] });
    assert.equal(even.baseline.median, 20);
  });

  it('refuses a comparison without samples or with an unknown unit, naming the field', () => {
    assert.throws(
      () => summariseComparison({ ...downtime, baseline: { label: 'naive', samples: [] } }),
      /baseline.*samples|needs at least one sample/s,
    );
    assert.throws(() => summariseComparison({ ...downtime, unit: 'parsecs' as 'ms' }), /unit/);
  });

  it('draws each median as a bar to one scale per comparison, with its range, escaping labels', () => {
    const svg = renderChart('failover', [summariseComparison(downtime)]);
    const width = (cls: string) => Number(new RegExp(`class="${cls}"[^>]* width="([\\d.]+)"`).exec(svg)?.[1]);
    assert.ok(width('measured') > 0);
    assert.equal(Math.round((width('measured') / width('baseline')) * 100), 50);
    assert.match(svg, /planned &lt;failover&gt;/);
    assert.doesNotMatch(svg, /<failover>/);
    assert.equal((svg.match(/class="range"/g) ?? []).length, 2);
    assert.match(svg, /^<svg [^>]*xmlns="http:\/\/www.w3.org\/2000\/svg"/);
    assert.match(svg, /<\/svg>\n$/);
  });

  it('names stale results with the command that measures them again, and every missed target', () => {
    const report = renderReport(
      [entry({}), entry({ result: { benchmark: 'kvm', commit: 'b'.repeat(40), date: 'd' }, stale: 'code changed' })],
      { head: 'c'.repeat(40), date: 'now' },
    );
    assert.match(report, /\*\*Not the code at HEAD\*\*: kvm \(code changed\)/);
    assert.match(report, /npm run bench -- kvm`/);
    assert.match(report, /Targets missed: 2 of 4: failover: at most 0.1x the naive sync; kvm: at most 0.1x/);
    assert.match(report, /\| Controllable downtime \| planned <failover>: 50\.0 ms \(40\.0–60\.0, n=5\) \|/);
    assert.match(report, /!\[failover\]\(failover\.svg\)/);
    const none = renderReport([entry({ chart: null }, [])], { head: 'c'.repeat(40), date: 'now' });
    assert.match(none, /No result records a target\./);
    assert.match(none, /No comparisons recorded in this result\./);
    assert.doesNotMatch(none, /Not the code at HEAD/);
  });

  it('runs every benchmark by default, the named ones otherwise, and refuses unknown names', () => {
    assert.deepEqual(parseArguments([]), { reportOnly: false, names: Object.keys(BENCHMARKS) });
    assert.deepEqual(parseArguments(['kvm', 'overhead']), { reportOnly: false, names: ['kvm', 'overhead'] });
    assert.deepEqual(parseArguments(['--report']), { reportOnly: true, names: [] });
    assert.throws(() => parseArguments(['failover', 'nope']), /unknown benchmark\(s\): nope; the benchmarks are/);
    assert.throws(() => parseArguments(['--report', 'kvm']), /--report runs no benchmark/);
  });
});
