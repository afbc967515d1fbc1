// What every host API server checks before it changes anything: identifiers, extents, pages, views, restore-point
// specs. The lab and the KVM host process share these, so a bad request gets the same answer from either.

import { z } from 'zod';
import { BLOCK_SIZE } from '../hypervisor/port';
import { badRequest } from './errors';

// Identifiers end up in file names and domain names: keep them to a safe alphabet.
export const id = z
  .string()
  .regex(/^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$/, 'letters, digits, ".", "_", ":" or "-" (max 128)');
export const diskInfo = z.strictObject({
  id,
  sizeBytes: z.number().int().positive().multipleOf(BLOCK_SIZE),
});

/** A VM's definition as its replica receives it (a libvirt domain's XML is a few KiB). */
export const vmDefinition = z.strictObject({
  format: z.literal('libvirt-domain-xml'),
  text: z
    .string()
    .min(1)
    .max(256 * 1024),
});

export const replicaSpec = z.strictObject({
  sourceVm: id,
  disks: z.array(diskInfo).min(1).max(16),
  definition: vmDefinition.optional(),
});
export const vmSpec = z.strictObject({
  disks: z.array(diskInfo).min(1).max(16),
  definition: vmDefinition.optional(),
});
export const extent = z.strictObject({
  offset: z.number().int().nonnegative().multipleOf(BLOCK_SIZE),
  length: z.number().int().positive().multipleOf(BLOCK_SIZE),
});
export const extents = z.array(extent).max(100_000);
export const page = z.strictObject({
  cursor: z.string().regex(/^\d+$/, 'a cursor returned by a previous page').optional(),
  limit: z.coerce.number().int().min(1).max(100_000).default(4096),
});
export const pointMetadata = z.record(z.string().max(128), z.string().max(4096));
export const pointSpec = z.strictObject({
  kind: z.string().min(1).max(64),
  crashConsistent: z.boolean(),
  metadata: pointMetadata.optional(),
});
/** An opaque write-fence token (an orchestrator's session or attempt id). */
export const fenceToken = z.string().regex(/^[\x21-\x7e]{1,256}$/, 'printable ASCII without spaces (max 256)');
export const view = z.union([z.strictObject({ pointId: id }), z.strictObject({ running: z.literal(true) })]);
export const viewQuery = z
  .strictObject({ pointId: id.optional(), running: z.enum(['true']).optional() })
  .refine(
    (v) => (v.pointId === undefined) !== (v.running === undefined),
    'give exactly one of pointId or running=true',
  );
export const blockRange = {
  startBlock: z.coerce.number().int().nonnegative(),
  count: z.coerce.number().int().min(1).max(16_384),
};
export const powerAction = z.discriminatedUnion('action', [
  z.strictObject({ action: z.literal('shutdown'), timeoutMs: z.number().int().min(0).max(3_600_000) }),
  z.strictObject({ action: z.literal('off') }),
  // sourceOff: the VM's source is off, so a replica may take its network identity (MAC addresses).
  z.strictObject({ action: z.literal('on'), sourceOff: z.boolean().optional() }),
]);

/** Path parameters of the host API's routes. */
export const params = {
  host: z.strictObject({ host: id }),
  vm: z.strictObject({ host: id, vm: id }),
  disk: z.strictObject({ host: id, vm: id, disk: id }),
  checkpoint: z.strictObject({ host: id, vm: id, checkpointId: id }),
  reference: z.strictObject({ host: id, vm: id, referencePointId: id }),
  replica: z.strictObject({ host: id, replica: id }),
  replicaDisk: z.strictObject({ host: id, replica: id, disk: id }),
  point: z.strictObject({ host: id, replica: id, pointId: id }),
  pointDisk: z.strictObject({ host: id, replica: id, pointId: id, disk: id }),
};

/** Parses one part of a request (`where`: params, query or body); a failure names the field, as a 400. */
export function parse<S extends z.ZodType>(schema: S, value: unknown, where: string): z.output<S> {
  const r = schema.safeParse(value ?? {});
  if (r.success) return r.data;
  const issue = r.error.issues[0]!;
  const field = [where, ...issue.path.map(String)].join('.');
  throw badRequest(field, issue.message);
}

export function checkExtents(list: { offset: number; length: number }[], sizeBytes: number, field: string): void {
  list.forEach((e, i) => {
    if (e.offset + e.length > sizeBytes)
      throw badRequest(`${field}.${i}`, `extent ends past the disk size ${sizeBytes}`);
  });
}

export function checkBlockRange(q: { startBlock: number; count: number }, sizeBytes: number): void {
  if (q.startBlock + q.count > sizeBytes / BLOCK_SIZE) throw badRequest('query.count', 'range ends past the disk');
}

/**
 * The answer (202) to a long host operation (merging a replica's oldest point, consolidating it) still running after
 * a short wait: the caller asks again with the same request, which follows the operation.
 */
export interface HostJobRunning {
  job: { operation: string; runningForMs: number };
}
