import {
  allHandlersFinished,
  condition,
  continueAsNew,
  getExternalWorkflowHandle,
  log,
  setCurrentDetails,
  setHandler,
  workflowInfo,
} from '@temporalio/workflow';
import {
  proxyQueries,
  proxySignals,
  proxyTaskQueue,
  slotsGrantedSignal,
  type ProxyRegistryInput,
  type ProxyRegistryView,
  type SlotLease,
  type SlotRequest,
} from '../contract';
import { allocateSlots, type ProxyTable } from '../domain/proxy-slots';

/**
 * The one owner of every proxy's task slots. Requests queue in arrival order; the head of the queue is served
 * first, so a large request is not starved by small ones. Leases survive continue-as-new.
 */
export async function proxySlots(input: ProxyRegistryInput): Promise<void> {
  const proxies: ProxyTable = input.carried?.proxies ?? {};
  const queue: SlotRequest[] = input.carried?.queue ?? [];
  let changed = true;

  const leasesOf = (sessionId: string): SlotLease[] =>
    Object.entries(proxies).flatMap(([name, p]) =>
      p.leases.filter((s) => s === sessionId).map(() => ({ proxy: name, taskQueue: proxyTaskQueue(name) })),
    );

  setHandler(proxySignals.requestSlots, (request) => {
    for (const d of request.declared) {
      const known = proxies[d.name];
      proxies[d.name] = {
        slots: d.slots,
        enabled: d.enabled,
        online: known?.online ?? true,
        leases: known?.leases ?? [],
      };
    }
    const held = leasesOf(request.sessionId);
    if (held.length > 0) {
      // A repeated request (the session's activity retried): grant again what it already holds.
      void grant(request, held);
    } else if (!queue.some((q) => q.sessionId === request.sessionId)) {
      queue.push(request);
    }
    changed = true;
  });

  setHandler(proxySignals.releaseSlots, ({ sessionId }) => {
    for (const p of Object.values(proxies)) p.leases = p.leases.filter((s) => s !== sessionId);
    const i = queue.findIndex((q) => q.sessionId === sessionId);
    if (i >= 0) queue.splice(i, 1);
    changed = true;
  });

  setHandler(proxySignals.setProxyOnline, ({ proxy, online }) => {
    const p = proxies[proxy];
    if (!p) return log.warn('setProxyOnline for an unknown proxy', { proxy });
    p.online = online;
    changed = true;
  });

  setHandler(proxyQueries.slots, (): ProxyRegistryView => ({
    proxies: Object.entries(proxies).map(([name, p]) => ({
      name,
      slots: p.slots,
      enabled: p.enabled,
      online: p.online,
      leasedTo: p.leases,
    })),
    waiting: queue.map((q) => ({ sessionId: q.sessionId, slots: q.slots })),
  }));

  async function grant(to: Pick<SlotRequest, 'sessionId' | 'workflowId'>, leases: SlotLease[]): Promise<void> {
    try {
      await getExternalWorkflowHandle(to.workflowId).signal(slotsGrantedSignal, { leases });
    } catch (err) {
      // The session is gone (terminated or timed out): its slots go back to the pool.
      log.warn('Session to grant slots to is gone; releasing its slots', { ...to, error: String(err) });
      for (const p of Object.values(proxies)) p.leases = p.leases.filter((s) => s !== to.sessionId);
      changed = true;
    }
  }

  for (;;) {
    await condition(() => changed || workflowInfo().continueAsNewSuggested);
    if (!changed && workflowInfo().continueAsNewSuggested) {
      await condition(allHandlersFinished);
      return continueAsNew<typeof proxySlots>({ carried: { proxies, queue } });
    }
    changed = false;
    while (queue.length > 0) {
      const head = queue[0]!;
      const leases = allocateSlots(proxies, head.proxies, head.slots);
      if (!leases) break;
      queue.shift();
      for (const proxy of leases) proxies[proxy]!.leases.push(head.sessionId);
      await grant(
        head,
        leases.map((proxy) => ({ proxy, taskQueue: proxyTaskQueue(proxy) })),
      );
    }
    const used = Object.values(proxies).reduce((n, p) => n + p.leases.length, 0);
    const total = Object.values(proxies).reduce((n, p) => n + (p.enabled && p.online ? p.slots : 0), 0);
    setCurrentDetails(`${used} of ${total} slots leased; ${queue.length} session(s) waiting`);
  }
}
