// The KVM primitives on real QEMU and libvirt, each against a baseline timed the same way in the same run:
//   copy:      changed extents of a qcow2 disk read over NBD from one qemu-storage-daemon and written over NBD into
//              another (our client, pipelined), against `cp` of a raw file holding the same number of bytes;
//   boot:      `virsh start` to the guest's ready line, against QEMU started directly with the same guest;
//   shutdown:  `virsh shutdown` (ACPI) to "shut off", against QMP system_powerdown to QEMU's exit;
//   checkpoint: `virsh checkpoint-create-as`, against `virsh domstate` (one trivial virsh call).
//   npx tsx bench/kvm.ts        (BENCH_ROUNDS, default 5)
import { execFile, spawn } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import {
  createGuestDisk,
  ensureGuest,
  guestFiles,
  guestKernelCmdline,
  guestQemuArgs,
  waitForGuest,
  waitForReady,
} from '../kvm/guest/guest';
import { guestDomainXml } from '../kvm/libvirt/domain';
import { CAPABILITIES_CACHE, LibvirtInstance } from '../kvm/libvirt/instance';
import { exportImage } from '../agent/storage-daemon';
import { QmpClient } from '../kvm/qmp';
import { NbdClient } from '../agent/nbd/client';
import type { Comparison } from './report/comparisons';
import { commitOf, machine, median, MiB, round3, sleep, writeResult } from './lib';

const run = promisify(execFile);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 5);
const EXTENTS = 2048;
const EXTENT_BYTES = 128 * 1024; // 256 MiB changed, scattered over a 1 GiB disk
const DISK_BYTES = 1024 * MiB;

async function timed<T>(fn: () => Promise<T>): Promise<number> {
  const started = process.hrtime.bigint();
  await fn();
  return Number(process.hrtime.bigint() - started) / 1e6;
}

/** A qemu-storage-daemon exporting one qcow2 image over NBD, the way the KVM host process exports restore points. */
const exportIn = (dir: string, name: string, image: string, writable: boolean) =>
  exportImage({ image, socket: join(dir, `${name}.sock`), pidFile: join(dir, `${name}.pid`), writable });

async function copyBench(dir: string) {
  const source = join(dir, 'source.qcow2');
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', source, String(DISK_BYTES)]);
  const extents = Array.from({ length: EXTENTS }, (_, i) => ({
    offset: (i * DISK_BYTES) / EXTENTS + ((i * 7919) % 4) * EXTENT_BYTES,
    length: EXTENT_BYTES,
  }));
  const writes = extents.flatMap((e, i) => ['-c', `write -P ${(i % 250) + 1} ${e.offset} ${e.length}`]);
  await run('qemu-io', ['-f', 'qcow2', ...writes, source], { maxBuffer: 64 * MiB });
  const raw = join(dir, 'same-bytes.raw');
  await run('dd', ['if=/dev/urandom', `of=${raw}`, 'bs=1M', `count=${(EXTENTS * EXTENT_BYTES) / MiB}`, 'status=none']);
  const samples: { nbdMs: number; cpMs: number }[] = [];
  const exported = await exportIn(dir, 'source', source, false);
  try {
    for (let r = 0; r <= ROUNDS; r++) {
      const target = join(dir, `target-${r}.qcow2`);
      await run('qemu-img', ['create', '-q', '-f', 'qcow2', target, String(DISK_BYTES)]);
      const into = await exportIn(dir, `target${r}`, target, true);
      try {
        const from = await NbdClient.connect({ path: exported.socket, exportName: 'disk' });
        const to = await NbdClient.connect({ path: into.socket, exportName: 'disk' });
        const nbdMs = await timed(async () => {
          const writing: Promise<void>[] = [];
          for await (const piece of from.readExtents(extents)) {
            writing.push(to.write(piece.offset, piece.data));
            if (writing.length >= 8) await writing.shift();
          }
          await Promise.all(writing);
          await to.flush();
        });
        await Promise.all([from.close(), to.close()]);
        const cpMs = await timed(() => run('cp', [raw, join(dir, `copy-${r}.raw`)]));
        await rm(join(dir, `copy-${r}.raw`));
        if (r > 0) samples.push({ nbdMs, cpMs }); // round 0 warms the page cache
      } finally {
        await into.stop();
        await rm(target, { force: true });
      }
    }
  } finally {
    await exported.stop();
  }
  const bytes = EXTENTS * EXTENT_BYTES;
  return {
    bytes,
    extents: EXTENTS,
    samples,
    medianNbdMs: round3(median(samples.map((s) => s.nbdMs))),
    medianCpMs: round3(median(samples.map((s) => s.cpMs))),
    ratioNbdToCp: round3(median(samples.map((s) => s.nbdMs / s.cpMs))),
    nbdMiBPerSecond: round3(bytes / MiB / (median(samples.map((s) => s.nbdMs)) / 1000)),
  };
}

const readyAfter = (serialLog: string, seen: number) => waitForReady(serialLog, seen, { timeoutMs: 120_000 });
const linesSoFar = (serialLog: string) => waitForGuest(serialLog, (lines) => lines.length, { timeoutMs: 1 });

async function guestBench(dir: string) {
  const files = guestFiles(ensureGuest());
  const workload = { pauseSeconds: 0.2, blocksPerIteration: 4 };
  const host = await LibvirtInstance.start({
    dir: join(dir, 'host'),
    capabilitiesCache: CAPABILITIES_CACHE,
  });
  const samples: Record<
    'virshBootMs' | 'qemuBootMs' | 'virshShutdownMs' | 'qmpShutdownMs' | 'checkpointMs' | 'domstateMs',
    number
  >[] = [];
  let qemu: ReturnType<typeof spawn> | undefined;
  try {
    const disk = join(dir, 'guest.qcow2');
    const serialLog = join(dir, 'guest.serial');
    await writeFile(serialLog, '');
    await createGuestDisk(disk, '64M');
    const xml = join(dir, 'guest.xml');
    const cmdline = guestKernelCmdline(workload);
    await writeFile(xml, guestDomainXml({ name: 'bench-guest', disk, ...files, cmdline, serialLog }));
    await host.virsh.run(['define', xml]);
    for (let r = 0; r < ROUNDS; r++) {
      // libvirt: start, checkpoint (against a trivial call), ACPI shutdown.
      const seen = await linesSoFar(serialLog);
      const virshBootMs = await timed(async () => {
        await host.virsh.run(['start', 'bench-guest']);
        await readyAfter(serialLog, seen);
      });
      await sleep(1000);
      const domstateMs = await timed(() => host.virsh.run(['domstate', 'bench-guest']));
      const checkpointMs = await timed(() => host.virsh.run(['checkpoint-create-as', 'bench-guest', `c${r}`]));
      const virshShutdownMs = await timed(async () => {
        await host.virsh.run(['shutdown', 'bench-guest']);
        while ((await host.virsh.domainState('bench-guest')) !== 'shut off') await sleep(20);
      });
      // The same guest and disk under QEMU alone (its -serial file: starts a log of its own).
      const qemuLog = join(dir, `qemu-${r}.serial`);
      const qmpSocket = join(dir, 'qmp.sock');
      const exited = () => new Promise((resolve) => qemu!.once('exit', resolve));
      const qemuBootMs = await timed(async () => {
        qemu = spawn('qemu-system-x86_64', guestQemuArgs({ files, disk, serialLog: qemuLog, qmpSocket, workload }), {
          stdio: 'ignore',
        });
        await readyAfter(qemuLog, 0);
      });
      await sleep(1000);
      const qmp = await QmpClient.connect(qmpSocket, { retryForMs: 5_000 });
      const qmpShutdownMs = await timed(async () => {
        const gone = exited();
        await qmp.execute('system_powerdown');
        await gone;
      });
      await qmp.close().catch(() => undefined);
      samples.push({ virshBootMs, qemuBootMs, virshShutdownMs, qmpShutdownMs, checkpointMs, domstateMs });
    }
  } finally {
    if (qemu?.exitCode === null) qemu.kill('SIGKILL'); // a failed round must not leave a guest running
    await host.stop();
  }
  const m = (k: keyof (typeof samples)[number]) => round3(median(samples.map((s) => s[k])));
  const ratio = (a: keyof (typeof samples)[number], b: keyof (typeof samples)[number]) =>
    round3(median(samples.map((s) => s[a] / s[b])));
  return {
    samples,
    medians: {
      virshBootMs: m('virshBootMs'),
      qemuBootMs: m('qemuBootMs'),
      virshShutdownMs: m('virshShutdownMs'),
      qmpShutdownMs: m('qmpShutdownMs'),
      checkpointMs: m('checkpointMs'),
      domstateMs: m('domstateMs'),
    },
    ratios: {
      bootVirshToQemu: ratio('virshBootMs', 'qemuBootMs'),
      shutdownVirshToQmp: ratio('virshShutdownMs', 'qmpShutdownMs'),
      checkpointToDomstate: ratio('checkpointMs', 'domstateMs'),
    },
  };
}

async function main(): Promise<void> {
  const started = new Date();
  const dir = await mkdtemp(join(tmpdir(), 'pf-bench-kvm-'));
  try {
    ensureGuest();
    const copy = await copyBench(dir);
    console.log(`copy: ${JSON.stringify({ ...copy, samples: undefined })}`);
    const guest = await guestBench(dir);
    console.log(`guest: ${JSON.stringify(guest.medians)} ratios ${JSON.stringify(guest.ratios)}`);
    const path = await writeResult('kvm', {
      benchmark: 'kvm',
      commit: commitOf(),
      date: started.toISOString(),
      machine: machine(),
      accelerator: 'tcg',
      rounds: ROUNDS,
      copy,
      guest,
      comparisons: [
        {
          title: 'Changed extents of a qcow2 image, copied',
          unit: 'MiB/s',
          measured: { label: 'our NBD client', samples: copy.samples.map((s) => copy.bytes / MiB / (s.nbdMs / 1000)) },
          baseline: {
            label: 'cp of the same bytes',
            samples: copy.samples.map((s) => copy.bytes / MiB / (s.cpMs / 1000)),
          },
        },
        {
          title: 'Boot of the test guest',
          unit: 'ms',
          measured: { label: 'virsh start', samples: guest.samples.map((s) => s.virshBootMs) },
          baseline: { label: 'QEMU started alone', samples: guest.samples.map((s) => s.qemuBootMs) },
        },
        {
          title: 'ACPI shutdown of the test guest',
          unit: 'ms',
          measured: { label: 'virsh shutdown', samples: guest.samples.map((s) => s.virshShutdownMs) },
          baseline: { label: 'QMP system_powerdown', samples: guest.samples.map((s) => s.qmpShutdownMs) },
        },
        {
          title: 'A checkpoint of the running guest',
          unit: 'ms',
          measured: { label: 'virsh checkpoint-create', samples: guest.samples.map((s) => s.checkpointMs) },
          baseline: { label: 'a trivial virsh call (domstate)', samples: guest.samples.map((s) => s.domstateMs) },
        },
      ] satisfies Comparison[],
    });
    console.log(`results in ${path}`);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
