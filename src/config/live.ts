import { statSync } from 'node:fs';
import { loadConfiguration } from './load';
import type { Configuration } from './schema';

/**
 * The configuration file as it is now: read again whenever it changed, so that who may ask for what (users, their
 * keys and roles) takes effect without restarting a worker. A file that no longer reads or checks throws, and the
 * requests that need it are refused until it is fixed: closed, not open.
 */
export function currentConfiguration(path: string, initial: Configuration): () => Configuration {
  const stamp = () => {
    const s = statSync(path);
    return `${s.ino}:${s.size}:${s.mtimeMs}`;
  };
  let seen = stamp();
  let current = initial;
  return () => {
    const now = stamp();
    if (now !== seen) {
      current = loadConfiguration(path);
      seen = now;
    }
    return current;
  };
}
