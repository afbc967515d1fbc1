// Long host operations (merging a replica's oldest restore point, consolidating a replica: minutes for a real disk)
// run in the background instead of inside one HTTP request with a fixed deadline. A request starts the operation, or
// follows the one already running: it answers with the result when the operation ends within a short wait, and
// otherwise with 202 and what is running; the caller asks again (the orchestrator's activity heartbeats meanwhile).
// Each operation records its intent before it changes a file and can run again from any step, so one cut off by a
// crash is resumed by the next request, or at the agent's next start.
import type { HostJobRunning } from '../src/host-api/schemas';

interface Job {
  operation: string;
  startedAt: number;
  done: Promise<unknown>;
  settled: boolean;
}

export class HostJobs {
  private readonly jobs = new Map<string, Job>();

  /** `waitMs`: how long a request waits for the operation before it answers that it is still running. */
  constructor(private readonly waitMs: number) {}

  /**
   * The result of the operation `key` (started now by `start` unless it runs already), or what runs when it takes
   * longer than the wait. Its outcome, a result or an error, goes to the first request that sees it; the next one
   * starts the operation again, which is idempotent.
   */
  async follow<T>(key: string, operation: string, start: () => Promise<T>): Promise<T | HostJobRunning> {
    const job = this.jobs.get(key) ?? this.start(key, operation, start);
    let timer: NodeJS.Timeout | undefined;
    const waited = new Promise<'running'>((resolve) => (timer = setTimeout(() => resolve('running'), this.waitMs)));
    try {
      await Promise.race([job.done.catch(() => undefined), waited]);
    } finally {
      clearTimeout(timer);
    }
    if (!job.settled) return { job: { operation: job.operation, runningForMs: Date.now() - job.startedAt } };
    if (this.jobs.get(key) === job) this.jobs.delete(key);
    return job.done as Promise<T>;
  }

  /** Starts the operation in the background (an intent a crash cut off, at start-up); its outcome waits for a request. */
  resume(key: string, operation: string, start: () => Promise<unknown>): void {
    if (!this.jobs.has(key)) this.start(key, operation, start);
  }

  private start(key: string, operation: string, start: () => Promise<unknown>): Job {
    const job: Job = { operation, startedAt: Date.now(), done: Promise.resolve(), settled: false };
    job.done = start().finally(() => (job.settled = true));
    job.done.catch(() => undefined); // its error goes to the request that follows it
    this.jobs.set(key, job);
    return job;
  }
}
