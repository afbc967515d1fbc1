import { join } from 'node:path';
import { startLab, type RunningLab } from '../../lab/server';
import { LabControl } from '../../src/hypervisor/lab-adapter';
import { portInUse, projectRoot } from './dev-server';

/** The demo's lab: the one already listening on the port, or a new one in this process with the demo estate. */
export async function ensureDemoLab(port = 7300): Promise<{ url: string; lab?: RunningLab }> {
  const url = `http://127.0.0.1:${port}`;
  if (await portInUse(port)) {
    const control = new LabControl({ url });
    try {
      await control.status();
      return { url };
    } catch {
      throw new Error(`Port ${port} is taken by a program that is not the lab.`);
    } finally {
      control.close();
    }
  }
  const lab = await startLab({
    estatePath: join(projectRoot, 'config', 'estate.yaml'),
    dataDir: join(projectRoot, '.data', 'lab'),
    port,
  });
  return { url, lab };
}
