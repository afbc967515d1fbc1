// The report of `npm run bench`: one Markdown file, and an SVG chart per benchmark that shows, for each comparison,
// the measured median beside its baseline's, each with its min–max range. Pure: strings in, strings out.

import type { BenchResult, ComparisonSummary, SeriesSummary } from './comparisons';

const WIDTH = 760;
const LABEL_WIDTH = 230;
const VALUE_WIDTH = 150;
const BAR_HEIGHT = 16;
const ROW_GAP = 6;
const TITLE_HEIGHT = 22;
const BLOCK_GAP = 14;
const BAR_SPACE = WIDTH - LABEL_WIDTH - VALUE_WIDTH - 10;

const escapeXml = (text: string): string =>
  text.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');

/** A value as the report prints it: three significant digits, no exponent. */
export function formatValue(value: number, unit: string): string {
  if (!Number.isFinite(value)) return '∞';
  const digits = value >= 100 ? 0 : value >= 10 ? 1 : value >= 1 ? 2 : 3;
  return unit ? `${value.toFixed(digits)} ${unit}` : value.toFixed(digits);
}

export const formatRatio = (ratio: number): string => (Number.isFinite(ratio) ? `${ratio.toFixed(2)}×` : '∞');

function bar(series: SeriesSummary, y: number, scale: number, unit: string, measured: boolean): string {
  const x = (v: number) => (LABEL_WIDTH + v * scale).toFixed(1);
  const mid = (y + BAR_HEIGHT / 2).toFixed(1);
  return [
    `<text x="${LABEL_WIDTH - 6}" y="${mid}" text-anchor="end" dominant-baseline="middle">${escapeXml(series.label)}</text>`,
    `<rect class="${measured ? 'measured' : 'baseline'}" x="${LABEL_WIDTH}" y="${y}" width="${(series.median * scale).toFixed(1)}" height="${BAR_HEIGHT}"/>`,
    // The range of the samples: a line from min to max with a tick at each end.
    `<path class="range" d="M${x(series.min)} ${mid}H${x(series.max)}M${x(series.min)} ${y + 3}V${y + BAR_HEIGHT - 3}M${x(series.max)} ${y + 3}V${y + BAR_HEIGHT - 3}"/>`,
    `<text x="${WIDTH - VALUE_WIDTH}" y="${mid}" dominant-baseline="middle">${escapeXml(
      `${formatValue(series.median, unit)} (${formatValue(series.min, '')}–${formatValue(series.max, '')})`,
    )}</text>`,
  ].join('');
}

/** One chart of a benchmark's comparisons; each comparison has a scale of its own (units and sizes differ). */
export function renderChart(benchmark: string, comparisons: ComparisonSummary[]): string {
  const parts: string[] = [];
  let y = 8;
  for (const c of comparisons) {
    const verdicts = c.targets.map((t) => (t.met ? 'met' : 'missed'));
    const targetText = verdicts.length > 0 ? `; targets ${verdicts.join(', ')}` : '';
    parts.push(
      `<text class="title" x="4" y="${y + 14}">${escapeXml(`${c.title}: ${formatRatio(c.ratio)} of the baseline${targetText}`)}</text>`,
    );
    y += TITLE_HEIGHT;
    const largest = Math.max(c.measured.max, c.baseline.max);
    const scale = largest > 0 ? BAR_SPACE / largest : 0;
    parts.push(bar(c.measured, y, scale, c.unit, true));
    y += BAR_HEIGHT + ROW_GAP;
    parts.push(bar(c.baseline, y, scale, c.unit, false));
    y += BAR_HEIGHT + BLOCK_GAP;
  }
  const height = y;
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${WIDTH}" height="${height}" viewBox="0 0 ${WIDTH} ${height}" font-family="sans-serif" font-size="12">`,
    `<title>${escapeXml(`${benchmark}: medians with min–max, measured beside its baseline`)}</title>`,
    '<style>.measured{fill:#2b6cb0}.baseline{fill:#a0aec0}.range{stroke:#1a202c;stroke-width:1.5;fill:none}.title{font-weight:bold}</style>',
    `<rect width="${WIDTH}" height="${height}" fill="#fff"/>`,
    ...parts,
    '</svg>',
    '',
  ].join('\n');
}

export interface ReportEntry {
  result: BenchResult;
  comparisons: ComparisonSummary[];
  /** Why this result does not describe the code at HEAD (null: it does). */
  stale: string | null;
  /** The chart's file name beside the report, when the result has comparisons. */
  chart: string | null;
}

const cell = (text: string): string => text.replace(/\|/g, '\\|').replace(/\n/g, ' ');

function range(s: SeriesSummary, unit: string): string {
  return `${formatValue(s.median, unit)} (${formatValue(s.min, '')}–${formatValue(s.max, '')}, n=${s.count})`;
}

/** The Markdown report: the run's context, then each benchmark's chart and table of comparisons and targets. */
export function renderReport(entries: ReportEntry[], context: { head: string; date: string }): string {
  const lines = [
    '# Benchmark report',
    '',
    `Code at ${context.head.slice(0, 12)}, report written ${context.date} by \`npm run bench\`. Each comparison is ` +
      'the median of the measured series against the median of a baseline measured in the same run and timed the ' +
      'same way (min–max of the samples beside it); the ratio is measured / baseline.',
    '',
  ];
  const stale = entries.filter((e) => e.stale);
  if (stale.length > 0) {
    lines.push(
      `**Not the code at HEAD**: ${stale.map((e) => `${e.result.benchmark} (${e.stale})`).join('; ')}. ` +
        'Run them again: `npm run bench -- ' +
        stale.map((e) => e.result.benchmark).join(' ') +
        '`.',
      '',
    );
  }
  const missed = entries.flatMap((e) =>
    e.comparisons.flatMap((c) => c.targets.filter((t) => !t.met).map((t) => `${e.result.benchmark}: ${t.text}`)),
  );
  const targets = entries.reduce((n, e) => n + e.comparisons.reduce((m, c) => m + c.targets.length, 0), 0);
  lines.push(
    targets === 0
      ? 'No result records a target.'
      : missed.length === 0
        ? `All ${targets} targets are met.`
        : `Targets missed: ${missed.length} of ${targets}: ${missed.join('; ')}.`,
    '',
  );
  for (const e of entries) {
    const r = e.result;
    const machine = r.machine ? `, ${r.machine.cpus} CPUs, Node ${r.machine.node}` : '';
    lines.push(`## ${r.benchmark}`, '');
    lines.push(
      `Commit ${r.commit.slice(0, 12)}${r.commit.length > 40 ? r.commit.slice(40) : ''}, ${r.date}${machine}` +
        `${r.rounds ? `, ${r.rounds} rounds` : ''}.${e.stale ? ` **Stale: ${e.stale}.**` : ''}`,
      '',
    );
    if (e.comparisons.length === 0) {
      lines.push('No comparisons recorded in this result.', '');
      continue;
    }
    if (e.chart) lines.push(`![${r.benchmark}](${e.chart})`, '');
    lines.push('| comparison | measured | baseline | ratio | targets |', '|---|---|---|---|---|');
    for (const c of e.comparisons) {
      const targets = c.targets
        .map(
          (t) =>
            `${t.met ? 'met' : '**missed**'}: ${t.text} (${t.of === 'ratio' ? formatRatio(t.value) : formatValue(t.value, c.unit)})`,
        )
        .join('; ');
      lines.push(
        `| ${cell(c.title)} | ${cell(`${c.measured.label}: ${range(c.measured, c.unit)}`)} | ${cell(
          `${c.baseline.label}: ${range(c.baseline, c.unit)}`,
        )} | ${formatRatio(c.ratio)} | ${cell(targets || '–')} |`,
      );
    }
    const notes = e.comparisons.filter((c) => c.note).map((c) => `- ${c.title}: ${c.note}`);
    lines.push('', ...(notes.length > 0 ? [...notes, ''] : []));
  }
  return lines.join('\n');
}
