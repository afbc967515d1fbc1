// How often an entity checks that whoever holds what it owns still runs: soon after someone starts waiting, then
// less and less often while the holder keeps running, so a long holder (a session halted for days) costs little.

const FIRST_CHECK_MS = 5_000;
const MAX_CHECK_MS = 5 * 60_000;

export class HolderWatch {
  private delay = FIRST_CHECK_MS;

  /** When the next check is due, counted from now (the wait it is used in starts now). */
  nextCheckMs(): number {
    return this.delay;
  }

  /** After a check: back off while the holders run; look again soon after one was found gone. */
  checked(allRunning: boolean): void {
    this.delay = allRunning ? Math.min(this.delay * 2, MAX_CHECK_MS) : FIRST_CHECK_MS;
  }

  /** A new holder: check it soon. */
  reset(): void {
    this.delay = FIRST_CHECK_MS;
  }
}
