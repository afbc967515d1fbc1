// Faults on demand, per host: the lab misbehaves the way a real host or network does.

import { z } from 'zod';

export const faultSchema = z.discriminatedUnion('kind', [
  z.strictObject({ kind: z.literal('unreachable'), durationMs: z.number().int().positive().optional() }),
  z.strictObject({
    kind: z.literal('fail'),
    status: z.number().int().min(500).max(599).default(503),
    durationMs: z.number().int().positive().optional(),
  }),
  z.strictObject({
    kind: z.literal('slow'),
    latencyMs: z.number().int().positive().max(600_000),
    durationMs: z.number().int().positive().optional(),
  }),
  z.strictObject({
    kind: z.literal('cut'),
    afterBytes: z.number().int().nonnegative(),
    durationMs: z.number().int().positive().optional(),
  }),
]);

export type Fault = z.output<typeof faultSchema>;
export type FaultKind = Fault['kind'];

interface ActiveFault {
  fault: Fault;
  expiresAt: number | null;
}

export class Faults {
  private readonly byHost = new Map<string, Map<FaultKind, ActiveFault>>();

  set(host: string, fault: Fault): void {
    let m = this.byHost.get(host);
    if (!m) this.byHost.set(host, (m = new Map<FaultKind, ActiveFault>()));
    m.set(fault.kind, { fault, expiresAt: fault.durationMs ? Date.now() + fault.durationMs : null });
  }

  clear(host: string, kind?: FaultKind): void {
    if (kind) this.byHost.get(host)?.delete(kind);
    else this.byHost.delete(host);
  }

  /** Faults in force for the host now; expired ones are dropped. */
  active(host: string): Fault[] {
    const m = this.byHost.get(host);
    if (!m) return [];
    const t = Date.now();
    for (const [k, f] of m) if (f.expiresAt !== null && f.expiresAt <= t) m.delete(k);
    return [...m.values()].map((f) => f.fault);
  }

  get<K extends FaultKind>(host: string, kind: K): Extract<Fault, { kind: K }> | undefined {
    return this.active(host).find((f): f is Extract<Fault, { kind: K }> => f.kind === kind);
  }

  list(): Record<string, Fault[]> {
    const out: Record<string, Fault[]> = {};
    for (const host of this.byHost.keys()) out[host] = this.active(host);
    return out;
  }
}
