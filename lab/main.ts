// Starts the lab site as a process: npm run lab -- --estate config/estate.yaml --data .data/lab --port 7300

import { Command } from 'commander';
import { checkCrashStep } from './crash';
import { startLab } from './server';

async function main(): Promise<void> {
  checkCrashStep();
  const opts = new Command()
    .name('lab')
    .description('The lab site: simulated production and DR Hyper-V hosts over HTTP')
    .option('--estate <file>', 'estate YAML file', 'config/estate.yaml')
    .option('--data <dir>', 'data directory (disks and metadata)', '.data/lab')
    .option('--port <port>', 'TCP port on 127.0.0.1 (0 picks a free one)', '7300')
    .parse()
    .opts<{ estate: string; data: string; port: string }>();
  const lab = await startLab({
    estatePath: opts.estate,
    dataDir: opts.data,
    port: Number(opts.port),
    log: (m) => console.log(`[lab] ${m}`),
  });
  console.log(`[lab] listening on ${lab.url} (estate ${opts.estate}, data ${opts.data})`);
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
