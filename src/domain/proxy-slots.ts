// Proxy slot allocation: pure, so the registry workflow and its tests share one rule.

/** A proxy as one request declares it (from the configuration its worker read) with the registry's runtime facts. */
export interface ProxyChoice {
  name: string;
  slots: number;
  enabled: boolean;
  /** Runtime state kept by the registry: taken offline by an operator. */
  online: boolean;
  /** Slots leased now, by any session. */
  leased: number;
}

/**
 * Picks `wanted` slots for one session among the proxies it may use, or returns undefined when it must wait.
 * Only the proxies the request declares count, so a proxy removed from the configuration is never leased to a
 * session started with the new one. A session asking more slots than its proxies have at all gets all of them
 * (its disks then share them); spreading over the least-loaded proxies first keeps the load even. Ties break by
 * name in code-point order, the same on every worker whatever its locale.
 */
export function allocateSlots(
  proxies: readonly ProxyChoice[],
  allowed: string[] | 'auto',
  wanted: number,
): string[] | undefined {
  const usable = proxies.filter((p) => p.enabled && p.online && (allowed === 'auto' || allowed.includes(p.name)));
  const capacity = usable.reduce((n, p) => n + p.slots, 0);
  if (capacity === 0) return undefined;
  const need = Math.min(wanted, capacity);
  const state = usable.map((p) => ({ name: p.name, free: p.slots - p.leased, load: p.leased }));
  if (state.reduce((n, p) => n + Math.max(0, p.free), 0) < need) return undefined;
  const picked: string[] = [];
  while (picked.length < need) {
    const best = state
      .filter((p) => p.free > 0)
      .sort((a, b) => a.load - b.load || b.free - a.free || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))[0]!;
    picked.push(best.name);
    best.free -= 1;
    best.load += 1;
  }
  return picked;
}
