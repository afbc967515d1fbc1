import { readFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { isNode, LineCounter, parseDocument } from 'yaml';
import { validate, type InputProblem } from '../contract';
import { configurationSchema, type Configuration } from './schema';

export class ConfigurationError extends Error {
  constructor(
    readonly file: string,
    readonly problems: InputProblem[],
  ) {
    super(
      `${file} has ${problems.length} problem${problems.length === 1 ? '' : 's'}:\n${problems.map((p) => `  ${p.path}: ${p.message}`).join('\n')}`,
    );
    this.name = 'ConfigurationError';
  }
}

/** Splits a problem path like `jobs[1].vms[0]` into the keys the YAML document is indexed by. */
function pathKeys(path: string): (string | number)[] {
  return [...path.matchAll(/([^.[\]]+)|\[(\d+)\]/g)].map((m) => (m[2] !== undefined ? Number(m[2]) : (m[1] ?? '')));
}

/**
 * Parses and checks a configuration text; every problem names its path and line in the file. Relative file paths
 * in it (the `tls` block, the scheduled runs' key) are taken relative to `dir`, the configuration file's directory.
 */
export function parseConfiguration(text: string, file = 'configuration', dir = process.cwd()): Configuration {
  const lines = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lines, prettyErrors: true });
  if (doc.errors.length > 0) {
    throw new ConfigurationError(
      file,
      doc.errors.map((e) => ({
        path: `line ${e.linePos?.[0].line ?? '?'}`,
        message: e.message.split('\n')[0] ?? e.message,
      })),
    );
  }
  const checked = validate(configurationSchema, doc.toJS());
  if (checked.ok) {
    const { tls, scheduledRuns } = checked.value;
    return {
      ...checked.value,
      ...(tls ? { tls: { ca: resolve(dir, tls.ca), cert: resolve(dir, tls.cert), key: resolve(dir, tls.key) } } : {}),
      ...(scheduledRuns?.key ? { scheduledRuns: { ...scheduledRuns, key: resolve(dir, scheduledRuns.key) } } : {}),
    };
  }
  const located = checked.problems.map((problem) => {
    const keys = pathKeys(problem.path);
    // Point at the deepest node that exists: a missing field is reported where its parent is.
    for (let n = keys.length; n >= 0; n--) {
      const node: unknown = n === 0 ? doc.contents : doc.getIn(keys.slice(0, n), true);
      if (isNode(node) && node.range)
        return { ...problem, path: `${problem.path} (line ${lines.linePos(node.range[0]).line})` };
    }
    return problem;
  });
  throw new ConfigurationError(file, located);
}

export function loadConfiguration(path: string): Configuration {
  return parseConfiguration(readFileSync(path, 'utf8'), path, dirname(resolve(path)));
}
