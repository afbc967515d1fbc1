// `npm run server`: a Temporal dev server for users, with a persistent SQLite store and the Web UI.
import { join } from 'node:path';
import { ensureTemporalCli, portInUse, projectRoot, serverHealthy, startDevServer } from './lib/dev-server';

const port = Number(process.env.PF_TEMPORAL_PORT ?? 7233);
const uiPort = Number(process.env.PF_TEMPORAL_UI_PORT ?? port + 1000);
const dataDir = process.env.PF_DATA_DIR ?? join(projectRoot, '.data');

async function main(): Promise<void> {
  const cli = ensureTemporalCli();
  const address = `127.0.0.1:${port}`;
  if (await portInUse(port)) {
    if (await serverHealthy(cli, address)) {
      console.log(`A Temporal server is already running at ${address} (Web UI http://127.0.0.1:${uiPort}).`);
      console.log('Not starting a second one. Stop the first with Ctrl-C in its terminal.');
      return;
    }
    throw new Error(`Port ${port} is taken by another program; set PF_TEMPORAL_PORT to use another port.`);
  }
  const dbFile = join(dataDir, 'temporal', 'temporal.db');
  const logFile = join(dataDir, 'temporal', 'server.log');
  console.log(`Starting the Temporal server at ${address} (state in ${dbFile})...`);
  const server = await startDevServer({ cli, port, uiPort, dbFile, logFile });
  console.log(`Temporal server ready at ${server.address}. Web UI: ${server.uiUrl}`);
  console.log(`Server log: ${logFile}. Press Ctrl-C to stop.`);
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.once(signal, () => {
      console.log('Stopping the Temporal server...');
      void server.stop();
    });
  }
  const code = await server.exited;
  console.log(code === 0 || code === null ? 'Temporal server stopped.' : `Temporal server exited with code ${code}.`);
}

main().catch((err: unknown) => {
  console.error(`error: ${err instanceof Error ? err.message : String(err)}`);
  process.exit(1);
});
