// The flags every host API server's command takes for its transport (npm run kvm-host, npm run lab): the TLS files,
// or plain HTTP for development.
import type { Command } from 'commander';
import { z } from 'zod';
import type { HostApiTransportSecurity } from './server';

const file = z.string().min(1, { error: 'must name a file' });

/** The zod shape of the transport flags, to spread into a command's own flag schema. */
export const transportFlags = {
  tlsCert: file.optional(),
  tlsKey: file.optional(),
  clientCa: file.optional(),
  insecureHttp: z.boolean().default(false),
};

type TransportFlags = z.output<z.ZodObject<typeof transportFlags>>;

/** Adds the transport flags to a command; `certificate` says what its certificate must name. */
export function withTransportOptions(command: Command, certificate: string): Command {
  return command
    .option('--tls-cert <file>', `its certificate (failover certs create), naming ${certificate}`)
    .option('--tls-key <file>', 'its private key (mode 0600 or stricter)')
    .option('--client-ca <file>', "the site's CA certificate: only client certificates it issued are served")
    .option('--insecure-http', 'plain HTTP without TLS, for development, on a loopback address only');
}

/** Problems of the transport flags as given: the three files go together, and not with plain HTTP. */
export function checkTransportFlags(o: TransportFlags, ctx: z.RefinementCtx): void {
  const given = [o.tlsCert, o.tlsKey, o.clientCa].filter((f) => f !== undefined).length;
  if (given !== 0 && given !== 3)
    ctx.addIssue({ code: 'custom', path: ['tlsCert'], message: 'give --tls-cert, --tls-key and --client-ca together' });
  if (given !== 0 && o.insecureHttp)
    ctx.addIssue({ code: 'custom', path: ['insecureHttp'], message: 'plain HTTP goes with no TLS files' });
}

/** The transport the flags ask for; undefined when they name none (no TLS files, no --insecure-http). */
export function transportOf(o: TransportFlags): HostApiTransportSecurity | undefined {
  if (o.insecureHttp) return { insecureHttp: true };
  if (o.tlsCert && o.tlsKey && o.clientCa) return { tls: { cert: o.tlsCert, key: o.tlsKey, clientCa: o.clientCa } };
  return undefined;
}

/** Checks a command's flags with its schema; a problem is reported by the flag's name (tlsCert → --tls-cert). */
export function parseFlags<S extends z.ZodType>(schema: S, raw: unknown): z.output<S> {
  const parsed = schema.safeParse(raw);
  if (parsed.success) return parsed.data;
  const issue = parsed.error.issues[0]!;
  const flag = `--${issue.path.join('.').replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`;
  throw new Error(`${flag}: ${issue.message}`);
}
