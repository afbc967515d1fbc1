// `npm run demo` as a user runs it, in a copy of the checkout on free ports: a stop in the middle leaves nothing
// behind, and a taken port is refused before anything starts. The demo starts its own server; the test run's
// shared one is not used.
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { cpSync, existsSync, mkdtempSync, readFileSync, rmSync, symlinkSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { freePort, portInUse, projectRoot } from '../scripts/lib/dev-server';
import type { DemoPorts } from '../scripts/lib/ports';

interface DemoRun {
  child: ChildProcess;
  output: () => string;
  exited: Promise<number | null>;
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

async function until(what: string, check: () => boolean, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

describe('npm run demo', () => {
  let checkout: string;
  let ports: DemoPorts;
  let run: DemoRun | undefined;

  before(async () => {
    // A copy, not symlinks: the demo finds its checkout (and .data) from where its own files really are.
    checkout = mkdtempSync(join(tmpdir(), 'pf-demo-'));
    for (const entry of ['scripts', 'src', 'lab', 'agent', 'kvm', 'config', 'package.json', 'tsconfig.json']) {
      cpSync(join(projectRoot, entry), join(checkout, entry), { recursive: true });
    }
    for (const entry of ['node_modules', '.cache']) symlinkSync(join(projectRoot, entry), join(checkout, entry));
    ports = {
      temporal: await freePort(),
      ui: await freePort(),
      lab: await freePort(),
      workerMetrics: await freePort(),
      serverMetrics: await freePort(),
    };
  });
  after(() => {
    if (run?.child.exitCode === null) run.child.kill('SIGKILL');
    rmSync(checkout, { recursive: true, force: true });
  });

  function startDemo(args: string[] = []): DemoRun {
    const child = spawn(process.execPath, ['--import', 'tsx', 'scripts/demo.ts', ...args], {
      cwd: checkout,
      env: {
        ...process.env,
        PF_TEMPORAL_PORT: String(ports.temporal),
        PF_TEMPORAL_UI_PORT: String(ports.ui),
        PF_LAB_PORT: String(ports.lab),
        PF_METRICS_PORT: String(ports.workerMetrics),
        PF_TEMPORAL_METRICS_PORT: String(ports.serverMetrics),
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let output = '';
    child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
    const exited = new Promise<number | null>((resolveExit) => child.once('exit', (code) => resolveExit(code)));
    run = { child, output: () => output, exited };
    return run;
  }

  it('refuses a taken port, naming who holds it, and starts nothing', async () => {
    const taken = createServer();
    await new Promise<void>((resolveListen) => taken.listen(ports.lab, '127.0.0.1', resolveListen));
    try {
      const demo = startDemo();
      assert.equal(await demo.exited, 1, demo.output());
      assert.match(demo.output(), new RegExp(`Port ${ports.lab} \\(the lab\\) is in use by pid ${process.pid}`));
      assert.match(
        demo.output(),
        /PF_TEMPORAL_PORT=\d+ PF_TEMPORAL_UI_PORT=\d+ PF_LAB_PORT=\d+ PF_METRICS_PORT=\d+ npm run demo/,
      );
      assert.equal(existsSync(join(checkout, '.data', 'temporal')), false, 'no Temporal server was started');
      assert.equal(await portInUse(ports.temporal), false);
    } finally {
      await new Promise((resolveClose) => taken.close(resolveClose));
    }
  });

  it('stops its workers, lab and Temporal server within seconds of SIGTERM while its jobs run', async () => {
    const demo = startDemo();
    await until('the seeding pass', () => demo.output().includes('Seeding the replicas'), 180_000);
    const { serverPid } = JSON.parse(readFileSync(join(checkout, '.data', 'demo.pid'), 'utf8')) as {
      serverPid: number;
    };
    assert.ok(alive(serverPid), 'the Temporal server runs');
    assert.doesNotMatch(demo.output(), /"level":/, 'operator logs stay out of the terminal');
    assert.match(readFileSync(join(checkout, '.data', 'demo.log'), 'utf8'), /No workflows registered/);

    const stoppedAt = Date.now();
    demo.child.kill('SIGTERM');
    assert.equal(await demo.exited, 130, demo.output());
    assert.ok(Date.now() - stoppedAt < 15_000, `stopped in ${Date.now() - stoppedAt} ms`);
    assert.match(
      demo.output(),
      /SIGTERM: stopping the demo\.\nStopping the workers, the lab and the Temporal server\.\.\.\nStopped\./,
    );
    assert.equal(alive(serverPid), false, 'the Temporal server is gone');
    const { temporal, ui, lab, workerMetrics, serverMetrics } = ports;
    for (const port of [temporal, ui, lab, workerMetrics, serverMetrics])
      assert.equal(await portInUse(port), false, `port ${port} is free`);
    assert.equal(existsSync(join(checkout, '.data', 'demo.pid')), false);
  });

  it('refuses an unknown hypervisor by its flag, before starting anything', async () => {
    const demo = startDemo(['--hypervisor', 'vmware']);
    assert.equal(await demo.exited, 1, demo.output());
    assert.match(demo.output(), /--hypervisor: 'vmware' is neither lab nor kvm/);
    assert.doesNotMatch(demo.output(), /Starting the Temporal server/);
    assert.equal(await portInUse(ports.temporal), false);
  });

  it('--hypervisor kvm: the same story on real guests, two libvirt instances; exact, and nothing left running', async () => {
    const demo = startDemo(['--hypervisor', 'kvm']);
    await until('the commands to try', () => demo.output().includes('Press Ctrl-C'), 300_000);
    const out = demo.output();
    assert.match(out, /kvm-app01 +kvm-apps +failedOver/);
    assert.match(out, /kvm-app02 +kvm-apps +failedOver/);
    const checks = [...out.matchAll(/(kvm-app0\d): replica canary (\d+) = source's last write (\d+); .*: (.*)/g)];
    assert.equal(checks.length, 2, out);
    for (const [, vm, replica, source, compared] of checks) {
      assert.equal(replica, source, `${vm}: the replica resumes at the source's last write`);
      assert.ok(Number(source) > 0, `${vm} wrote`);
      assert.equal(compared, 'Images are identical.', `${vm}: qemu-img compare`);
    }
    // Both Prometheus endpoints it prints: the workers' (the SDK's and the orchestrator's own) and the server's.
    assert.match(out, new RegExp(`http://127\\.0\\.0\\.1:${ports.workerMetrics}/metrics`));
    const scrape = async (port: number) => (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
    const workers = await scrape(ports.workerMetrics);
    const failedOver = (metric: string) =>
      new RegExp(`^${metric}\\{[^}]*job="kvm-apps"[^}]*outcome="failedOver"[^}]*\\} 2$`, 'm');
    assert.match(workers, failedOver('planned_failover_downtime_seconds_count'));
    assert.match(workers, failedOver('planned_failover_sessions_total'));
    assert.match(workers, /^planned_failover_bytes_copied_total\{[^}]*phase="after_power_off"[^}]*\} [1-9]/m);
    assert.match(workers, /^temporal_activity_execution_latency_count\{[^}]*activity_type="copyDisk"/m);
    assert.match(await scrape(ports.serverMetrics), /^service_requests\{/m);
    demo.child.kill('SIGTERM');
    assert.equal(await demo.exited, 0, demo.output());
    assert.match(demo.output(), /Stopping the workers, the KVM hosts and the Temporal server\.\.\.\nStopped\./);
    const left = spawnSync('pgrep', ['-f', join(checkout, '.data')], { encoding: 'utf8' }).stdout.trim();
    assert.equal(left, '', 'no libvirtd, QEMU or qemu-storage-daemon of the demo is left');
  });
});
