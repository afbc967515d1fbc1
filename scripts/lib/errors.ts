/** An error with the messages of its causes, which often say what really happened. */
export function describeError(err: unknown): string {
  const messages: string[] = [];
  for (let e: unknown = err; e instanceof Error; e = e.cause)
    if (!messages.includes(e.message)) messages.push(e.message);
  return messages.join(': ') || String(err);
}
