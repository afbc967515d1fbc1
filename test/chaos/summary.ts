// The run's summary, per round and overall, as JSON (summary.json) and Markdown (summary.md).
import type { Hypervisor } from './estate';
import type { RoundRecord } from './round';

export interface ChaosSummary {
  seed: number;
  commit: string;
  hypervisor: Hypervisor;
  /** The kinds of fault the run could inject (and continueAsNew, counted), in the order they are listed. */
  faultKinds: string[];
  /** The `--faults` the run was given, if any. */
  faults?: string;
  startedAt: string;
  wallTimeSeconds: number;
  roundsPlanned: number;
  suggestContinueAsNew: number;
  rounds: RoundRecord[];
}

function sum(records: Record<string, number>[]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const r of records) for (const [k, v] of Object.entries(r)) out[k] = (out[k] ?? 0) + v;
  return out;
}

const listOf = (r: Record<string, number | undefined>): string =>
  Object.entries(r)
    .filter(([, v]) => v)
    .map(([k, v]) => `${k} ${v}`)
    .join(', ') || '–';

export function totalsOf(s: ChaosSummary) {
  return {
    operations: sum(s.rounds.map((r) => r.operations)),
    faults: sum(s.rounds.map((r) => r.faults as Record<string, number>)),
    decisions: sum(s.rounds.map((r) => r.decisions)),
    checked: sum(s.rounds.map((r) => r.checked)),
    invariantsChecked: s.rounds.reduce((n, r) => n + r.invariantsChecked, 0),
    violations: s.rounds.reduce((n, r) => n + r.violations.length, 0),
  };
}

/** The command that replays the run. */
export const replayCommand = (s: Pick<ChaosSummary, 'hypervisor' | 'seed' | 'roundsPlanned' | 'faults'>): string =>
  `npm run chaos -- ${s.hypervisor === 'kvm' ? '--hypervisor kvm ' : ''}--seed ${s.seed} --rounds ${s.roundsPlanned}` +
  (s.faults ? ` --faults ${s.faults}` : '');

export function summaryMarkdown(s: ChaosSummary): string {
  const t = totalsOf(s);
  const lines = [
    `# Chaos run, seed ${s.seed}${s.hypervisor === 'kvm' ? ', real VMs on KVM' : ''}`,
    '',
    `Commit ${s.commit}, hypervisor ${s.hypervisor}, started ${s.startedAt}, ${s.rounds.length} of ${s.roundsPlanned} rounds in ${s.wallTimeSeconds} s; ` +
      `continue-as-new suggested after ${s.suggestContinueAsNew} events. Replay: \`${replayCommand(s)}\`.`,
    '',
    '## Overall',
    '',
    '| | |',
    '|---|---|',
    `| operations | ${listOf(t.operations)} |`,
    `| halt decisions | ${listOf(t.decisions)} |`,
    `| invariants checked | ${t.invariantsChecked} |`,
    `| violations | ${t.violations} |`,
    '',
    '| invariant | checked |',
    '|---|---|',
    ...Object.entries(t.checked)
      .sort(([a], [b]) => (a < b ? -1 : 1))
      .map(([name, n]) => `| ${name} | ${n} |`),
    '',
    '| fault | injected |',
    '|---|---|',
    ...s.faultKinds.map((k) => `| ${k} | ${t.faults[k] ?? 0} |`),
    '',
    '## Rounds',
    '',
    '| round | seed | operations | faults | decisions | checks | violations | s |',
    '|---|---|---|---|---|---|---|---|',
    ...s.rounds.map(
      (r) =>
        `| ${r.round} | ${r.seed} | ${listOf(r.operations)} | ${listOf(r.faults)} | ${listOf(r.decisions)} | ` +
        `${r.invariantsChecked} | ${r.violations.length} | ${Math.round(r.durationMs / 1000)} |`,
    ),
  ];
  const violations = s.rounds.flatMap((r) =>
    r.violations.map((v) => `- round ${r.round}: **${v.name}**: ${v.detail ?? ''}`),
  );
  if (violations.length > 0) lines.push('', '## Violations', '', ...violations);
  return lines.join('\n') + '\n';
}
