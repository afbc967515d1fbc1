// Runs the host process of one KVM host, beside its libvirtd, serving the host API over mutual TLS:
//   npm run kvm-host -- --name kvm01 --site primary --role production --state /var/lib/planned-failover --port 7400 \
//     --tls-cert /etc/planned-failover/kvm01.crt --tls-key /etc/planned-failover/kvm01.key --client-ca /etc/planned-failover/ca.crt
import { Command } from 'commander';
import { z } from 'zod';
import { id } from '../src/host-api/schemas';
import {
  checkTransportFlags,
  parseFlags,
  transportFlags,
  transportOf,
  withTransportOptions,
} from '../src/host-api/server-flags';
import { startKvmHost } from './server';

const flags = z
  .strictObject({
    name: id,
    site: id,
    role: z.enum(['production', 'dr'], { error: "must be 'production' or 'dr'" }),
    libvirt: z.string().min(1),
    state: z.string().min(1),
    port: z.coerce.number().int().min(0).max(65535),
    listen: z.string().min(1),
    ...transportFlags,
  })
  .superRefine((o, ctx) => {
    checkTransportFlags(o, ctx);
    if (!transportOf(o))
      ctx.addIssue({
        code: 'custom',
        path: ['tlsCert'],
        message: 'is required with --tls-key and --client-ca (or --insecure-http on a loopback --listen)',
      });
  });

async function main(): Promise<void> {
  const command = new Command()
    .name('kvm-host')
    .description('The host API of one KVM host, over its local libvirt (checkpoints, pull backups over NBD, power)')
    .requiredOption('--name <name>', "this host's name in the estate configuration")
    .requiredOption('--site <site>', 'the site the host belongs to')
    .requiredOption('--role <role>', 'production or dr')
    .option('--libvirt <uri>', "libvirt's connection URI on this host", 'qemu:///system')
    .option('--state <dir>', 'where the host process keeps its state, sockets and scratch files', '.data/kvm-host')
    .option('--port <port>', 'TCP port (0 picks a free one)', '7400')
    .option('--listen <address>', 'address to listen on', '127.0.0.1');
  const o = parseFlags(flags, withTransportOptions(command, 'this host (--name)').parse().opts());
  const host = await startKvmHost({
    name: o.name,
    site: o.site,
    role: o.role,
    libvirtUri: o.libvirt,
    stateDir: o.state,
    port: o.port,
    listen: o.listen,
    ...transportOf(o),
    log: (m) => console.log(`[kvm-host ${o.name}] ${m}`),
  });
  console.log(`[kvm-host ${o.name}] listening on ${host.url} (libvirt ${o.libvirt}, state ${o.state})`);
  const stop = (signal: string): void => {
    console.log(`[kvm-host ${o.name}] ${signal}: stopping`);
    host.stop().then(
      () => process.exit(0),
      (e: unknown) => {
        console.error(e);
        process.exit(1);
      },
    );
  };
  process.once('SIGINT', () => stop('SIGINT'));
  process.once('SIGTERM', () => stop('SIGTERM'));
}

main().catch((e: unknown) => {
  console.error(e instanceof Error ? e.message : e);
  process.exit(2);
});
