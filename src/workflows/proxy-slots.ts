import {
  allHandlersFinished,
  condition,
  continueAsNew,
  getExternalWorkflowHandle,
  log,
  patched,
  setCurrentDetails,
  setHandler,
  uuid4,
  workflowInfo,
} from '@temporalio/workflow';
import {
  formatProblems,
  formatRequester,
  proxyQueries,
  proxySignals,
  proxyTaskQueue,
  setProxyOnlineSchema,
  slotsGrantedSignal,
  validate,
  type HeldSlot,
  type ProxyDeclaration,
  type ProxyRegistryInput,
  type ProxyRegistryView,
  type SlotLease,
  type SlotRequest,
} from '../contract';
import { allocateSlots } from '../domain/proxy-slots';
import { control, failureMessage, SIGNED_REQUESTS_PATCH, verifyRequester, withSummary } from './common';
import { HolderWatch } from './holders';

/** setProxyOnline changes take effect in the order they arrived, each verified only after the one before it. */
const PROXY_CHANGES_IN_ORDER_PATCH = 'proxy-changes-in-order';

type ProxyEntry = { online: boolean; leases: HeldSlot[]; declared: ProxyDeclaration | null };

/**
 * The one owner of every proxy's runtime state: who holds which slot, and which proxies an operator took offline.
 * Requests queue in arrival order; the head of the queue is served first, so a large request is not starved by
 * small ones. How many slots a proxy has, and whether it is enabled, is configuration: each request brings it as
 * its worker read it, and a request is served only from the proxies it declares. While any slot is leased, the
 * registry checks that its holders still run, and takes back the slots of those that do not (terminated, reset
 * or timed out without giving them back), so that the `slots` query never shows a dead lease for long. Leases
 * survive continue-as-new.
 */
export async function proxySlots(input: ProxyRegistryInput): Promise<void> {
  const proxies: Record<string, ProxyEntry> = input.carried?.proxies ?? {};
  const queue: SlotRequest[] = input.carried?.queue ?? [];
  /** Repeated requests of sessions that hold their slots already: granted again by the main loop. */
  const regrants: SlotRequest[] = [];
  const watch = new HolderWatch();
  let changed = true;
  let lastRejection: ProxyRegistryView['lastRejection'] = input.carried?.lastRejection ?? null;

  const entry = (name: string): ProxyEntry => (proxies[name] ??= { online: true, leases: [], declared: null });
  const leasesOf = (sessionId: string): SlotLease[] =>
    Object.entries(proxies).flatMap(([name, p]) =>
      p.leases.filter((s) => s.sessionId === sessionId).map(() => ({ proxy: name, taskQueue: proxyTaskQueue(name) })),
    );
  const release = (sessionId: string): void => {
    for (const p of Object.values(proxies)) p.leases = p.leases.filter((s) => s.sessionId !== sessionId);
  };

  setHandler(proxySignals.requestSlots, (request) => {
    for (const d of request.declared) entry(d.name).declared = d;
    if (leasesOf(request.sessionId).length > 0) regrants.push(request);
    else if (!queue.some((q) => q.sessionId === request.sessionId)) queue.push(request);
    changed = true;
  });

  setHandler(proxySignals.releaseSlots, ({ sessionId }) => {
    release(sessionId);
    const i = queue.findIndex((q) => q.sessionId === sessionId);
    if (i >= 0) queue.splice(i, 1);
    changed = true;
  });

  /** The newest proxy change's turn: each change waits for the ones that arrived before it. */
  let previousChange: Promise<void> = Promise.resolve();

  setHandler(proxySignals.setProxyOnline, async (request: unknown) => {
    const receivedAt = Date.now();
    const refuse = (reason: string) => {
      lastRejection = { at: new Date().toISOString(), reason };
      log.warn('setProxyOnline refused', { reason });
    };
    const checked = validate(setProxyOnlineSchema, request);
    if (!checked.ok) return refuse(formatProblems('The setProxyOnline signal', checked.problems));
    if (!proxies[checked.value.proxy]) return refuse(`proxy: '${checked.value.proxy}' is no proxy the registry knows`);
    const { proxy, online } = checked.value;
    const apply = () => {
      proxies[proxy]!.online = online;
      changed = true;
    };
    if (!patched(SIGNED_REQUESTS_PATCH)) return apply();
    const verifyThenApply = async () => {
      try {
        const requester = await verifyRequester(
          'setProxyOnline',
          workflowInfo().workflowId,
          request,
          receivedAt,
          `setProxyOnline ${uuid4()}`,
        );
        log.info('Proxy taken offline or online', { ...checked.value, by: formatRequester(requester) });
      } catch (err) {
        return refuse(failureMessage(err));
      }
      apply();
    };
    // Verifications are activities and finish in any order: an operator's "offline" then "online" must leave the
    // proxy online (the fault suite saw the older change applied last, and the proxy stay offline for good).
    if (!patched(PROXY_CHANGES_IN_ORDER_PATCH)) return verifyThenApply();
    const mine = previousChange.then(verifyThenApply);
    previousChange = mine;
    await mine;
  });

  setHandler(proxyQueries.slots, (): ProxyRegistryView => ({
    proxies: Object.entries(proxies).map(([name, p]) => ({
      name,
      slots: p.declared?.slots ?? 0,
      enabled: p.declared?.enabled ?? false,
      online: p.online,
      leasedTo: p.leases.map((s) => s.sessionId),
    })),
    waiting: queue.map((q) => ({ sessionId: q.sessionId, slots: q.slots })),
    lastRejection,
  }));

  /** Tells the session its slots; a session that is gone gets its slots taken back. */
  async function grant(to: SlotRequest, leases: SlotLease[]): Promise<void> {
    try {
      await getExternalWorkflowHandle(to.workflowId).signal(slotsGrantedSignal, { leases });
    } catch (err) {
      log.warn('Session to grant slots to is gone; releasing its slots', {
        sessionId: to.sessionId,
        error: failureMessage(err),
      });
      release(to.sessionId);
      changed = true;
    }
  }

  /** Takes back the slots of holders that no longer run. */
  async function checkHolders(): Promise<void> {
    const holders = [...new Set(Object.values(proxies).flatMap((p) => p.leases.map((s) => s.workflowId)))];
    if (holders.length === 0) return;
    const gone = await withSummary(
      control.workflowsNotRunning,
      `Check that ${holders.length} slot holder(s) still run`,
      [{ workflowIds: holders }],
    );
    watch.checked(gone.length === 0);
    for (const workflowId of gone) {
      const held = Object.values(proxies).flatMap((p) => p.leases.filter((s) => s.workflowId === workflowId));
      log.warn('Holder of proxy slots is no longer running; its slots are taken back', { workflowId });
      for (const s of held) release(s.sessionId);
      changed = true;
    }
  }

  const canContinueAsNew = () =>
    workflowInfo().continueAsNewSuggested && allHandlersFinished() && regrants.length === 0;
  const leased = () => Object.values(proxies).some((p) => p.leases.length > 0);
  // 0.2.0 watched the holders only while someone waited for slots: a dead holder's lease then stayed in the
  // `slots` query until the next request queued (the fault suite found it). Runs started before keep that rule.
  const watchEveryLease = patched('proxy-slots-watch-every-lease');
  const watchedNow = watchEveryLease ? leased : () => queue.length > 0 && leased();

  for (;;) {
    // Without a timeout, condition resolves to undefined: only `false` means the check came due.
    // Whether the holders are watched can change (a first lease, someone starting to wait): the wait restarts.
    const watched = watchedNow();
    const checkDue =
      (await condition(
        () => changed || regrants.length > 0 || canContinueAsNew() || watchedNow() !== watched,
        watched ? watch.nextCheckMs() : undefined,
      )) === false;
    if (checkDue) {
      await checkHolders();
      continue;
    }
    if (!changed && regrants.length === 0) {
      if (canContinueAsNew()) return continueAsNew<typeof proxySlots>({ carried: { proxies, queue, lastRejection } });
      continue; // only whether someone waits changed
    }
    changed = false;
    for (const request of regrants.splice(0)) await grant(request, leasesOf(request.sessionId));
    while (queue.length > 0) {
      const head = queue[0]!;
      const choices = head.declared.map((d) => ({
        ...d,
        online: entry(d.name).online,
        leased: entry(d.name).leases.length,
      }));
      const picked = allocateSlots(choices, head.proxies, head.slots);
      if (!picked) break;
      queue.shift();
      for (const proxy of picked) entry(proxy).leases.push({ sessionId: head.sessionId, workflowId: head.workflowId });
      watch.reset();
      await grant(
        head,
        picked.map((proxy) => ({ proxy, taskQueue: proxyTaskQueue(proxy) })),
      );
    }
    const used = Object.values(proxies).reduce((n, p) => n + p.leases.length, 0);
    const total = Object.values(proxies).reduce(
      (n, p) => n + (p.declared?.enabled && p.online ? p.declared.slots : 0),
      0,
    );
    setCurrentDetails(`${used} of ${total} slots leased; ${queue.length} session(s) waiting`);
  }
}
