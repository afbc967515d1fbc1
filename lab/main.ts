// Starts the lab site as a process, serving the host API over mutual TLS:
//   npm run lab -- --estate config/estate.yaml --data .data/lab --port 7300 [--tls-cert f --tls-key f --client-ca f]
// Without TLS files it uses the demo's site (.data/certs), making what is missing there: its CA, the lab's host
// certificate and the workers' client certificate, which config/planned-failover.yaml names.

import { Command } from 'commander';
import { z } from 'zod';
import { DEMO_CLIENT, DEMO_SITE_DIR, ensureSite, serverTlsFiles } from '../src/host-api/certificates';
import {
  checkTransportFlags,
  parseFlags,
  transportFlags,
  transportOf,
  withTransportOptions,
} from '../src/host-api/server-flags';
import { checkCrashStep } from './crash';
import { labServerNames, loadEstate } from './estate';
import { startLab } from './server';

const flags = z
  .strictObject({
    estate: z.string().min(1),
    data: z.string().min(1),
    port: z.coerce.number().int().min(0).max(65535),
    host: z.string().min(1),
    ...transportFlags,
  })
  .superRefine(checkTransportFlags);

async function main(): Promise<void> {
  checkCrashStep();
  const command = new Command()
    .name('lab')
    .description('The lab site: simulated production and DR Hyper-V hosts, their host API over mutual TLS')
    .option('--estate <file>', 'estate YAML file', 'config/estate.yaml')
    .option('--data <dir>', 'data directory (disks and metadata)', '.data/lab')
    .option('--port <port>', 'TCP port (0 picks a free one)', '7300')
    .option('--host <address>', 'address to listen on', '127.0.0.1');
  const o = parseFlags(flags, withTransportOptions(command, "every host of the estate and 'lab'").parse().opts());
  const log = (m: string): void => console.log(`[lab] ${m}`);
  const estate = await loadEstate(o.estate);
  let transport = transportOf(o);
  if (!transport) {
    const site = await ensureSite(DEMO_SITE_DIR, { lab: labServerNames(estate) }, [DEMO_CLIENT]);
    for (const c of site.filter((c) => c.made))
      log(`made the demo site's ${c.kind} certificate ${c.cert} (${c.fingerprint})`);
    transport = { tls: serverTlsFiles(DEMO_SITE_DIR, 'lab') };
  }
  const lab = await startLab({
    estatePath: o.estate,
    dataDir: o.data,
    port: o.port,
    host: o.host,
    ...transport,
    log,
  });
  console.log(`[lab] listening on ${lab.url} (estate ${o.estate}, data ${o.data})`);
  let stopping = false;
  const stop = (signal: string): void => {
    if (stopping) return;
    stopping = true;
    console.log(`[lab] ${signal}: stopping cleanly`);
    lab.stop().then(
      () => process.exit(0),
      (e: unknown) => {
        console.error('[lab] clean stop failed', e);
        process.exit(1);
      },
    );
  };
  process.on('SIGINT', () => stop('SIGINT'));
  process.on('SIGTERM', () => stop('SIGTERM'));
}

main().catch((e: unknown) => {
  console.error(e instanceof Error ? e.message : e);
  process.exit(1);
});
