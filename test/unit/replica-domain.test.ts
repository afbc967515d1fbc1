import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { ReplicaDefinitionError, replicaDomainXml } from '../../agent/replica-domain';
import { guestDomainXml } from '../../kvm/libvirt/domain';

// As `virsh dumpxml --inactive` writes an operator's domain: identity, a raw disk with a backing chain, a second
// qcow2 disk, a CD-ROM, a network card, a guest agent channel, a file console.
const operatorDomain = `<domain type='kvm'>
  <name>erp01</name>
  <uuid>4d6f1c2e-8a53-4d8e-9a55-0f0c7b8d2a11</uuid>
  <memory unit='KiB'>4194304</memory>
  <vcpu placement='static'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source dev='/dev/vg0/erp01-root'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/erp01-data.qcow2'/>
      <backingStore type='file'>
        <format type='qcow2'/>
        <source file='/var/lib/libvirt/images/erp01-data-base.qcow2'/>
      </backingStore>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/srv/iso/tools.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:12:34:56'/>
      <source network='prod'/>
      <model type='virtio'/>
    </interface>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <console type='file'>
      <source path='/var/log/erp01.console' append='on'/>
      <target type='serial' port='0'/>
    </console>
  </devices>
</domain>
`;

const spec = {
  name: 'erp01_replica',
  disks: new Map([
    ['vda', '/dr/replicas/erp01_replica/_running.vda.qcow2'],
    ['vdb', '/dr/replicas/erp01_replica/_running.vdb.qcow2'],
  ]),
  consoleLog: '/dr/replicas/erp01_replica/console.log',
};

describe('the replica domain made from the source definition', () => {
  test("an operator's domain: own name, no uuid, the replica's images, everything else kept", () => {
    const xml = replicaDomainXml(operatorDomain, spec);
    assert.match(xml, /<name>erp01_replica<\/name>/);
    assert.doesNotMatch(xml, /<uuid>/, 'libvirt gives the replica its own identity');
    assert.doesNotMatch(xml, /erp01-root|erp01-data|backingStore|tools\.iso|erp01\.console/, 'no path of the source');
    const disks = [...xml.matchAll(/<disk\b[\s\S]*?<\/disk>/g)].map((m) => m[0]);
    assert.equal(disks.length, 3);
    assert.match(disks[0]!, /^<disk type='file' device='disk'>/);
    assert.match(disks[0]!, /<driver name='qemu' type='qcow2' cache='none'\/>/);
    assert.match(disks[0]!, /<source file='\/dr\/replicas\/erp01_replica\/_running\.vda\.qcow2'\/>/);
    assert.match(disks[0]!, /<address type='pci' domain='0x0000' bus='0x04'/, 'device addresses kept');
    assert.match(disks[1]!, /<source file='\/dr\/replicas\/erp01_replica\/_running\.vdb\.qcow2'\/>/);
    assert.doesNotMatch(disks[2]!, /<source/, 'the CD-ROM drive is left empty');
    assert.match(xml, /<mac address='52:54:00:12:34:56'\/>/);
    assert.match(xml, /<memory unit='KiB'>4194304<\/memory>/);
    assert.match(xml, /<source path='\/dr\/replicas\/erp01_replica\/console\.log' append='on'\/>/);
    assert.match(xml, /<channel type='unix'>/);
  });

  test("the test guest's domain", () => {
    const source = guestDomainXml({
      name: 'pf-src',
      disk: '/prod/pf-src.qcow2',
      kernel: '/k',
      initrd: '/i',
      cmdline: 'console=ttyS0',
      serialLog: '/prod/pf-src.serial',
    });
    const xml = replicaDomainXml(source, { ...spec, disks: new Map([['vda', '/dr/r/_running.vda.qcow2']]) });
    assert.match(xml, /<source file='\/dr\/r\/_running\.vda\.qcow2'\/>/);
    assert.equal([...xml.matchAll(/erp01_replica\/console\.log/g)].length, 2, 'serial and console both moved');
    assert.doesNotMatch(xml, /\/prod\//);
  });

  test('a definition that cannot become the replica is refused, naming what is wrong', () => {
    assert.throws(() => replicaDomainXml('<vm/>', spec), /not a libvirt domain/);
    assert.throws(
      () => replicaDomainXml(operatorDomain, { ...spec, disks: new Map([['vda', '/x']]) }),
      (e: Error) => e instanceof ReplicaDefinitionError && /disk vdb .* not one of the replica's disks/.test(e.message),
    );
    assert.throws(
      () => replicaDomainXml(operatorDomain, { ...spec, disks: new Map([...spec.disks, ['vdc', '/y']]) }),
      /has no disk vdc/,
    );
  });

  test('a redefinition keeps the UUID libvirt gave the replica', () => {
    const xml = replicaDomainXml(operatorDomain, { ...spec, uuid: '0b7c2f0e-1111-4222-8333-944455556666' });
    assert.match(xml, /<name>erp01_replica<\/name>\n {2}<uuid>0b7c2f0e-1111-4222-8333-944455556666<\/uuid>/);
    assert.equal([...xml.matchAll(/<uuid>/g)].length, 1);
  });

  test('names and paths are escaped, not pasted into the XML', () => {
    const xml = replicaDomainXml(operatorDomain, { ...spec, consoleLog: "/dr/a'b&c.log" });
    assert.match(xml, /path='\/dr\/a&apos;b&amp;c\.log'/);
  });
});
