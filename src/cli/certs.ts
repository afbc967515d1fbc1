// `failover certs create`: the certificates of a site's host API (mutual TLS), made in a site directory; what it made
// or kept is printed with paths and fingerprints, never key material.
import { z } from 'zod';
import {
  ensureCa,
  ensureClientCertificate,
  ensureHostCertificate,
  IDENTITY_NAME,
  isSubjectAltName,
  type SiteCertificate,
} from '../host-api/certificates';
import { formatTable } from './format';

const identity = z.string().regex(IDENTITY_NAME, {
  error: "must be a name of letters, digits, '.', '_' or '-' (at most 64)",
});
const extraName = z.string().refine(isSubjectAltName, { error: 'must be a DNS name or an IP address' });

/** `--host-names kvm01=kvm01.example.com,10.0.0.5` (repeatable): extra subjectAltName entries of a host's certificate. */
const hostNames = z
  .string()
  .regex(/^[^=]+=.+$/, { error: 'must be <host>=<name>[,<name>...]' })
  .transform((v) => {
    const [host, names] = [v.slice(0, v.indexOf('=')), v.slice(v.indexOf('=') + 1)];
    return { host, names: names.split(',').filter(Boolean) };
  })
  .pipe(z.strictObject({ host: identity, names: z.array(extraName).min(1) }));

export const certsCreateSchema = z
  .strictObject({
    '--dir': z.string({ error: 'is required' }).min(1, { error: 'must name a directory' }),
    '--hosts': z.array(identity).default([]),
    '--clients': z.array(identity).default([]),
    '--host-names': z.array(hostNames).default([]),
    '--days': z.coerce
      .number({ error: 'must be a number of days' })
      .int({ error: 'must be a whole number of days' })
      .min(1, { error: 'must be at least 1' })
      .max(3650, { error: 'must be at most 3650' })
      .optional(),
    '--reissue': z.boolean().default(false),
    '--new-ca': z.boolean().default(false),
  })
  .superRefine((o, ctx) => {
    o['--host-names'].forEach((h, i) => {
      if (!o['--hosts'].includes(h.host))
        ctx.addIssue({ code: 'custom', path: ['--host-names', i], message: `'${h.host}' is not one of --hosts` });
    });
    const both = o['--hosts'].filter((h) => o['--clients'].includes(h));
    if (both.length > 0)
      ctx.addIssue({
        code: 'custom',
        path: ['--clients'],
        message: `${both.join(', ')} is also a host: one file each`,
      });
  });

export type CertsCreate = z.output<typeof certsCreateSchema>;

/** Makes the site's CA if missing (or `--new-ca`) and every named certificate missing or not valid for its names. */
export async function createCertificates(o: CertsCreate): Promise<SiteCertificate[]> {
  const dir = o['--dir'];
  const issue = { reissue: o['--reissue'] || o['--new-ca'], ...(o['--days'] ? { validityDays: o['--days'] } : {}) };
  const made = [await ensureCa(dir, { reissue: o['--new-ca'] })];
  for (const host of o['--hosts']) {
    const extra = o['--host-names'].filter((h) => h.host === host).flatMap((h) => h.names);
    made.push(await ensureHostCertificate(dir, host, [host, ...extra], issue));
  }
  for (const client of o['--clients']) made.push(await ensureClientCertificate(dir, client, issue));
  return made;
}

/** What `certs create` prints: a table of the certificates, then where each one goes. */
export function certificatesReport(dir: string, certificates: SiteCertificate[]): string {
  const table = formatTable(
    ['', 'kind', 'name', 'certificate', 'key (0600)', 'valid until', 'names', 'SHA-256 fingerprint'],
    certificates.map((c) => [
      c.made ? 'made' : 'kept',
      c.kind,
      c.name,
      c.cert,
      c.key,
      c.notAfter.toISOString().slice(0, 10),
      c.names.join(',') || '-',
      c.fingerprint,
    ]),
  );
  const hosts = certificates.filter((c) => c.kind === 'host').map((c) => c.name);
  const clients = certificates.filter((c) => c.kind === 'client').map((c) => c.name);
  return [
    table,
    '',
    `Keep ${dir}/ca.key here, offline if you can: it signs the site's certificates.`,
    ...hosts.map(
      (h) =>
        `Host ${h}: copy ca.crt, ${h}.crt and ${h}.key (mode 0600) to it; start its host process with ` +
        `--tls-cert ${h}.crt --tls-key ${h}.key --client-ca ca.crt.`,
    ),
    ...clients.map(
      (c) => `Client ${c}: its configuration's tls block names ca: ca.crt, cert: ${c}.crt, key: ${c}.key (mode 0600).`,
    ),
  ].join('\n');
}
