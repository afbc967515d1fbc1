// Shared setup for lab tests: a small estate on a temp directory, an in-process lab on a free
// port, the port adapter and the lab control client.

import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startLab, type RunningLab } from '../../lab/server';
import type { EstateInput } from '../../lab/estate';

type EstateVmInput = NonNullable<EstateInput['sites'][number]['hosts'][number]['vms']>[number];
import type { HostApiHypervisor, LabControl } from '../../src/hypervisor/host-api-adapter';
import { BLOCK_SIZE, type ExtentData, type ExtentPage, type PageRequest } from '../../src/hypervisor/port';
import { labControl, labPort, labServerTls } from '../tls';

export const MiB = 1024 * 1024;
export const PROD = 'prod-a';
export const DR = 'dr-a';

export function smallEstate(
  vmOverrides: Record<string, unknown> = {},
  extraVms: Record<string, unknown>[] = [],
): EstateInput {
  return {
    sites: [
      {
        name: 'production',
        role: 'production',
        hosts: [
          {
            name: PROD,
            vms: [
              {
                name: 'vm1',
                disks: [
                  { id: 'os', size: '4MiB' },
                  { id: 'data', size: '2MiB' },
                ],
                writeRate: 0,
                shutdownMs: 100,
                bootMs: 100,
                ...vmOverrides,
              },
              ...extraVms.map(
                (v) =>
                  ({
                    disks: [{ id: 'os', size: '2MiB' }],
                    writeRate: 0,
                    shutdownMs: 100,
                    bootMs: 100,
                    ...v,
                  }) as EstateVmInput,
              ),
            ],
          },
        ],
      },
      { name: 'dr', role: 'dr', hosts: [{ name: DR }] },
    ],
  };
}

export interface TestLab {
  lab: RunningLab;
  port: HostApiHypervisor;
  control: LabControl;
  dataDir: string;
  /** Restarts the lab on the same data directory (after stop or kill). */
  restart(): Promise<void>;
  close(): Promise<void>;
}

export async function startTestLab(estate: EstateInput = smallEstate(), dataDir?: string): Promise<TestLab> {
  const dir = dataDir ?? (await mkdtemp(join(tmpdir(), 'lab-test-')));
  const tls = await labServerTls(estate);
  const t: TestLab = {
    lab: await startLab({ estate, dataDir: dir, port: 0, tls }),
    port: undefined as unknown as HostApiHypervisor,
    control: undefined as unknown as LabControl,
    dataDir: dir,
    async restart() {
      this.port.close();
      this.control.close();
      this.lab = await startLab({ estate, dataDir: dir, port: 0, tls });
      this.port = labPort(this.lab.url);
      this.control = labControl(this.lab.url);
    },
    async close() {
      this.port.close();
      this.control.close();
      await this.lab.stop();
      await rm(dir, { recursive: true, force: true });
    },
  };
  t.port = labPort(t.lab.url);
  t.control = labControl(t.lab.url);
  return t;
}

export async function collect(stream: AsyncIterable<ExtentData>): Promise<ExtentData[]> {
  const out: ExtentData[] = [];
  for await (const e of stream) out.push(e);
  return out;
}

/** Places streamed extents into a buffer the size of the disk (zeros elsewhere). */
export async function assemble(stream: AsyncIterable<ExtentData>, sizeBytes: number): Promise<Buffer> {
  const buf = Buffer.alloc(sizeBytes);
  for await (const { offset, data } of stream) data.copy(buf, offset);
  return buf;
}

export async function allPages(
  fetch: (page: PageRequest) => Promise<ExtentPage>,
  limit = 3,
): Promise<ExtentPage['extents']> {
  const out: ExtentPage['extents'] = [];
  let cursor: string | undefined;
  do {
    const page = await fetch({ cursor, limit });
    out.push(...page.extents);
    cursor = page.nextCursor;
  } while (cursor !== undefined);
  return out;
}

export function extentBlocks(extents: { offset: number; length: number }[]): number[] {
  const out: number[] = [];
  for (const e of extents) for (let b = e.offset / BLOCK_SIZE; b < (e.offset + e.length) / BLOCK_SIZE; b++) out.push(b);
  return out;
}

export function blocksDiffering(a: Buffer, b: Buffer): number[] {
  const out: number[] = [];
  for (let i = 0; i < a.length / BLOCK_SIZE; i++) {
    const s = i * BLOCK_SIZE;
    if (!a.subarray(s, s + BLOCK_SIZE).equals(b.subarray(s, s + BLOCK_SIZE))) out.push(i);
  }
  return out;
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Waits until `condition` holds, checking every 10 ms; fails after `timeoutMs`. */
export async function until(condition: () => Promise<boolean>, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await sleep(10);
  }
}

/** Yields one block-sized piece per `pauseMs`, like a slow (or stalled) copier; counts what it handed out. */
export function slowBlocks(
  firstBlock: number,
  contents: Buffer[],
  pauseMs: number,
): { stream: AsyncGenerator<ExtentData>; yielded: () => number } {
  let yielded = 0;
  async function* stream(): AsyncGenerator<ExtentData> {
    for (const [i, data] of contents.entries()) {
      yield { offset: (firstBlock + i) * BLOCK_SIZE, data };
      yielded++;
      await sleep(pauseMs);
    }
  }
  return { stream: stream(), yielded: () => yielded };
}

export async function* single(offset: number, data: Buffer): AsyncGenerator<ExtentData> {
  yield await Promise.resolve({ offset, data });
}

export function randomBlocks(count: number, maxBlock: number): number[] {
  return Array.from({ length: count }, () => Math.floor(Math.random() * maxBlock));
}

/** One production host running `vms`, each with the same disks and guest, and one empty DR host. */
export function estateOf(
  vms: readonly string[],
  disks: readonly { id: string; size: number }[],
  guest: Omit<EstateVmInput, 'name' | 'disks'>,
): EstateInput {
  return {
    sites: [
      {
        name: 'production',
        role: 'production',
        hosts: [{ name: PROD, vms: vms.map((name) => ({ name, disks: disks.map((d) => ({ ...d })), ...guest })) }],
      },
      { name: 'dr', role: 'dr', hosts: [{ name: DR }] },
    ],
  };
}
