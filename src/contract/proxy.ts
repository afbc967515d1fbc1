import { defineQuery, defineSignal } from '@temporalio/workflow';
import { z } from 'zod';
import { signatureComplete, signatureFields } from './requests';
import { requiredText } from './validation';

/** One registry of every proxy's task slots: a single owner makes leases exact across all workers. */
export const PROXY_REGISTRY_WORKFLOW_ID = 'proxy-slots';

/** Each proxy runs the data-moving activities on a task queue of its own, so it can run on its own machine. */
export const proxyTaskQueue = (proxy: string): string => `planned-failover-proxy-${proxy}`;

export interface ProxyDeclaration {
  name: string;
  slots: number;
  enabled: boolean;
}

export interface SlotRequest {
  sessionId: string;
  workflowId: string;
  /** One slot per disk to copy. */
  slots: number;
  /** The proxies this session may use ('auto': any). */
  proxies: string[] | 'auto';
  /** The configured proxies, as the requester read them from the configuration. */
  declared: ProxyDeclaration[];
}

export interface SlotLease {
  proxy: string;
  taskQueue: string;
}

export interface ProxyRegistryView {
  /** Slots and enabled as the newest request declared them (the configuration owns them); online and leases are the registry's. */
  proxies: { name: string; slots: number; enabled: boolean; online: boolean; leasedTo: string[] }[];
  waiting: { sessionId: string; slots: number }[];
  /** The newest setProxyOnline the registry refused, and why (a signal cannot answer its sender); kept across continue-as-new. */
  lastRejection: { at: string; reason: string } | null;
}

/** One slot held by a session; the workflow id lets the registry see whether its holder still runs. */
export interface HeldSlot {
  sessionId: string;
  workflowId: string;
}

export interface ProxyRegistryInput {
  carried?: {
    proxies: Record<string, { online: boolean; leases: HeldSlot[]; declared: ProxyDeclaration | null }>;
    queue: SlotRequest[];
    /** Absent when an older release continued the registry as new. */
    lastRejection?: ProxyRegistryView['lastRejection'];
  };
}

export const proxySignals = {
  requestSlots: defineSignal<[SlotRequest]>('requestSlots'),
  releaseSlots: defineSignal<[{ sessionId: string }]>('releaseSlots'),
  /** Takes a proxy offline (no new leases; current ones finish) or back online. */
  setProxyOnline: defineSignal<[SetProxyOnline]>('setProxyOnline'),
};

/** What an operator sends to take a proxy offline or back online (also from the Temporal CLI, unchecked). */
export const setProxyOnlineSchema = z
  .strictObject(
    {
      proxy: z
        .string({ error: 'must be a proxy name' })
        .regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/, { error: 'must be a proxy name' }),
      online: z.boolean({ error: 'must be true or false' }),
      requestedBy: requiredText(128),
      reason: requiredText().optional(),
      ...signatureFields,
    },
    { error: 'must be a JSON object like {"proxy":"proxy01","online":false,"requestedBy":"alice"}' },
  )
  .superRefine(signatureComplete);
export type SetProxyOnline = z.output<typeof setProxyOnlineSchema>;

export const proxyQueries = {
  slots: defineQuery<ProxyRegistryView>('slots'),
};

/** Sent to a waiting session when its slots are leased. */
export const slotsGrantedSignal = defineSignal<[{ leases: SlotLease[] }]>('slotsGranted');
