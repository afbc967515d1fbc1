// Runs the host process of one KVM host, beside its libvirtd, serving the host API over mutual TLS:
//   npm run kvm-host -- --name kvm01 --site primary --role production --state /var/lib/planned-failover --port 7400 \
//     --tls-cert /etc/planned-failover/kvm01.crt --tls-key /etc/planned-failover/kvm01.key --client-ca /etc/planned-failover/ca.crt
import { isAbsolute, resolve } from 'node:path';
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
import { DEFAULT_BOOT_FILE_DIRS } from './definition';
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
    domains: z.string().min(1).optional(),
    uploadStallSeconds: z.coerce.number().int().min(1).max(3600),
    commitBandwidthMibps: z.coerce.number().int().min(1).optional(),
    bootFiles: z.array(z.string().refine(isAbsolute, 'each directory must be an absolute path')).min(1),
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
    .option('--listen <address>', 'address to listen on', '127.0.0.1')
    .option(
      '--domains <file>',
      'the libvirt domains the agent may act on as source VMs, one name a line (read again when it changes); ' +
        'without it, none (a DR host acts on its own replicas only)',
    )
    .option('--upload-stall-seconds <seconds>', 'an upload that sends nothing for this long is cut off', '60')
    .option(
      '--commit-bandwidth-mibps <MiB/s>',
      "a permanent failover's live commit into a running replica's base at most this fast (spares the guest's I/O)",
    )
    .option(
      '--boot-files <dir>',
      `a directory that firmware, kernels and initrds named by domain definitions may come from; repeatable or a comma list (default ${DEFAULT_BOOT_FILE_DIRS.join(',')})`,
      (value: string, dirs: string[] | undefined) => [...(dirs ?? []), ...value.split(',')],
    );
  const raw = withTransportOptions(command, 'this host (--name)').parse().opts();
  const o = parseFlags(flags, { ...raw, bootFiles: (raw.bootFiles as string[] | undefined) ?? DEFAULT_BOOT_FILE_DIRS });
  const host = await startKvmHost({
    name: o.name,
    site: o.site,
    role: o.role,
    libvirtUri: o.libvirt,
    stateDir: o.state,
    ...(o.domains ? { domainsFile: resolve(o.domains) } : {}),
    uploadStallMs: o.uploadStallSeconds * 1000,
    ...(o.commitBandwidthMibps ? { commitBandwidthMiBps: o.commitBandwidthMibps } : {}),
    bootFileDirs: o.bootFiles,
    port: o.port,
    listen: o.listen,
    ...transportOf(o),
    log: (m) => console.log(`[kvm-host ${o.name}] ${m}`),
  });
  console.log(
    `[kvm-host ${o.name}] listening on ${host.url} (libvirt ${o.libvirt}, state ${o.state}, boot files from ${o.bootFiles.join(', ')})`,
  );
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
