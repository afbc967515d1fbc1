// Proxy slot allocation: pure, so the registry workflow and its tests share one rule.

export type ProxyTable = Record<string, { slots: number; enabled: boolean; online: boolean; leases: string[] }>;

/**
 * Picks `wanted` slots for one session among the proxies it may use, or returns undefined when it must wait.
 * A session asking more slots than its proxies have at all gets all of them (its disks then share them);
 * spreading over the least-loaded proxies first keeps the load even.
 */
export function allocateSlots(proxies: ProxyTable, allowed: string[] | 'auto', wanted: number): string[] | undefined {
  const usable = Object.entries(proxies).filter(
    ([name, p]) => p.enabled && p.online && (allowed === 'auto' || allowed.includes(name)),
  );
  const capacity = usable.reduce((n, [, p]) => n + p.slots, 0);
  if (capacity === 0) return undefined;
  const need = Math.min(wanted, capacity);
  const state = usable.map(([name, p]) => ({ name, free: p.slots - p.leases.length, load: p.leases.length }));
  if (state.reduce((n, p) => n + Math.max(0, p.free), 0) < need) return undefined;
  const picked: string[] = [];
  while (picked.length < need) {
    const best = state
      .filter((p) => p.free > 0)
      .sort((a, b) => a.load - b.load || b.free - a.free || a.name.localeCompare(b.name))[0]!;
    picked.push(best.name);
    best.free -= 1;
    best.load += 1;
  }
  return picked;
}
