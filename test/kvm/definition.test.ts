import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { guestFiles, readGuestLines, waitForReady } from '../../kvm/guest/guest';
import { BadRequestError, ConflictError, NotFoundError } from '../../src/hypervisor/errors';
import type { HostApiHypervisor } from '../../src/hypervisor/host-api-adapter';
import { kvmPort, testServerTls } from '../tls';
import type { VmDefinition } from '../../src/hypervisor/port';
import { DEFAULT_BOOT_FILE_DIRS, domainXml } from '../../agent/definition';
import { startKvmHost } from '../../agent/server';
import { linuxDomain, uefiDomain, windowsDomain } from '../operator-domains';
import { GUEST_DISK_BYTES, startTestKvmHost, type TestKvmHost } from './helpers';

const PROD = 'kvm-def-prod';
const DR = 'kvm-def-dr';
const VM = 'pf-def';
const replica = { host: DR, replica: `${VM}_replica` };
const disks = [{ id: 'vda', sizeBytes: GUEST_DISK_BYTES }];
const SOURCE_MAC = '52:54:00:0d:ef:01';

// Definitions that reach a KVM agent over the network, on real libvirt hosts (a production and a DR host, each a
// private libvirtd with our host process): one that would give QEMU a command line of the caller's is refused where
// it arrives and defines nothing; the test guest's own definition, as `virsh dumpxml --inactive` wrote it, still makes
// a replica domain that libvirt defines and boots, with MAC addresses of its own unless the source is said to be off.
describe('domain definitions given to KVM agents, on real libvirt', () => {
  let dir: string;
  let prod: TestKvmHost;
  let dr: TestKvmHost;
  let prodPort: HostApiHypervisor;
  let drPort: HostApiHypervisor;
  let definition: VmDefinition;
  /** The source's definition with a network card, on an isolated libvirt network of the DR host (no DHCP, no NAT). */
  let withCard: VmDefinition;
  const network = `pfdef${randomBytes(3).toString('hex')}`;

  const domains = async (host: TestKvmHost) =>
    (await host.libvirt.virsh.run(['list', '--all', '--name'])).split('\n').filter((l) => l.trim() !== '');
  const macsOf = async (host: TestKvmHost, domain: string) =>
    [...(await host.libvirt.virsh.run(['dumpxml', domain])).matchAll(/<mac address='([^']+)'\/>/g)].map((m) => m[1]!);
  const consoleLog = () => join(dir, 'dr', 'state', 'replicas', replica.replica, 'console.log');

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'pf-kvmdef-'));
    prod = await startTestKvmHost({ dir: join(dir, 'prod'), name: PROD, domain: VM });
    dr = await startTestKvmHost({ dir: join(dir, 'dr'), name: DR, role: 'dr' });
    prodPort = kvmPort(prod.host.url, PROD);
    drPort = kvmPort(dr.host.url, DR);
    definition = (await prodPort.getVmDefinition({ host: PROD, vm: VM }))!;
    withCard = {
      ...definition,
      text: definition.text.replace(
        '<serial ',
        `<interface type='network'><mac address='${SOURCE_MAC}'/><source network='${network}'/><model type='virtio'/></interface>\n    <serial `,
      ),
    };
    const networkXml = join(dir, 'network.xml');
    writeFileSync(networkXml, `<network><name>${network}</name><bridge name='${network}'/></network>`);
    await dr.libvirt.virsh.run(['net-create', networkXml]);
  });

  after(async () => {
    drPort?.close();
    prodPort?.close();
    await dr?.libvirt.virsh.run(['destroy', replica.replica]).catch(() => undefined);
    await dr?.libvirt.virsh.run(['net-destroy', network]).catch(() => undefined); // its bridge goes with it
    await dr?.stop();
    await prod?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  test('a definition with qemu:commandline is refused by createReplica with a 400 naming it; nothing is made', async () => {
    const text = definition.text
      .replace(/^<domain type='(\w+)'>/, "<domain type='$1' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>")
      .replace('</domain>', "  <qemu:commandline>\n    <qemu:arg value='-monitor'/>\n  </qemu:commandline>\n</domain>");
    assert.notEqual(text, definition.text);
    await assert.rejects(
      drPort.createReplica(replica, { sourceVm: VM, disks, definition: { ...definition, text } }),
      (e: unknown) =>
        e instanceof BadRequestError &&
        e.field === 'body.definition.text' &&
        /domain\/qemu:commandline is not allowed/.test(e.message),
    );
    await assert.rejects(drPort.getReplica(replica), NotFoundError);
    assert.equal(existsSync(join(dir, 'dr', 'state', 'replicas', replica.replica)), false, 'no replica directory');
    assert.deepEqual(await domains(dr), [], 'no domain defined');
    // Refused before libvirt is asked anything: an agent whose libvirt does not answer says the same 400.
    const stateDir = join(dir, 'no-libvirt');
    const lone = await startKvmHost({
      name: DR,
      site: 'dr',
      role: 'dr',
      libvirtUri: `qemu+unix:///system?socket=${join(dir, 'no-libvirt.sock')}`,
      stateDir,
      bootFileDirs: [guestFiles().dir],
      tls: await testServerTls([DR]),
    });
    const lonePort = kvmPort(lone.url, DR);
    try {
      await assert.rejects(
        lonePort.createReplica(replica, { sourceVm: VM, disks, definition: { ...definition, text } }),
        (e: unknown) => e instanceof BadRequestError && /domain\/qemu:commandline is not allowed/.test(e.message),
      );
      assert.equal(existsSync(join(stateDir, 'replicas', replica.replica)), false, 'no replica directory');
    } finally {
      lonePort.close();
      await lone.stop();
    }
  });

  test('a new VM from a definition with a host device is refused with a 400 naming it; nothing is made', async () => {
    const text = definition.text.replace(
      '<serial ',
      "<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' bus='0x00' slot='0x1f' function='0x0'/></source></hostdev>\n    <serial ",
    );
    await assert.rejects(
      prodPort.createVm({ host: PROD, vm: 'pf-def-new' }, { disks, definition: { ...definition, text } }),
      (e: unknown) => e instanceof BadRequestError && /domain\/devices\/hostdev is not allowed/.test(e.message),
    );
    assert.deepEqual(await domains(prod), [VM]);
    assert.equal(existsSync(join(dir, 'prod', 'state', 'vms', 'pf-def-new')), false);
  });

  test("the test guest's own definition makes a replica domain that boots: its own MACs, the source's when it is off", async () => {
    await drPort.createReplica(replica, { sourceVm: VM, disks, definition: withCard });
    const replicaVm = { host: DR, vm: replica.replica };

    // A regular failover: the source may be running on the same network.
    await drPort.powerOn(replicaVm);
    await waitForReady(consoleLog(), 0, { timeoutMs: 60_000 });
    const own = await macsOf(dr, replica.replica);
    assert.equal(own.length, 1);
    assert.match(own[0]!, /^52:54:00(:[0-9a-f]{2}){3}$/);
    assert.notEqual(own[0], SOURCE_MAC);
    const defined = await dr.libvirt.virsh.run(['dumpxml', '--inactive', replica.replica]);
    assert.match(defined, /<kernel>[^<]*\/vmlinuz<\/kernel>/, "the test guest's kernel, from a boot-file directory");
    assert.doesNotMatch(defined, /qemu:|pf-def\.serial|\/prod\//, 'nothing of the source host');

    // A planned failover: the source is off, the replica is the machine.
    await drPort.powerOff(replicaVm);
    const since = (await readGuestLines(consoleLog())).length;
    await drPort.powerOn(replicaVm, { sourceOff: true });
    await waitForReady(consoleLog(), since, { timeoutMs: 60_000 });
    assert.deepEqual(await macsOf(dr, replica.replica), [SOURCE_MAC]);

    // Defined anew at the next power-on without the flag: its own MAC again, the same as before.
    await drPort.powerOff(replicaVm);
    await drPort.powerOn(replicaVm);
    assert.deepEqual(await macsOf(dr, replica.replica), own);
  });

  test('a kept definition this host refuses now (other boot-file directories): power-on is a 409 naming it', async () => {
    const replicaVm = { host: DR, vm: replica.replica };
    await drPort.powerOff(replicaVm);
    await dr.host.stop();
    const strict = await startKvmHost({
      name: DR,
      site: 'dr',
      role: 'dr',
      libvirtUri: dr.libvirt.virsh.uri,
      stateDir: join(dir, 'dr', 'state'),
      bootFileDirs: ['/usr/share/seabios'],
      tls: await testServerTls([DR]),
    });
    const strictPort = kvmPort(strict.url, DR);
    try {
      await assert.rejects(
        strictPort.powerOn(replicaVm),
        (e: unknown) =>
          e instanceof ConflictError &&
          /the definition of pf-def that pf-def_replica keeps is refused now: domain\/os\/kernel .* is not under a boot-file directory/.test(
            e.message,
          ),
      );
      assert.equal((await strictPort.getVm(replicaVm)).powerState, 'Off', 'nothing started');
    } finally {
      strictPort.close();
      await strict.stop();
    }
    drPort.close();
    drPort = kvmPort((await dr.restartHost()).url, DR);
    await drPort.powerOn(replicaVm);
    assert.equal((await drPort.getVm(replicaVm)).powerState, 'Running', 'the guest kernel’s directory allowed again');
  });

  test('failback to a new VM beside the original: MAC addresses of its own', async () => {
    const vm = { host: PROD, vm: 'pf-def-new' };
    await prodPort.createVm(vm, { disks, definition: withCard });
    const macs = await macsOf(prod, vm.vm);
    assert.equal(macs.length, 1);
    assert.notEqual(macs[0], SOURCE_MAC);
  });

  // What the allow-list lets through is what libvirt itself accepts: the unit tests' operator domains, rebuilt,
  // pass libvirt's schema and its checks at define time (libvirt 9.0, QEMU 7.2).
  test("operators' Linux, UEFI and Windows domains, rebuilt, are defined by libvirt (virsh define --validate)", async () => {
    const cases = [
      { source: linuxDomain, disks: ['vda', 'vdb'] },
      { source: uefiDomain, disks: ['vda'] },
      { source: windowsDomain, disks: ['sda', 'sdb'] },
    ];
    for (const [i, c] of cases.entries()) {
      const name = `pf-def-operator${i}`;
      let xml = domainXml(c.source, {
        name,
        disks: new Map(c.disks.map((d) => [d, join(dir, `${name}.${d}.qcow2`)])),
        consoleLog: join(dir, `${name}.log`),
        nvram: join(dir, `${name}.nvram.fd`),
        bootFileDirs: DEFAULT_BOOT_FILE_DIRS,
        macs: 'own',
      });
      // This host has no swtpm, without which libvirt refuses any TPM 2.0; the unit tests check what a TPM keeps.
      if (c.source === windowsDomain) xml = xml.replace(/\s*<tpm [\s\S]*?<\/tpm>/, '');
      const file = join(dir, `${name}.xml`);
      writeFileSync(file, xml);
      await dr.libvirt.virsh.run(['define', '--validate', file]);
      assert.equal(await dr.libvirt.virsh.run(['domuuid', name]).then((u) => u.trim() !== ''), true);
      await dr.libvirt.virsh.run(['undefine', '--nvram', name]);
    }
  });
});
