// `npm run bench`: runs the benchmarks one after another (all of them, or those named), each in a process of its
// own as `npx tsx bench/<name>.ts` runs it alone, then writes the report of every result in bench/results/:
// report.md and an SVG chart per benchmark. `npm run bench -- --report` writes the report only.

import { execFileSync, spawn } from 'node:child_process';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { benchResultSchema, summariseComparison, type BenchResult } from './report/comparisons';
import { renderChart, renderReport, type ReportEntry } from './report/render';

/**
 * Every benchmark, in the order a whole run takes them (the lab's first: they need no KVM packages): its script, and
 * the environment that makes the variant (failover-host-to-host is bench/failover.ts with the other proxy transport).
 */
export const BENCHMARKS: Record<string, { script: string; env?: Record<string, string> }> = {
  overhead: { script: 'overhead' },
  failover: { script: 'failover' },
  'failover-host-to-host': { script: 'failover', env: { BENCH_PROXY_TRANSPORT: 'host-to-host' } },
  'lab-copy': { script: 'lab-copy' },
  'lab-persist': { script: 'lab-persist' },
  kvm: { script: 'kvm' },
  'kvm-sync': { script: 'kvm-sync' },
  'kvm-failover': { script: 'kvm-failover' },
  'kvm-durable-writes': { script: 'kvm-durable-writes' },
};
const NAMES = Object.keys(BENCHMARKS);

const root = resolve(__dirname, '..');
const resultsDir = join(__dirname, 'results');
const git = (...args: string[]): string => execFileSync('git', args, { cwd: root, encoding: 'utf8' }).trim();

/** The files whose change makes a result stale: code, not prose or other results. */
const CODE_PATHS = ['.', ':(exclude)bench/results', ':(exclude)docs', ':(exclude)*.md'];

/** Why a result does not describe the code at HEAD, or null when it does. */
function staleness(result: BenchResult, head: string): string | null {
  const [sha, ...rest] = result.commit.split(' ');
  if (rest.length > 0) return `measured with uncommitted changes on ${sha!.slice(0, 12)}`;
  if (sha === head) return null;
  let changed: string[];
  try {
    changed = git('diff', '--name-only', sha!, head, '--', ...CODE_PATHS)
      .split('\n')
      .filter(Boolean);
  } catch {
    return `measured on ${sha!.slice(0, 12)}, a commit this clone does not have`;
  }
  return changed.length === 0 ? null : `code changed in ${changed.length} file(s) since ${sha!.slice(0, 12)}`;
}

function readResults(): { name: string; result: BenchResult }[] {
  return readdirSync(resultsDir)
    .filter((f) => f.endsWith('.json') && !f.startsWith('chaos-'))
    .sort()
    .map((file) => {
      const parsed = benchResultSchema.safeParse(JSON.parse(readFileSync(join(resultsDir, file), 'utf8')));
      if (!parsed.success)
        throw new Error(
          `bench/results/${file}: ${parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`,
        );
      return { name: file.replace(/\.json$/, ''), result: parsed.data };
    });
}

export function writeReport(): string {
  const head = git('rev-parse', 'HEAD');
  const entries: ReportEntry[] = readResults().map(({ name, result }) => {
    const comparisons = (result.comparisons ?? []).map(summariseComparison);
    const chart = comparisons.length > 0 ? `${name}.svg` : null;
    if (chart) writeFileSync(join(resultsDir, chart), renderChart(name, comparisons));
    return { result: { ...result, benchmark: name }, comparisons, stale: staleness(result, head), chart };
  });
  const path = join(resultsDir, 'report.md');
  writeFileSync(path, renderReport(entries, { head, date: new Date().toISOString() }));
  return path;
}

function runBenchmark(name: string): Promise<number> {
  const { script, env } = BENCHMARKS[name]!;
  return new Promise((resolveExit) => {
    const child = spawn(process.execPath, ['--import', 'tsx', join(__dirname, `${script}.ts`)], {
      cwd: root,
      env: { ...process.env, ...env },
      stdio: 'inherit',
    });
    child.once('exit', (code, signal) => resolveExit(code ?? (signal ? 1 : 0)));
  });
}

export function parseArguments(args: string[]): { reportOnly: boolean; names: string[] } {
  const reportOnly = args.includes('--report');
  const names = args.filter((a) => a !== '--report');
  const unknown = names.filter((n) => !NAMES.includes(n));
  if (unknown.length > 0)
    throw new Error(`unknown benchmark(s): ${unknown.join(', ')}; the benchmarks are ${NAMES.join(', ')}`);
  if (reportOnly && names.length > 0) throw new Error('--report runs no benchmark: name none with it');
  return { reportOnly, names: names.length > 0 ? names : reportOnly ? [] : NAMES };
}

async function main(): Promise<number> {
  let parsed: ReturnType<typeof parseArguments>;
  try {
    parsed = parseArguments(process.argv.slice(2));
  } catch (err) {
    console.error(`npm run bench: ${err instanceof Error ? err.message : String(err)}`);
    return 2;
  }
  const failed: string[] = [];
  for (const name of parsed.names) {
    const { script, env } = BENCHMARKS[name]!;
    const variant = env
      ? ` with ${Object.entries(env)
          .map(([k, v]) => `${k}=${v}`)
          .join(' ')}`
      : '';
    console.log(`\n== ${name}: bench/${script}.ts${variant} (${new Date().toISOString()})`);
    const code = await runBenchmark(name);
    if (code !== 0) failed.push(`${name} (exit code ${code})`);
  }
  console.log(`\nReport: ${writeReport()}`);
  if (failed.length > 0) console.error(`Failed: ${failed.join(', ')}; their results are the older ones, if any`);
  return failed.length > 0 ? 1 : 0;
}

if (require.main === module)
  main().then(
    (code) => process.exit(code),
    (err: unknown) => {
      console.error(err);
      process.exit(1);
    },
  );
