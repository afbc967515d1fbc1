// The lab as a separate process (lab/main.ts), for tests that crash it for real: PF_LAB_CRASH_AT makes it SIGKILL
// itself inside a step (lab/crash.ts). Its output is kept, not shown, unless a test prints it.

import { spawn } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { CrashStep } from '../../lab/crash';
import type { EstateInput } from '../../lab/estate';
import type { LabControl, HostApiHypervisor } from '../../src/hypervisor/host-api-adapter';
import { labControl, labPort, labServerTls } from '../tls';

export interface LabProcess {
  url: string;
  port: HostApiHypervisor;
  control: LabControl;
  /** How the process ended: a crash hook ends it with SIGKILL. */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  output(): string;
  /** Releases the clients; kills the process if it still runs. */
  close(): Promise<void>;
}

export async function startLabProcess(estate: EstateInput, dataDir: string, crashAt: CrashStep): Promise<LabProcess> {
  const estatePath = join(dataDir, '..', 'estate.json');
  await writeFile(estatePath, JSON.stringify(estate));
  const tls = await labServerTls(estate);
  const child = spawn(
    process.execPath,
    [
      ...['--import', 'tsx', 'lab/main.ts', '--estate', estatePath, '--data', dataDir, '--port', '0'],
      ...['--tls-cert', tls.cert, '--tls-key', tls.key, '--client-ca', tls.clientCa],
    ],
    { env: { ...process.env, PF_LAB_CRASH_AT: crashAt }, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let output = '';
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once('exit', (code, signal) => resolve({ code, signal })),
  );
  const url = await new Promise<string>((resolve, reject) => {
    const onData = (chunk: Buffer): void => {
      output += chunk.toString();
      const m = /listening on (https:\/\/\S+)/.exec(output);
      if (m) resolve(m[1]!);
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    void exited.then(({ code, signal }) =>
      reject(new Error(`lab exited (${code ?? signal}) before listening:\n${output}`)),
    );
  });
  const port = labPort(url);
  const control = labControl(url);
  return {
    url,
    port,
    control,
    exited,
    output: () => output,
    async close() {
      port.close();
      control.close();
      if (child.exitCode === null && child.signalCode === null) {
        child.kill('SIGKILL');
        await exited;
      }
    },
  };
}
