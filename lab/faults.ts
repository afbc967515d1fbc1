// Faults on demand, per host: the lab misbehaves the way a real host or network does. A fault hits every call to
// its host, or only the calls of its `method` and/or `path` (a regular expression tested against the decoded URL
// path), so that a test can fail, say, only the power calls of one replica.

import { z } from 'zod';

function isRegExp(source: string): boolean {
  try {
    new RegExp(source);
    return true;
  } catch {
    return false;
  }
}

const common = {
  method: z.enum(['GET', 'PUT', 'POST', 'DELETE']).optional(),
  path: z.string().min(1).max(512).refine(isRegExp, 'a valid regular expression').optional(),
  durationMs: z.number().int().positive().optional(),
};

export const faultSchema = z.discriminatedUnion('kind', [
  z.strictObject({ kind: z.literal('unreachable'), ...common }),
  // A 5xx is a failure the caller retries; 409 is a refusal it does not (a conflict the host reports).
  z.strictObject({
    kind: z.literal('fail'),
    status: z
      .union([z.literal(409), z.number().int().min(500).max(599)], { error: 'must be 409 or 500 to 599' })
      .default(503),
    ...common,
  }),
  z.strictObject({ kind: z.literal('slow'), latencyMs: z.number().int().positive().max(600_000), ...common }),
  z.strictObject({ kind: z.literal('cut'), afterBytes: z.number().int().nonnegative(), ...common }),
]);

export type Fault = z.output<typeof faultSchema>;
export type FaultKind = Fault['kind'];

/** A call as faults see it. */
export interface FaultCall {
  method: string;
  path: string;
}

interface ActiveFault {
  fault: Fault;
  pattern: RegExp | null;
  expiresAt: number | null;
}

export class Faults {
  private readonly byHost = new Map<string, ActiveFault[]>();

  /** Adds a fault to the host's; one of the same kind and scope is replaced. */
  set(host: string, fault: Fault): void {
    const others = this.live(host).filter(
      (f) => !(f.fault.kind === fault.kind && f.fault.method === fault.method && f.fault.path === fault.path),
    );
    const pattern = fault.path === undefined ? null : new RegExp(fault.path);
    const expiresAt = fault.durationMs ? Date.now() + fault.durationMs : null;
    this.byHost.set(host, [...others, { fault, pattern, expiresAt }]);
  }

  clear(host: string, kind?: FaultKind): void {
    if (kind)
      this.byHost.set(
        host,
        this.live(host).filter((f) => f.fault.kind !== kind),
      );
    else this.byHost.delete(host);
  }

  /** Faults in force for the host now: all of them, or those whose scope takes in `call`. */
  active(host: string, call?: FaultCall): Fault[] {
    return this.live(host)
      .filter(
        (f) =>
          call === undefined ||
          ((f.fault.method === undefined || f.fault.method === call.method) &&
            (f.pattern === null || f.pattern.test(call.path))),
      )
      .map((f) => f.fault);
  }

  get<K extends FaultKind>(host: string, kind: K, call: FaultCall): Extract<Fault, { kind: K }> | undefined {
    return this.active(host, call).find((f): f is Extract<Fault, { kind: K }> => f.kind === kind);
  }

  list(): Record<string, Fault[]> {
    const out: Record<string, Fault[]> = {};
    for (const host of [...this.byHost.keys()]) {
      const faults = this.active(host);
      if (faults.length > 0) out[host] = faults;
    }
    return out;
  }

  /** The host's faults, expired ones dropped. */
  private live(host: string): ActiveFault[] {
    const t = Date.now();
    const list = (this.byHost.get(host) ?? []).filter((f) => f.expiresAt === null || f.expiresAt > t);
    if (list.length > 0) this.byHost.set(host, list);
    else this.byHost.delete(host);
    return list;
  }
}
