// The hosts a chaos run plays on, behind one interface: the lab (test/chaos/lab-hosts.ts) or two KVM hosts with real
// guests (test/chaos/kvm-hosts.ts). Each brings the faults only it can suffer, what an operator does about them, and
// the invariants only it can check; the rounds, the suite's own faults and the common invariants are the same.
import type { ReplicaView } from '../../src/contract';
import type { HypervisorPort } from '../../src/hypervisor/port';
import type { ClosablePort } from '../../src/hypervisor/routed';
import type { ChaosEstate } from './estate';
import type { Checks, Ledger } from './invariants';
import type { Chance } from './random';
import type { Upstream } from './recorder';

/** Faults of the suite's own parts: workers, the Temporal server, workflows, the proxy registry. */
export const SUITE_FAULTS = [
  'workflowWorkerKill',
  'proxyWorkerKill',
  'serverRestart',
  'terminate',
  'reset',
  'proxyOffline',
] as const;
/** The lab's: the lab process, and faults it injects into its own answers. */
export const LAB_FAULTS = ['labKill', 'hostUnreachable', 'hostFail', 'hostSlow', 'transferCut'] as const;
/** What only real hosts suffer. */
export const KVM_FAULTS = [
  'agentKill',
  'storageDaemonKill',
  'sourceQemuKill',
  'libvirtdRestart',
  'drDiskFull',
  'networkCut',
  'networkStall',
  'drPowerCut',
] as const;
/** Forced by the server's low continue-as-new suggestion and counted from the histories, not injected. */
export const COUNTED_FAULTS = ['continueAsNew'] as const;
export const FAULT_KINDS = [...SUITE_FAULTS, ...LAB_FAULTS, ...KVM_FAULTS, ...COUNTED_FAULTS] as const;
export type FaultKind = (typeof FAULT_KINDS)[number];
export type HostFaultKind = (typeof LAB_FAULTS)[number] | (typeof KVM_FAULTS)[number];

/** What a host fault needs of its round. */
export interface FaultContext {
  chance: Chance;
  /** How long a part a fault kills stays down (drawn for every fault, first). */
  downMs: number;
  note: (line: string) => void;
  /** A planned failover session between its source's power-off and its replica's power-on, if one comes soon. */
  sessionInWindow: (ms: number) => Promise<string | undefined>;
  /** Something the fault does later (its end): the round waits for it before it heals. */
  later: (step: Promise<unknown>) => void;
}

/** What the hypervisor's invariants get once the round settled. */
export interface HostCheckContext {
  checks: Checks;
  /** When the round began. */
  since: Date;
  /** What the suite remembers across rounds (points already compared with their checkpoints, ...). */
  ledger: Ledger;
  /** The entities' views now. */
  views: Map<string, ReplicaView>;
  /** The entities' views once the round settled, before the closing job run became their last run. */
  settledViews: Map<string, ReplicaView>;
}

export interface ChaosHosts {
  readonly estate: ChaosEstate;
  /** Every kind of fault injected in this run, in the order the rarest are picked from. */
  readonly faultKinds: readonly FaultKind[];
  /** The rounds' pace: faults land in the first `faultWindowMs`, the round runs `runForMs` before it heals. */
  readonly timing: { faultWindowMs: number; runForMs: number };
  /** The hosts past the recorder and any fault in between: what the suite reads and checks them with. */
  readonly direct: ClosablePort;
  start(): Promise<void>;
  /** Where the recorder forwards each host's calls, and the certificate it serves them with in the host's place. */
  upstreams(): Promise<Record<string, Upstream>>;
  /** The URL the workers' configuration names for each host, given the recorder's URL for it. */
  workerUrls(recorderUrls: Record<string, string>): Promise<Record<string, string>>;
  /** The production VM's disks now, as a digest (the VM is off). */
  sourceImage(vm: string): Promise<string>;
  /** A power-on the host answered (through the recorder). */
  poweredOn(host: string, vm: string): void;
  /** A replica's running data replaced by a point (reverted to one, or its running layer discarded). */
  runningReplaced(host: string, replica: string): void;
  /** Injects a fault of one of its kinds; false when there was nothing to hit. */
  inject(kind: HostFaultKind, ctx: FaultContext): Promise<boolean>;
  /** Every fault cleared and every part that should run running; returns the parts started again. */
  heal(note: (line: string) => void): Promise<string[]>;
  /**
   * Once the round's workflows settled: what an operator does after this round's host faults, through `operator`
   * (the recorder, like the workers' calls).
   */
  afterSettle(views: Map<string, ReplicaView>, operator: HypervisorPort, note: (line: string) => void): Promise<void>;
  /** The invariants only these hosts can check (before the common ones: it may ask for points to be compared again). */
  check(ctx: HostCheckContext): Promise<void>;
  /** What a failing round leaves for its diagnosis, written into `dir`: the hosts' logs, the guests' consoles. */
  evidence(dir: string): Promise<void>;
  close(): Promise<void>;
}
