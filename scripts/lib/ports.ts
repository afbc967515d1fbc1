import { spawnSync } from 'node:child_process';
import { readFileSync, readlinkSync } from 'node:fs';
import { portInUse } from './dev-server';

export interface DemoPorts {
  temporal: number;
  ui: number;
  lab: number;
  /** Prometheus: the demo's workers, and the Temporal server. */
  workerMetrics: number;
  serverMetrics: number;
}

function portFromEnv(env: NodeJS.ProcessEnv, name: string, fallback: number): number {
  const text = env[name];
  if (text === undefined || text === '') return fallback;
  const port = Number(text);
  if (!Number.isInteger(port) || port < 1 || port > 65535) {
    throw new Error(`${name} must be a TCP port number (1 to 65535), not '${text}'.`);
  }
  return port;
}

/**
 * PF_TEMPORAL_PORT, PF_TEMPORAL_UI_PORT (the Temporal port + 1000 by default, as the CLI has it), PF_LAB_PORT,
 * PF_METRICS_PORT (the workers' Prometheus endpoint) and PF_TEMPORAL_METRICS_PORT (the Temporal server's, the next
 * port by default).
 */
export function demoPortsFromEnv(env: NodeJS.ProcessEnv = process.env): DemoPorts {
  const temporal = portFromEnv(env, 'PF_TEMPORAL_PORT', 7233);
  const workerMetrics = portFromEnv(env, 'PF_METRICS_PORT', 9464);
  return {
    temporal,
    ui: portFromEnv(env, 'PF_TEMPORAL_UI_PORT', temporal + 1000),
    lab: portFromEnv(env, 'PF_LAB_PORT', 7300),
    workerMetrics,
    serverMetrics: portFromEnv(env, 'PF_TEMPORAL_METRICS_PORT', workerMetrics + 1),
  };
}

/** The process listening on a local TCP port, as lsof or ss tell it: its pid and name; undefined if neither can. */
function listenerOf(port: number): { pid: number; name: string } | undefined {
  const lsof = spawnSync('lsof', ['-nP', `-iTCP:${port}`, '-sTCP:LISTEN', '-Fpc'], { encoding: 'utf8' });
  const pid = /^p(\d+)$/m.exec(lsof.stdout ?? '')?.[1];
  if (pid) return { pid: Number(pid), name: /^c(.*)$/m.exec(lsof.stdout)?.[1] ?? '?' };
  const ss = spawnSync('ss', ['-Hltnp', `sport = :${port}`], { encoding: 'utf8' });
  const user = /users:\(\("([^"]*)",pid=(\d+)/.exec(ss.stdout ?? '');
  return user ? { pid: Number(user[2]), name: user[1]! } : undefined;
}

/** What /proc says about a process; empty where there is no /proc or it is not ours to read. */
function procInfo(pid: number): { cwd?: string; command?: string; parent?: number } {
  const read = <T>(what: () => T): T | undefined => {
    try {
      return what();
    } catch {
      return undefined;
    }
  };
  return {
    cwd: read(() => readlinkSync(`/proc/${pid}/cwd`)),
    command: read(() => readFileSync(`/proc/${pid}/cmdline`, 'utf8')),
    // The field after the parenthesised name, which may itself hold spaces: state, then the parent's pid.
    parent: read(() => Number(/\) \S+ (\d+)/.exec(readFileSync(`/proc/${pid}/stat`, 'utf8'))?.[1])),
  };
}

/** Who holds the port, and how to stop it: a demo (of another checkout, often) is stopped as a whole. */
function describeListener(port: number): { who: string; stop: string } {
  const listener = listenerOf(port);
  if (!listener) return { who: 'another program', stop: 'Stop that program' };
  const info = procInfo(listener.pid);
  const parent = info.parent ? procInfo(info.parent) : {};
  const demo = info.command?.includes('scripts/demo.ts')
    ? { pid: listener.pid, cwd: info.cwd }
    : parent.command?.includes('scripts/demo.ts')
      ? { pid: info.parent!, cwd: parent.cwd }
      : undefined;
  if (demo) {
    return {
      who: `the demo running${demo.cwd ? ` in ${demo.cwd}` : ''} (pid ${demo.pid}) and its Temporal server`,
      stop: `Stop that demo (Ctrl-C in its terminal, or kill -TERM ${demo.pid})`,
    };
  }
  const where = info.cwd ? `, in ${info.cwd}` : '';
  return { who: `pid ${listener.pid} (${listener.name}${where})`, stop: `Stop it (kill -TERM ${listener.pid})` };
}

/**
 * The demo starts its own Temporal server and lab and never uses ones it did not start: a server or lab left by
 * another checkout can go away under it, or hold another estate's state. A taken port is refused, naming who
 * holds it, how to stop it and how to use other ports.
 */
export async function refuseTakenPorts(ports: DemoPorts): Promise<void> {
  const roles: [string, number][] = [
    ['the Temporal server', ports.temporal],
    ['the Temporal Web UI', ports.ui],
    ['the lab', ports.lab],
    ["the workers' metrics", ports.workerMetrics],
    ["the Temporal server's metrics", ports.serverMetrics],
  ];
  // One line per holder: a demo of another checkout holds all three ports.
  const holders = new Map<string, { stop: string; ports: string[] }>();
  for (const [role, port] of roles) {
    if (!(await portInUse(port))) continue;
    const { who, stop } = describeListener(port);
    const holder = holders.get(who) ?? { stop, ports: [] };
    holder.ports.push(`${port} (${role})`);
    holders.set(who, holder);
  }
  const taken = [...holders].map(
    ([who, { stop, ports: held }]) =>
      `${held.length > 1 ? `Ports ${held.slice(0, -1).join(', ')} and ${held.at(-1)} are` : `Port ${held[0]} is`} ` +
      `in use by ${who}. ` +
      `${stop}, or use other ports.`,
  );
  if (taken.length === 0) return;
  throw new Error(
    [
      ...taken,
      'The demo starts its own Temporal server and lab; it does not use ones that it did not start.',
      'To run it on other ports:',
      '  PF_TEMPORAL_PORT=17233 PF_TEMPORAL_UI_PORT=18233 PF_LAB_PORT=17300 PF_METRICS_PORT=19464 npm run demo',
    ].join('\n'),
  );
}
