/** A FIFO async mutex: guest writes, checkpoint reads and merges of one disk never interleave. */
export class Mutex {
  private tail: Promise<void> = Promise.resolve();

  async run<T>(fn: () => Promise<T>): Promise<T> {
    const previous = this.tail;
    let release!: () => void;
    this.tail = new Promise<void>((resolve) => (release = resolve));
    await previous;
    try {
      return await fn();
    } finally {
      release();
    }
  }
}

/**
 * Admits concurrent writes until it is closed; closing waits for the writes it already admitted, so that whoever
 * closed it (a seal, a drop) sees every admitted write landed and no later one.
 */
export class WriteGate {
  closed = false;
  private readonly inFlight = new Set<Promise<void>>();

  track(write: Promise<void>): Promise<void> {
    this.inFlight.add(write);
    const done = (): void => void this.inFlight.delete(write);
    write.then(done, done);
    return write;
  }

  async close(): Promise<void> {
    this.closed = true;
    await Promise.allSettled(this.inFlight);
  }
}
