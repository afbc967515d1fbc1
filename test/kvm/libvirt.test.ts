import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, test } from 'node:test';
import {
  createGuestDisk,
  GUEST_BLOCK_SIZE,
  guestBlockNumbers,
  guestFiles,
  guestKernelCmdline,
  parseCanary,
  parseDataBlock,
  lastSeq,
  readCanary,
  waitForGuest,
  waitForReady,
  waitForSeq,
} from '../../kvm/guest/guest';
import { guestDomainXml } from '../../kvm/libvirt/domain';
import { CAPABILITIES_CACHE, LibvirtInstance } from '../../kvm/libvirt/instance';
import { NbdClient } from '../../agent/nbd/client';
import { dirtyBitmapContext, STATE_DIRTY } from '../../agent/nbd/protocol';

const BLOCKS_PER_ITERATION = 4;
const DISK_BYTES = 64 * 1024 * 1024;

// A libvirt host of its own, as an operator's KVM host is: the guest is a libvirt domain, change tracking is
// libvirt's checkpoints, and a consistent read of the running guest is a pull backup exported over NBD.
describe('a real guest under a private libvirtd', () => {
  let dir: string;
  let host: LibvirtInstance;
  const domain = 'pf-guest1';
  let disk: string;
  let serialLog: string;
  const virsh = (...args: string[]) => host.virsh.run(args);
  const state = () => host.virsh.domainState(domain);
  async function shutOff(timeoutMs: number): Promise<number> {
    const started = Date.now();
    for (; Date.now() - started < timeoutMs; await sleep(50))
      if ((await state()) === 'shut off') return Date.now() - started;
    assert.fail(`${domain} still ${await state()} after ${timeoutMs} ms`);
  }
  /** Boots the guest and waits for its ready line; returns where it resumed from. */
  async function boot(): Promise<number> {
    const before = await waitForGuest(serialLog, (lines) => lines, { timeoutMs: 1 });
    await virsh('start', domain);
    return (await waitForReady(serialLog, before.length, { timeoutMs: 60_000 })).resume;
  }

  before(async () => {
    const files = guestFiles();
    dir = mkdtempSync(join(tmpdir(), 'pf-libvirt-'));
    host = await LibvirtInstance.start({
      dir: join(dir, 'host'),
      capabilitiesCache: CAPABILITIES_CACHE,
    });
    disk = join(dir, 'guest1.qcow2');
    serialLog = join(dir, 'guest1.serial');
    writeFileSync(serialLog, '');
    await createGuestDisk(disk, '64M');
    const xml = join(dir, 'guest1.xml');
    writeFileSync(
      xml,
      guestDomainXml({
        name: domain,
        disk,
        ...files,
        cmdline: guestKernelCmdline({ pauseSeconds: 0.05, blocksPerIteration: BLOCKS_PER_ITERATION, printEvery: 1 }),
        serialLog,
      }),
    );
    await virsh('define', xml);
  });

  after(async () => {
    await host?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  test('boots, writes, and on an ACPI shutdown stops cleanly with its canary on disk; a second boot resumes there', async () => {
    assert.equal(await boot(), 0, 'a zeroed disk starts from 0');
    await waitForSeq(serialLog, 5, { timeoutMs: 30_000 });
    await virsh('shutdown', domain);
    const ms = await shutOff(30_000);
    const clean = await waitForGuest(
      serialLog,
      (lines) => lines.filter((l) => l.kind === 'clean-shutdown').at(-1) as { seq: number } | undefined,
      { timeoutMs: 5_000 },
    );
    assert.equal(await readCanary(disk), clean.seq, 'the canary is the last sequence number the guest said');
    assert.ok(ms < 15_000, `ACPI shutdown took ${ms} ms`);
    assert.equal(await boot(), clean.seq, 'the guest resumes from its canary');
  });

  test('a checkpoint, then a pull backup over NBD: the changed extents hold every block written since, and the view is crash-consistent', async () => {
    if ((await state()) !== 'running') await boot();
    await waitForGuest(serialLog, (lines) => lastSeq(lines), { timeoutMs: 30_000 });
    await virsh('checkpoint-create-as', domain, 'c1');
    // Iterations after the last one printed before the checkpoint may have started before it; the next one cannot.
    const atCheckpoint = lastSeq(await waitForGuest(serialLog, (l) => l, { timeoutMs: 1 }))!;
    const later = await waitForSeq(serialLog, atCheckpoint + 6, { timeoutMs: 30_000 });

    const socket = join(dir, 'backup.sock');
    const backupXml = join(dir, 'backup.xml');
    const checkpointXml = join(dir, 'checkpoint.xml');
    writeFileSync(
      backupXml,
      `<domainbackup mode='pull'><incremental>c1</incremental><server transport='unix' socket='${socket}'/>` +
        `<disks><disk name='vda' backup='yes' type='file'><scratch file='${join(dir, 'scratch.qcow2')}'/></disk></disks></domainbackup>`,
    );
    writeFileSync(checkpointXml, `<domaincheckpoint><name>c2</name></domaincheckpoint>`);
    await virsh('backup-begin', domain, backupXml, checkpointXml);
    try {
      const context = dirtyBitmapContext('backup-vda');
      const nbd = await NbdClient.connect({ path: socket, exportName: 'vda', metaContexts: [context] });
      try {
        assert.equal(nbd.size, DISK_BYTES);
        assert.ok(nbd.readOnly, 'a pull backup is exported read-only');
        const dirty = (await nbd.blockStatus(context, 0, nbd.size)).filter((e) => (e.flags & STATE_DIRTY) !== 0);
        const dirtyBytes = dirty.reduce((n, e) => n + e.length, 0);
        assert.ok(dirtyBytes > 0 && dirtyBytes < DISK_BYTES / 4, `${dirtyBytes} bytes changed since c1`);
        const isDirty = (offset: number) => dirty.some((e) => offset >= e.offset && offset < e.offset + e.length);
        assert.ok(isDirty(0), 'the canary block changed');
        for (let seq = atCheckpoint + 2; seq <= later; seq++)
          for (const block of guestBlockNumbers(seq, DISK_BYTES, BLOCKS_PER_ITERATION))
            assert.ok(isDirty(block * GUEST_BLOCK_SIZE), `block ${block} of iteration ${seq} is among the changes`);

        // The export is the instant the backup began: iteration <canary>'s blocks are all there (fsynced before it).
        const canary = parseCanary(await nbd.read(0, GUEST_BLOCK_SIZE));
        assert.ok(canary >= later, `canary ${canary} in the backup, ${later} said before it began`);
        const blocks = guestBlockNumbers(canary, DISK_BYTES, BLOCKS_PER_ITERATION);
        for (const block of blocks) {
          const data = parseDataBlock(await nbd.read(block * GUEST_BLOCK_SIZE, GUEST_BLOCK_SIZE));
          assert.ok(data && data.seq >= canary, `block ${block}: ${JSON.stringify(data)}, canary ${canary}`);
        }
        // What the changed extents carry, read the way a copy reads them (pipelined).
        let copied = 0;
        for await (const piece of nbd.readExtents(dirty)) copied += piece.data.length;
        assert.equal(copied, dirtyBytes);
      } finally {
        await nbd.close();
      }
    } finally {
      await virsh('domjobabort', domain);
    }
    const checkpoints = (await virsh('checkpoint-list', domain, '--name', '--topological')).split('\n').filter(Boolean);
    assert.deepEqual(checkpoints, ['c1', 'c2'], 'the backup left its checkpoint for the next incremental');
    await virsh('shutdown', domain);
    await shutOff(30_000);
  });
});
