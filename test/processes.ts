// The tests' child processes, started the way an operator starts them (`node --import tsx <script>`): the workers
// (test/worker-process.ts, src/worker.ts) and the CLI. What they write is kept, never printed, so that tests stay
// quiet and a failure can quote it; one still running when the test's process exits is killed with it.
import { execFile, spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { promisify } from 'node:util';

const execute = promisify(execFile);
const READY_MS = 60_000;
/** How long a SIGTERMed worker may drain (its shutdownForceTime is 30 s) before it is killed. */
const TERMINATE_MS = 45_000;
const TAIL = 20_000;

const running = new Set<ChildProcessWithoutNullStreams>();
process.on('exit', () => {
  for (const child of running) child.kill('SIGKILL');
});

const nodeArgs = (script: string, args: readonly string[]): string[] => ['--import', 'tsx', script, ...args];

/** Runs the script to its end: its exit code and everything it wrote. */
export async function runScript(
  script: string,
  args: readonly string[],
  env: Record<string, string>,
): Promise<{ code: number; stdout: string; stderr: string }> {
  return execute(process.execPath, nodeArgs(script, args), { env: { ...process.env, ...env } }).then(
    ({ stdout, stderr }) => ({ code: 0, stdout, stderr }),
    (e: { code: number; stdout: string; stderr: string }) => e,
  );
}

export interface ServingProcess {
  child: ChildProcessWithoutNullStreams;
  /** The line (of stdout or stderr) that said it serves. */
  readyLine: string;
  /** The tail of what it wrote, stdout and stderr. */
  output(): string;
}

/**
 * Starts the script and resolves once a line it writes matches `ready`; fails quoting its output if it exits first
 * or takes longer than `ms` (then it is killed).
 */
export async function startScript(
  script: string,
  args: readonly string[],
  env: Record<string, string>,
  ready: RegExp,
  ms = READY_MS,
): Promise<ServingProcess> {
  const child = spawn(process.execPath, nodeArgs(script, args), { env: { ...process.env, ...env } });
  running.add(child);
  child.once('exit', () => running.delete(child));
  let tail = '';
  let onLine: (line: string) => void = () => undefined;
  for (const stream of [child.stdout, child.stderr]) {
    let partial = '';
    stream.on('data', (d: Buffer) => {
      tail = (tail + d.toString()).slice(-TAIL);
      const lines = (partial + d.toString()).split('\n');
      partial = lines.pop() ?? '';
      for (const line of lines) onLine(line);
    });
  }
  const what = `${script} ${args.join(' ')}`.trim();
  const readyLine = await new Promise<string>((resolve, reject) => {
    // Killed, not left running: a child's pipes would hold the test file's process open for good.
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`${what} not ready after ${ms / 1000} s:\n${tail}`));
    }, ms);
    onLine = (line) => {
      if (!ready.test(line)) return;
      clearTimeout(timer);
      onLine = () => undefined;
      resolve(line);
    };
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`${what} exited (${code ?? signal}) before it was ready:\n${tail}`));
    });
  });
  return { child, readyLine, output: () => tail };
}

const gone = (child: ChildProcessWithoutNullStreams): boolean => child.exitCode !== null || child.signalCode !== null;

/** SIGKILL: no clean stop; resolves once it is gone. */
export async function kill(child: ChildProcessWithoutNullStreams): Promise<void> {
  if (gone(child)) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill('SIGKILL');
  await exited;
}

/** SIGTERM, an operator's stop: workers finish what they run first. Resolves once it is gone (killed if it hangs). */
export async function terminate(child: ChildProcessWithoutNullStreams): Promise<void> {
  if (gone(child)) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), TERMINATE_MS);
  await exited;
  clearTimeout(timer);
}

/** test/worker-process.ts with the environment it reads (see there); resolves once its workers poll. */
export async function startWorkerProcess(env: Record<string, string>): Promise<ChildProcessWithoutNullStreams> {
  return (await startScript('test/worker-process.ts', [], env, /^ready$/)).child;
}
