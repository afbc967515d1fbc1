// The lab estate file: sites, hosts, VMs, disks and guest behaviour. Validated with zod; every
// error names its path in the file.

import { readFile } from 'node:fs/promises';
import { parse } from 'yaml';
import { z } from 'zod';
import { BLOCK_SIZE } from '../src/hypervisor/port';
import type { GuestProfile } from './guest';

const UNITS: Record<string, number> = { B: 1, KiB: 1024, MiB: 1024 ** 2, GiB: 1024 ** 3, TiB: 1024 ** 4 };

const size = z
  .union([z.number().int().positive(), z.string().regex(/^\d+(\.\d+)?\s*(B|KiB|MiB|GiB|TiB)$/, 'size like "256MiB"')])
  .transform((v) => {
    if (typeof v === 'number') return v;
    const m = /^(\d+(?:\.\d+)?)\s*(\w+)$/.exec(v)!;
    return Math.round(Number(m[1]) * UNITS[m[2]!]!);
  })
  .refine(
    (v) => v % BLOCK_SIZE === 0 && v >= 2 * BLOCK_SIZE,
    `must be a multiple of ${BLOCK_SIZE} bytes, at least two blocks`,
  );

const rate = z
  .union([
    z.number().nonnegative(),
    z.string().regex(/^\d+(\.\d+)?\s*(blocks\/s|MiB\/s)$/, 'rate like "20 blocks/s" or "1.5 MiB/s"'),
  ])
  .transform((v) => {
    if (typeof v === 'number') return v;
    const n = Number(/^[\d.]+/.exec(v)![0]);
    return v.endsWith('MiB/s') ? (n * 1024 * 1024) / BLOCK_SIZE : n;
  });

const name = z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/, 'letters, digits, ".", "_" or "-"');

const disk = z.strictObject({ id: name, size });

const vm = z.strictObject({
  name,
  disks: z.array(disk).min(1),
  power: z.enum(['Running', 'Off']).default('Running'),
  writeRate: rate.default(10),
  hotSetFraction: z.number().gt(0).max(1).default(0.1),
  hotWriteShare: z.number().min(0).max(1).default(0.8),
  shutdownMs: z.number().int().nonnegative().default(2000),
  bootMs: z.number().int().nonnegative().default(2000),
});

const host = z.strictObject({ name, vms: z.array(vm).default([]) });

const site = z.strictObject({ name, role: z.enum(['production', 'dr']), hosts: z.array(host).min(1) });

export const estateSchema = z.strictObject({ sites: z.array(site).min(1) }).superRefine((estate, ctx) => {
  const hosts = new Set<string>();
  const vms = new Set<string>();
  estate.sites.forEach((s, si) =>
    s.hosts.forEach((h, hi) => {
      if (hosts.has(h.name))
        ctx.addIssue({
          code: 'custom',
          path: ['sites', si, 'hosts', hi, 'name'],
          message: `duplicate host "${h.name}"`,
        });
      hosts.add(h.name);
      h.vms.forEach((v, vi) => {
        const at = ['sites', si, 'hosts', hi, 'vms', vi];
        if (s.role !== 'production')
          ctx.addIssue({ code: 'custom', path: at, message: 'VMs are declared on production hosts only' });
        if (vms.has(v.name))
          ctx.addIssue({ code: 'custom', path: [...at, 'name'], message: `duplicate VM "${v.name}"` });
        vms.add(v.name);
        const ids = new Set<string>();
        v.disks.forEach((d, di) => {
          if (ids.has(d.id))
            ctx.addIssue({ code: 'custom', path: [...at, 'disks', di, 'id'], message: `duplicate disk "${d.id}"` });
          ids.add(d.id);
        });
      });
    }),
  );
});

export type Estate = z.output<typeof estateSchema>;
export type EstateInput = z.input<typeof estateSchema>;
export type EstateVm = z.output<typeof vm>;

export function guestProfile(v: EstateVm): GuestProfile {
  return { blocksPerSecond: v.writeRate, hotSetFraction: v.hotSetFraction, hotWriteShare: v.hotWriteShare };
}

export class EstateError extends Error {}

export function parseEstate(input: unknown, source = 'estate'): Estate {
  const result = estateSchema.safeParse(input);
  if (result.success) return result.data;
  const lines = result.error.issues.map((i) => `  ${i.path.length ? i.path.join('.') : '(root)'}: ${i.message}`);
  throw new EstateError(`${source} is invalid:\n${lines.join('\n')}`);
}

export async function loadEstate(path: string): Promise<Estate> {
  return parseEstate(parse(await readFile(path, 'utf8')), path);
}

/** The names the lab's host certificate carries: every host it plays, and `lab` for the calls about no one host. */
export function labServerNames(estate: EstateInput): string[] {
  return [...estate.sites.flatMap((s) => s.hosts.map((h) => h.name)), 'lab'];
}
