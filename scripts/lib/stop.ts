import { setTimeout as delay } from 'node:timers/promises';
import { describeError } from './errors';

/** A wait given up because the command (the demo, the cluster) was asked to stop. */
export class StopRequested extends Error {}

interface Cleanup {
  what: string;
  run: () => Promise<void>;
  budgetMs: number;
}

/**
 * The one way a long-running command (the demo, the cluster) stops, whatever is in flight: SIGINT, SIGTERM or SIGHUP, its parent gone, an error, or its
 * end. Everything it started is registered here and stopped in reverse order, each within a budget, under a
 * deadline after which the process exits anyway; a second signal exits at once.
 */
export class StopPath {
  private readonly controller = new AbortController();
  private readonly cleanups: Cleanup[] = [];
  private finishing: Promise<never> | undefined;
  /** Aborted when a stop is requested, and when the clean-up begins. */
  readonly signal = this.controller.signal;

  constructor(
    private readonly print: (line: string) => void,
    private readonly deadlineMs = 20_000,
    /** What stops, as the messages name it. */
    private readonly subject = 'the demo',
  ) {
    for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(signal, () => this.request(signal));
    // npm passes SIGTERM to the shell that runs the script, not to us: once that shell is gone, stop as if we had
    // had the signal ourselves.
    const parent = process.ppid;
    const watch = setInterval(() => {
      if (process.ppid === parent) return;
      clearInterval(watch);
      this.request(`the process that started ${this.subject} is gone`);
    }, 1_000).unref();
    // After SIGHUP the terminal may be gone; writing to it must not break the clean-up.
    for (const stream of [process.stdout, process.stderr]) stream.on('error', () => undefined);
    // An error that nobody caught ends the command like any other, through the clean-up. Once stopping, calls that
    // were in flight fail as their connections close: they end with the process.
    const crash = (err: unknown): void => {
      if (!this.requested) void this.finish(1, `error: ${describeError(err)}`);
    };
    process.on('uncaughtException', crash);
    process.on('unhandledRejection', crash);
  }

  get requested(): boolean {
    return this.signal.aborted;
  }

  request(why: string): void {
    if (this.requested) {
      this.print(`${why} again: exiting now.`);
      process.exit(130);
    }
    this.print(`\n${why}: stopping ${this.subject}.`);
    this.controller.abort(new StopRequested(why));
  }

  /** The work's outcome, or a StopRequested rejection as soon as a stop is requested. */
  async untilStopped<T>(work: Promise<T>): Promise<T> {
    let onAbort = (): void => undefined;
    const stopped = new Promise<never>((_, reject) => {
      onAbort = () => reject(new StopRequested(String(this.signal.reason)));
      if (this.requested) onAbort();
      else this.signal.addEventListener('abort', onAbort, { once: true });
    });
    try {
      return await Promise.race([work, stopped]);
    } finally {
      this.signal.removeEventListener('abort', onAbort);
    }
  }

  /** Registers what finish() stops, after whatever is registered later. */
  defer(what: string, run: () => Promise<void>, budgetMs = 5_000): void {
    this.cleanups.push({ what, run, budgetMs });
  }

  /** Stops everything registered, last first, then exits with the code, the last words printed last. */
  finish(exitCode: number, lastWords?: string): Promise<never> {
    this.finishing ??= this.stopAll(exitCode, lastWords);
    return this.finishing;
  }

  private async stopAll(exitCode: number, lastWords: string | undefined): Promise<never> {
    if (!this.requested) this.controller.abort(new StopRequested('finishing'));
    const exit = (code: number): never => {
      if (lastWords) console.error(lastWords);
      process.exit(code);
    };
    setTimeout(() => {
      this.print(`Still stopping after ${this.deadlineMs / 1000} s: exiting anyway.`);
      exit(exitCode || 1);
    }, this.deadlineMs).unref();
    const cleanups = this.cleanups.reverse();
    const names = cleanups.map((c) => c.what);
    const listed = names.length > 1 ? `${names.slice(0, -1).join(', ')} and ${names.at(-1)}` : names[0];
    if (listed) this.print(`Stopping ${listed}...`);
    for (const { what, run, budgetMs } of cleanups) {
      const done = await Promise.race([
        run().then(
          () => true,
          (err: unknown) => {
            this.print(`Stopping ${what} failed: ${describeError(err)}`);
            return true;
          },
        ),
        delay(budgetMs, false),
      ]);
      if (!done) this.print(`${what} did not stop within ${budgetMs / 1000} s; going on.`);
    }
    if (listed) this.print('Stopped.');
    // The SDK's native runtime keeps the event loop alive after everything is closed.
    return exit(exitCode);
  }
}
