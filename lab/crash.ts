// Real crashes for tests: with PF_LAB_CRASH_AT=<step> the lab SIGKILLs itself at that point of a multi-file step,
// so a test can restart it on the same data directory and check what the step promised (test/lab/crash.test.ts).

export const CRASH_STEPS = [
  'begin-point:after-files',
  'drop-point:after-metadata',
  'create-checkpoint:after-files',
  'delete-checkpoint:after-metadata',
  'power-on:after-running-files',
  'discard-running:after-metadata',
  'seal-running:after-intent',
  'seal-running:after-first-rename',
  'merge:after-first-disk',
] as const;

export type CrashStep = (typeof CRASH_STEPS)[number];

export function crashPoint(step: CrashStep): void {
  if (process.env.PF_LAB_CRASH_AT === step) process.kill(process.pid, 'SIGKILL');
}

/** Refuses a crash step that names no point, which would let a crash test pass without any crash. */
export function checkCrashStep(): void {
  const step = process.env.PF_LAB_CRASH_AT;
  if (step !== undefined && !(CRASH_STEPS as readonly string[]).includes(step))
    throw new Error(`PF_LAB_CRASH_AT=${step} names no crash point (known: ${CRASH_STEPS.join(', ')})`);
}
