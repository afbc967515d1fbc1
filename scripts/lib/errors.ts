/** An error with the messages of its causes, which often say what really happened. */
export function describeError(err: unknown): string {
  const messages: string[] = [];
  for (let e: unknown = err; e instanceof Error; e = e.cause)
    if (!messages.includes(e.message)) messages.push(e.message);
  return messages.join(': ') || String(err);
}

/** What a failed command said: its stderr, else its stdout, else the error's message. */
export function commandOutput(err: unknown): string {
  const { stderr, stdout } = err as { stderr?: string; stdout?: string };
  return (stderr?.trim() || stdout?.trim() || (err instanceof Error ? err.message : String(err))).trim();
}
