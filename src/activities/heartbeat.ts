import { Context } from '@temporalio/activity';

const EVERY_MS = 2000;

/**
 * Heartbeats every two seconds while `work` runs, with the details `details` gives, so the server notices a dead
 * worker within the heartbeat timeout even while one hypervisor call waits minutes (a guest shutdown, a boot).
 * The details are what a retry after a crash finds in `heartbeatDetails`.
 */
export async function heartbeatWhile<T>(work: () => Promise<T>, details: () => unknown = () => undefined): Promise<T> {
  const ctx = Context.current();
  const beat = () => ctx.heartbeat(details());
  beat();
  const timer = setInterval(beat, EVERY_MS);
  try {
    return await work();
  } finally {
    clearInterval(timer);
  }
}

/** When an earlier attempt of this activity started, if one did (it left its start in its heartbeat). */
export function earlierAttemptStart(): number | undefined {
  const details = Context.current().info.heartbeatDetails as { startedAt?: unknown } | undefined;
  return typeof details?.startedAt === 'number' ? details.startedAt : undefined;
}
