import { DefaultLogger, type LogEntry, type LogLevel } from '@temporalio/worker';

const levels: readonly LogLevel[] = ['TRACE', 'DEBUG', 'INFO', 'WARN', 'ERROR'];

/** The log level from PF_LOG_LEVEL (TRACE, DEBUG, INFO, WARN, ERROR); INFO by default. */
export function logLevelFromEnv(env: NodeJS.ProcessEnv = process.env): LogLevel {
  const wanted = (env.PF_LOG_LEVEL ?? 'INFO').toUpperCase();
  return (levels as readonly string[]).includes(wanted) ? (wanted as LogLevel) : 'INFO';
}

/** Errors have no enumerable fields, so JSON would print them as {}. */
function jsonSafe(_key: string, value: unknown): unknown {
  if (value instanceof Error) return { ...value, name: value.name, message: value.message };
  return typeof value === 'bigint' ? value.toString() : value;
}

/** One JSON object per line, so logs stay machine-readable. */
export function jsonLogLine(entry: LogEntry): string {
  const time = new Date(Number(entry.timestampNanos / 1_000_000n)).toISOString();
  return `${JSON.stringify({ time, level: entry.level, msg: entry.message, ...entry.meta }, jsonSafe)}\n`;
}

/** Logs to stderr by default, so stdout stays free for output; the demo gives a log file instead. */
export function createLogger(
  level: LogLevel = logLevelFromEnv(),
  out: { write(line: string): unknown } = process.stderr,
): DefaultLogger {
  return new DefaultLogger(level, (entry) => out.write(jsonLogLine(entry)));
}
