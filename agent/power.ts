// Power of a libvirt domain, the same for a source VM and a replica: the ACPI button with the wait for the guest to
// stop (the forced power-off after a timeout is the orchestrator's decision), destroy, and libvirt's state.
import { setTimeout as sleep } from 'node:timers/promises';
import type { PowerState } from '../src/hypervisor/port';
import { VirshError, type Virsh } from './libvirt/virsh';

const POLL_MS = 100;

export function parseDomState(text: string): { state: string; reason: string } {
  const m = /^(.*?)\s*\(([^)]*)\)\s*$/.exec(text.trim());
  return m ? { state: m[1]!, reason: m[2]! } : { state: text.trim(), reason: '' };
}

export function powerStateOf(state: string): PowerState {
  if (state === 'shut off' || state === 'crashed') return 'Off';
  if (state === 'in shutdown') return 'Stopping';
  return 'Running';
}

/** libvirt's answer for a domain it has no definition of. */
export const isNoSuchDomain = (e: unknown): boolean =>
  e instanceof VirshError && /failed to get domain|Domain not found/i.test(e.detail);

/** It may have stopped between our look and our call. */
const unlessNotRunning = (e: unknown): void => {
  if (!(e instanceof VirshError && /not running/i.test(e.detail))) throw e;
};

/** Presses the ACPI button and waits until libvirt says `shut off`, or the deadline; the state at the end. */
export async function acpiShutdown(
  virsh: Virsh,
  domain: string,
  timeoutMs: number,
  domState: () => Promise<{ state: string }>,
  signal?: AbortSignal,
): Promise<{ off: boolean; state: PowerState }> {
  await virsh.run(['shutdown', '--mode', 'acpi', domain]).catch(unlessNotRunning);
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const { state } = await domState();
    if (state === 'shut off') return { off: true, state: 'Off' };
    if (Date.now() >= deadline || signal?.aborted) return { off: false, state: powerStateOf(state) };
    await sleep(POLL_MS);
  }
}

export async function destroyDomain(virsh: Virsh, domain: string): Promise<void> {
  await virsh.run(['destroy', domain]).catch(unlessNotRunning);
}
