import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { DOMParser, XMLSerializer, type Element } from '@xmldom/xmldom';
import {
  DEFAULT_BOOT_FILE_DIRS,
  DefinitionError,
  domainXml,
  domainXmlOfRequest,
  type DomainSpec,
} from '../../agent/definition';
import { guestDomainXml } from '../../kvm/libvirt/domain';
import { HostApiError } from '../../src/host-api/errors';
import { linuxDomain, uefiDomain, windowsDomain } from '../operator-domains';

const replicaDir = '/dr/replicas/erp01_replica';
const spec: DomainSpec = {
  name: 'erp01_replica',
  disks: new Map([
    ['vda', `${replicaDir}/_running.vda.qcow2`],
    ['vdb', `${replicaDir}/_running.vdb.qcow2`],
  ]),
  consoleLog: `${replicaDir}/console.log`,
  nvram: `${replicaDir}/nvram.fd`,
  bootFileDirs: DEFAULT_BOOT_FILE_DIRS,
  macs: 'source',
};
const uefiSpec: DomainSpec = { ...spec, name: 'web01_replica', disks: new Map([['vda', '/dr/web01/vda.qcow2']]) };
const windowsSpec: DomainSpec = {
  ...spec,
  name: 'sql01_replica',
  disks: new Map([
    ['sda', '/dr/sql01/sda.qcow2'],
    ['sdb', '/dr/sql01/sdb.qcow2'],
  ]),
  nvram: '/dr/sql01/nvram.fd',
};

const childElements = (el: Element): Element[] =>
  Array.from(el.childNodes).filter((n): n is Element => n.nodeType === 1);

/** Every element of a definition as `path @attr=value … text`, namespace declarations left out. */
function entries(xml: string): string[] {
  const out: string[] = [];
  const walk = (el: Element, path: string) => {
    const attrs = Array.from(el.attributes)
      .filter((a) => a.name !== 'xmlns' && !a.name.startsWith('xmlns:'))
      .map((a) => `@${a.name}=${a.value}`)
      .sort();
    const text = childElements(el).length === 0 ? (el.textContent ?? '') : '';
    out.push([path, ...attrs, text].join(' ').trim());
    for (const c of childElements(el)) walk(c, `${path}/${c.tagName}`);
  };
  walk(new DOMParser().parseFromString(xml, 'text/xml').documentElement!, 'domain');
  return out.sort();
}

/** What the agent rewrites or drops, as documented in agent/definition.ts; everything else must come through as is. */
const REWRITTEN = [
  /^domain\/(name|uuid|genid|metadata|numatune|seclabel)\b/,
  /^domain\/vcpu /,
  /^domain\/cputune\/(vcpupin|emulatorpin)\b/,
  /^domain\/os\/nvram\b/,
  /^domain\/devices\/emulator\b/,
  /^domain\/devices\/disk( |\/(source|backingStore|driver)\b)/,
  /^domain\/devices\/(serial|console)\/source\b/,
];

function assertKeptAsIs(input: string, output: string, rewritten: RegExp[] = REWRITTEN): void {
  const kept = (xml: string) => entries(xml).filter((e) => !rewritten.some((r) => r.test(e)));
  assert.deepEqual(kept(output), kept(input));
}

function refusal(pattern: RegExp) {
  return (e: unknown) => e instanceof DefinitionError && pattern.test(e.message);
}

/** The Linux domain with `extra` inserted before `</devices>` (or where `at` is). */
const withDevice = (extra: string, at = '  </devices>'): string => linuxDomain.replace(at, `${extra}\n${at}`);

describe('a domain definition rebuilt from an allow-list', () => {
  const tmp = mkdtempSync(join(tmpdir(), 'pf-definition-'));
  after(() => rmSync(tmp, { recursive: true, force: true }));

  test("an operator's Linux server: own name, no uuid, the replica's images, everything else kept", () => {
    const xml = domainXml(linuxDomain, spec);
    assertKeptAsIs(linuxDomain, xml);
    assert.match(xml, /^<domain type='kvm'>\n {2}<name>erp01_replica<\/name>\n/);
    assert.doesNotMatch(xml, /<uuid>/, 'libvirt gives the replica its own identity');
    assert.doesNotMatch(
      xml,
      /erp01-root|erp01-data|backingStore|tools\.iso|erp01\.console|emulator|libosinfo|seclabel|cpuset|pin|numatune/,
      'nothing of the source host',
    );
    const disks = [...xml.matchAll(/<disk\b[\s\S]*?<\/disk>/g)].map((m) => m[0]);
    assert.equal(disks.length, 3);
    assert.match(disks[0]!, /^<disk type='file' device='disk'>/);
    assert.match(disks[0]!, /<driver name='qemu' type='qcow2' cache='none'\/>/);
    assert.match(disks[0]!, /<source file='\/dr\/replicas\/erp01_replica\/_running\.vda\.qcow2'\/>/);
    assert.match(disks[0]!, /<address type='pci' domain='0x0000' bus='0x04'/, 'device addresses kept');
    assert.match(disks[1]!, /<source file='\/dr\/replicas\/erp01_replica\/_running\.vdb\.qcow2'\/>/);
    assert.match(disks[2]!, /^<disk type='file' device='cdrom'>/);
    assert.doesNotMatch(disks[2]!, /<source/, 'the CD-ROM drive is left empty');
    assert.equal(
      [...xml.matchAll(/<source path='\/dr\/replicas\/erp01_replica\/console\.log' append='on'\/>/g)].length,
      2,
      'the file serial and console both go to the replica’s log',
    );
    assert.match(xml, /<vcpu placement='static'>2<\/vcpu>/);
    assert.match(xml, /<cputune>\n {4}<shares>2048<\/shares>\n {2}<\/cputune>/);
    assert.match(xml, /<description>Owner: finance &amp; operations<\/description>/);
  });

  test('a UEFI guest: firmware kept, the variable store its own, made from the template', () => {
    const xml = domainXml(uefiDomain, uefiSpec);
    assertKeptAsIs(uefiDomain, xml);
    assert.match(
      xml,
      /<loader readonly='yes' secure='yes' type='pflash'>\/usr\/share\/OVMF\/OVMF_CODE_4M\.ms\.fd<\/loader>/,
    );
    assert.match(
      xml,
      /<nvram template='\/usr\/share\/OVMF\/OVMF_VARS_4M\.ms\.fd'>\/dr\/replicas\/erp01_replica\/nvram\.fd<\/nvram>/,
    );
    assert.doesNotMatch(xml, /web01_VARS/);
  });

  test('a Windows guest: Hyper-V features, TPM emulator, a new generation id, new MACs beside its source', () => {
    const xml = domainXml(windowsDomain, { ...windowsSpec, macs: 'own' });
    assertKeptAsIs(windowsDomain, xml, [...REWRITTEN, /^domain\/devices\/interface\/mac\b/]);
    assert.match(xml, /<hyperv mode='custom'>[\s\S]*<vendor_id state='on' value='KVM Hv'\/>[\s\S]*<\/hyperv>/);
    assert.match(xml, /<tpm model='tpm-crb'>\n {6}<backend type='emulator' version='2.0'\/>\n {4}<\/tpm>/);
    assert.match(xml, /<genid\/>/, 'libvirt makes a new generation id');
    assert.doesNotMatch(xml, /43dc0cf8|qemu-kvm|52:54:00:5a:11:01/);
    assert.match(xml, /<os firmware='efi'>[\s\S]*<loader secure='yes'\/>[\s\S]*<\/os>/);
  });

  test("the test guest's domain", () => {
    const source = guestDomainXml({
      name: 'pf-src',
      disk: '/prod/pf-src.qcow2',
      kernel: '/var/lib/libvirt/boot/vmlinuz',
      initrd: '/var/lib/libvirt/boot/initrd.gz',
      cmdline: 'console=ttyS0',
      serialLog: '/prod/pf-src.serial',
    });
    const xml = domainXml(source, { ...spec, disks: new Map([['vda', '/dr/r/_running.vda.qcow2']]) });
    assert.match(xml, /<source file='\/dr\/r\/_running\.vda\.qcow2'\/>/);
    assert.match(xml, /<kernel>\/var\/lib\/libvirt\/boot\/vmlinuz<\/kernel>/);
    assert.equal([...xml.matchAll(/erp01_replica\/console\.log/g)].length, 2, 'serial and console both moved');
    assert.doesNotMatch(xml, /\/prod\//);
  });

  describe('MAC addresses', () => {
    const macs = (xml: string) => [...xml.matchAll(/<mac address='([^']+)'\/>/g)].map((m) => m[1]!);

    test("the source's, when the caller says the source is off: the replica is the machine", () => {
      assert.deepEqual(macs(domainXml(linuxDomain, spec)), ['52:54:00:12:34:56', '52:54:00:ab:cd:ef']);
    });

    test('otherwise its own: libvirt’s prefix, one per card, the same at every definition, another per domain', () => {
      const own = macs(domainXml(linuxDomain, { ...spec, macs: 'own' }));
      assert.equal(own.length, 2);
      for (const mac of own) assert.match(mac, /^52:54:00(:[0-9a-f]{2}){3}$/);
      assert.notEqual(own[0], own[1]);
      assert.ok(!own.includes('52:54:00:12:34:56') && !own.includes('52:54:00:ab:cd:ef'), 'not the source’s');
      assert.deepEqual(macs(domainXml(linuxDomain, { ...spec, macs: 'own' })), own, 'stable across power-ons');
      const other = macs(domainXml(linuxDomain, { ...spec, name: 'erp01_new', macs: 'own' }));
      assert.notDeepEqual(other, own, 'a new VM beside the replica has others');
    });

    test('a card without a MAC gets its own too', () => {
      const source = linuxDomain.replace("<mac address='52:54:00:12:34:56'/>", '');
      const xml = domainXml(source, { ...spec, macs: 'own' });
      assert.equal(macs(xml).length, 2);
      assert.match(xml, /<interface type='network'>\n {6}<mac address='52:54:00:/);
    });
  });

  describe('refused, naming the element or attribute', () => {
    const cases: [string, string, RegExp][] = [
      [
        'QEMU command-line passthrough',
        linuxDomain
          .replace("<domain type='kvm'>", "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>")
          .replace('</domain>', "  <qemu:commandline><qemu:arg value='-s'/></qemu:commandline>\n</domain>"),
        /^domain\/qemu:commandline is not allowed$/,
      ],
      [
        'an element of an unknown namespace',
        linuxDomain.replace('<devices>', "<devices>\n    <x:hook xmlns:x='urn:example:hook'/>"),
        /^domain\/devices\/x:hook is not allowed$/,
      ],
      [
        'an attribute of an unknown namespace',
        linuxDomain.replace("<domain type='kvm'>", "<domain type='kvm' xmlns:x='urn:example' x:run='1'>"),
        /^domain\/@x:run is not allowed$/,
      ],
      [
        'a domain in a namespace',
        "<x:domain xmlns:x='urn:example'><x:name>a</x:name></x:domain>",
        /not a libvirt domain/,
      ],
      [
        'host directory passthrough',
        withDevice("<filesystem type='mount'><source dir='/'/><target dir='root'/></filesystem>"),
        /^domain\/devices\/filesystem is not allowed$/,
      ],
      [
        'a host PCI device',
        withDevice("<hostdev mode='subsystem' type='pci'><source><address bus='0x3'/></source></hostdev>"),
        /^domain\/devices\/hostdev is not allowed$/,
      ],
      [
        'an ethernet card with a script',
        withDevice("<interface type='ethernet'><script path='/tmp/x.sh'/></interface>"),
        /^domain\/devices\/interface\/@type="ethernet" is not allowed$/,
      ],
      [
        'a bridge card with a script',
        withDevice("<interface type='bridge'><source bridge='br0'/><script path='/tmp/x.sh'/></interface>"),
        /^domain\/devices\/interface\/script is not allowed$/,
      ],
      [
        'a card naming the host tap device',
        withDevice("<interface type='bridge'><source bridge='br0'/><target dev='eth0'/></interface>"),
        /^domain\/devices\/interface\/target is not allowed$/,
      ],
      [
        'a card with a boot ROM file',
        withDevice("<interface type='network'><source network='prod'/><rom file='/etc/shadow'/></interface>"),
        /^domain\/devices\/interface\/rom\/@file is not allowed$/,
      ],
      [
        'a block-device disk that is not one of the replica’s (not replaced)',
        withDevice("<disk type='block' device='disk'><source dev='/dev/sda'/><target dev='vdc' bus='virtio'/></disk>"),
        /^disk vdc of the source definition is not one of the replica's disks$/,
      ],
      [
        'a network disk that is not one of the replica’s',
        withDevice(
          "<disk type='network' device='disk'><source protocol='nbd' name='x'><host name='h'/></source><target dev='vdd'/></disk>",
        ),
        /^disk vdd .* not one of the replica's disks$/,
      ],
      [
        'a SCSI passthrough LUN',
        withDevice("<disk type='block' device='lun'><source dev='/dev/sdb'/><target dev='sdz' bus='scsi'/></disk>"),
        /^domain\/devices\/disk\/@device="lun" is not allowed$/,
      ],
      [
        'a disk of the replica twice',
        withDevice("<disk type='file' device='disk'><target dev='vda' bus='virtio'/></disk>"),
        /^disk vda appears twice/,
      ],
      [
        'an encrypted disk (a host secret)',
        linuxDomain.replace(
          "<target dev='vdb' bus='virtio'/>",
          "<target dev='vdb' bus='virtio'/><encryption format='luks'/>",
        ),
        /^domain\/devices\/disk\/encryption is not allowed$/,
      ],
      [
        'a kernel outside the boot-file directories',
        linuxDomain.replace("<boot dev='hd'/>", '<kernel>/etc/shadow</kernel>'),
        /^domain\/os\/kernel "\/etc\/shadow" is not under a boot-file directory/,
      ],
      [
        "'..' in a boot file's path",
        linuxDomain.replace("<boot dev='hd'/>", '<initrd>/usr/share/qemu/../../../etc/shadow</initrd>'),
        /^domain\/os\/initrd ".*" is not a normalized absolute path/,
      ],
      [
        'a relative boot file',
        linuxDomain.replace("<boot dev='hd'/>", '<dtb>qemu/board.dtb</dtb>'),
        /^domain\/os\/dtb "qemu\/board\.dtb" is not a normalized absolute path/,
      ],
      [
        'firmware outside the boot-file directories',
        uefiDomain.replace('/usr/share/OVMF/OVMF_CODE_4M.ms.fd', '/root/evil.fd'),
        /^domain\/os\/loader "\/root\/evil\.fd" is not under/,
      ],
      [
        'an NVRAM template outside the boot-file directories',
        uefiDomain.replace('/usr/share/OVMF/OVMF_VARS_4M.ms.fd', '/etc/shadow'),
        /^domain\/os\/nvram\/@template "\/etc\/shadow" is not under/,
      ],
      [
        'an ACPI table outside the boot-file directories',
        linuxDomain.replace("<boot dev='hd'/>", "<acpi><table type='slic'>/etc/shadow</table></acpi>"),
        /^domain\/os\/acpi\/table "\/etc\/shadow" is not under/,
      ],
      [
        'a random-number device reading a host device',
        linuxDomain.replace('/dev/urandom', '/dev/hwrng'),
        /^domain\/devices\/rng\/backend text "\/dev\/hwrng" is not allowed$/,
      ],
      [
        'a random-number device on a socket',
        withDevice("<rng model='virtio'><backend model='egd' type='tcp'><source mode='connect'/></backend></rng>"),
        /^domain\/devices\/rng\/backend\/@model="egd" is not allowed$/,
      ],
      [
        'a serial port on TCP',
        withDevice("<serial type='tcp'><source mode='bind' host='0.0.0.0' service='4555'/></serial>"),
        /^domain\/devices\/serial\/@type="tcp" is not allowed$/,
      ],
      [
        'a serial port on UDP',
        withDevice("<serial type='udp'><source mode='connect' service='9'/></serial>"),
        /^domain\/devices\/serial\/@type="udp" is not allowed$/,
      ],
      [
        'a serial port on a host device',
        withDevice("<serial type='dev'><source path='/dev/ttyS0'/></serial>"),
        /^domain\/devices\/serial\/@type="dev" is not allowed$/,
      ],
      [
        'a channel with a socket path of its own',
        withDevice(
          "<channel type='unix'><source mode='bind' path='/run/evil.sock'/><target type='virtio' name='x.0'/></channel>",
        ),
        /^domain\/devices\/channel\/source\/@path is not allowed for type 'unix'$/,
      ],
      [
        'a guest-forwarding channel',
        withDevice("<channel type='pty'><target type='guestfwd' address='10.0.2.1' port='4600'/></channel>"),
        /^domain\/devices\/channel\/target\/@type="guestfwd" is not allowed$/,
      ],
      [
        'a console logging to a file of its own',
        withDevice("<console type='pty'><log file='/etc/cron.d/x'/><target type='virtio'/></console>"),
        /^domain\/devices\/console\/log is not allowed$/,
      ],
      [
        'a static security label',
        linuxDomain.replace(
          "<seclabel type='dynamic' model='dac' relabel='yes'/>",
          "<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>",
        ),
        /^domain\/seclabel\/@type="static" is not allowed/,
      ],
      [
        'no security label at all',
        linuxDomain.replace("<seclabel type='dynamic' model='dac' relabel='yes'/>", "<seclabel type='none'/>"),
        /^domain\/seclabel\/@type="none" is not allowed/,
      ],
      [
        'graphics on a socket path',
        withDevice("<graphics type='vnc' socket='/run/evil.sock'/>"),
        /^domain\/devices\/graphics\/@socket is not allowed$/,
      ],
      [
        'SPICE on a host render node',
        withDevice("<graphics type='spice'><gl enable='yes' rendernode='/dev/dri/renderD128'/></graphics>"),
        /^domain\/devices\/graphics\/gl is not allowed$/,
      ],
      [
        'a host input device',
        withDevice("<input type='passthrough' bus='virtio'><source evdev='/dev/input/event0'/></input>"),
        /^domain\/devices\/input\/@type="passthrough" is not allowed$/,
      ],
      [
        'a host TPM',
        withDevice("<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>"),
        /^domain\/devices\/tpm\/backend\/@type="passthrough" is not allowed$/,
      ],
      [
        'audio into a host file',
        withDevice("<audio id='2' type='file' path='/etc/motd'/>"),
        /^domain\/devices\/audio\/@type="file" is not allowed$/,
      ],
      [
        'a watchdog that dumps memory on the host',
        withDevice("<watchdog model='i6300esb' action='dump'/>"),
        /^domain\/devices\/watchdog\/@action="dump" is not allowed$/,
      ],
      [
        'a core dump on crash',
        linuxDomain.replace('<on_crash>destroy</on_crash>', '<on_crash>coredump-destroy</on_crash>'),
        /^domain\/on_crash text "coredump-destroy" is not allowed$/,
      ],
      ['a smartcard', withDevice("<smartcard mode='passthrough' type='spicevmc'/>"), /^domain\/devices\/smartcard is/],
      ['USB redirection', withDevice("<redirdev bus='usb' type='spicevmc'/>"), /^domain\/devices\/redirdev is/],
      ['shared memory', withDevice("<shmem name='ivshmem'/>"), /^domain\/devices\/shmem is not allowed$/],
      [
        'firmware configuration files',
        linuxDomain.replace("<sysinfo type='smbios'>", "<sysinfo type='fwcfg'>"),
        /^domain\/sysinfo\/@type="fwcfg" is not allowed$/,
      ],
      ['a cgroup escape', linuxDomain.replace('/machine', '/machine/../..'), /^domain\/resource\/partition text/],
      ['an unknown element', linuxDomain.replace('<pm>', '<pm><hibernate/>'), /^domain\/pm\/hibernate is not allowed/],
      [
        'a processing instruction',
        linuxDomain.replace('<features>', '<features><?evil x?>'),
        /^domain\/features holds a processing instruction \(evil\)/,
      ],
      [
        'text where none belongs',
        linuxDomain.replace('<features>', '<features>run me'),
        /^domain\/features holds text/,
      ],
      [
        'an internal entity',
        `<!DOCTYPE domain [<!ENTITY p "/etc/shadow">]>${linuxDomain.replace('/dev/urandom', '&p;')}`,
        /not well-formed XML|DOCTYPE/,
      ],
      ['a DOCTYPE', `<!DOCTYPE domain>${linuxDomain}`, /^the source definition has a DOCTYPE/],
      ['XML that is not well-formed', '<domain><name>a</domain>', /not well-formed XML/],
      ['not a domain', '<vm/>', /not a libvirt domain/],
      ['a domain without a name', linuxDomain.replace('<name>erp01</name>', ''), /has no name/],
      [
        'a replica disk the definition lacks',
        linuxDomain.replace(/<disk type='file' device='disk'>[\s\S]*?<\/disk>/, ''),
        /has no disk vdb of the replica/,
      ],
    ];
    for (const [what, source, message] of cases)
      test(what, () => assert.throws(() => domainXml(source, spec), refusal(message)));

    test("a request's definition is refused with the agent's 400 naming body.definition.text", () => {
      const source = cases[0]![1];
      assert.throws(
        () => domainXmlOfRequest(source, spec),
        (e: unknown) =>
          e instanceof HostApiError &&
          e.status === 400 &&
          e.field === 'body.definition.text' &&
          e.message === 'body.definition.text: domain/qemu:commandline is not allowed',
      );
    });
  });

  describe('boot files through symlinks', () => {
    const boot = join(tmp, 'boot');
    mkdirSync(boot);
    writeFileSync(join(boot, 'vmlinuz'), '');
    symlinkSync('/etc', join(boot, 'etc'));
    symlinkSync(join(tmp, 'nowhere'), join(boot, 'gone'));
    symlinkSync(join(boot, 'vmlinuz'), join(boot, 'current'));
    const at = (kernel: string) =>
      domainXml(linuxDomain.replace("<boot dev='hd'/>", `<kernel>${kernel}</kernel>`), {
        ...spec,
        bootFileDirs: [boot],
      });

    test('a file in the directory, or a symlink that stays in it, is allowed', () => {
      assert.match(at(join(boot, 'vmlinuz')), /<kernel>.*\/boot\/vmlinuz<\/kernel>/);
      assert.match(at(join(boot, 'current')), /<kernel>.*\/boot\/current<\/kernel>/);
    });

    test('a symlink out of the directory is refused', () => {
      assert.throws(() => at(join(boot, 'etc', 'shadow')), refusal(/^domain\/os\/kernel ".*" is not under/));
    });

    test('a dangling symlink is refused: where it leads could appear later', () => {
      assert.throws(() => at(join(boot, 'gone', 'vmlinuz')), refusal(/leads through a dangling symlink/));
    });

    test('the directory itself is no boot file', () => {
      assert.throws(() => at(boot), refusal(/is not under a boot-file directory/));
    });
  });

  test('a redefinition keeps the UUID libvirt gave the replica', () => {
    const xml = domainXml(linuxDomain, { ...spec, uuid: '0b7c2f0e-1111-4222-8333-944455556666' });
    assert.match(xml, /<name>erp01_replica<\/name>\n {2}<uuid>0b7c2f0e-1111-4222-8333-944455556666<\/uuid>/);
    assert.equal([...xml.matchAll(/<uuid>/g)].length, 1);
  });

  test('names and paths are escaped, not pasted into the XML', () => {
    const xml = domainXml(linuxDomain, { ...spec, consoleLog: "/dr/a'b&c.log" });
    assert.match(xml, /path='\/dr\/a&apos;b&amp;c\.log'/);
  });

  // Mutations of the realistic definitions: an element or attribute that is on no allow-list, put anywhere, is
  // refused naming its path, or it is inside something the agent drops or replaces and leaves no trace.
  describe('whatever is added anywhere is refused or leaves no trace', () => {
    let seed = 20261207;
    const random = (n: number) => {
      seed = (Math.imul(seed ^ (seed >>> 15), 0x2c1b3c6d) + 0x6d2b79f5) | 0;
      return (seed >>> 0) % n;
    };
    const additions = ['hostdev', 'filesystem', 'shmem', 'script', 'pfevil'];
    for (const [name, source, s] of [
      ['Linux', linuxDomain, spec],
      ['UEFI', uefiDomain, uefiSpec],
      ['Windows', windowsDomain, windowsSpec],
    ] as const)
      test(`${name}: 150 mutations`, () => {
        let refused = 0;
        for (let i = 0; i < 150; i++) {
          const doc = new DOMParser().parseFromString(source, 'text/xml');
          const all = Array.from(doc.getElementsByTagName('*')).filter((e) => e.namespaceURI === null);
          const target = all[random(all.length)]!;
          const path = (el: Element): string =>
            el.parentNode && el.parentNode.nodeType === 1
              ? `${path(el.parentNode as Element)}/${el.tagName}`
              : el.tagName;
          let expected: string;
          if (random(2) === 0) {
            const added = doc.createElement(additions[random(additions.length)]!);
            added.setAttribute('marker', 'pfevil');
            target.appendChild(added);
            expected = `${path(target)}/${added.tagName} is not allowed`;
          } else {
            target.setAttribute('pfevil', '/etc/shadow');
            expected = `${path(target)}/@pfevil is not allowed`;
          }
          const mutated = new XMLSerializer().serializeToString(doc);
          try {
            const xml = domainXml(mutated, s);
            assert.doesNotMatch(
              xml,
              /pfevil|<(hostdev|filesystem|shmem|script)\b|\/etc\/shadow/,
              `${expected} left a trace`,
            );
          } catch (e) {
            assert.ok(e instanceof DefinitionError, String(e));
            assert.equal(e.message, expected);
            refused++;
          }
        }
        assert.ok(refused > 100, `most additions land on checked elements (${refused} refused)`);
      });
  });
});
