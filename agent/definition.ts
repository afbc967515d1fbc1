// The libvirt domain of a replica (on a DR host, at each power-on) or of a new VM (failback to a new VM, on a
// production host), made from the source domain's definition, which arrives over the network. The host process
// runs as root and `virsh define` gives a definition the host's devices, files and QEMU's command line, so the
// definition is parsed and a *new* document is built from an allow-list of what an ordinary Linux or Windows guest
// has (what `virsh dumpxml --inactive` writes for it). Anything else is refused, naming its path
// (`domain/devices/hostdev is not allowed`). What the agent takes from the definition on the host's side:
//
// - disks: the source's paths are another host's; each disk boots from the agent's own image, CD-ROM and floppy
//   drives are left empty, the backing chain (`backingStore`) is the agent's;
// - `<loader>`, `<kernel>`, `<initrd>`, `<dtb>`, ACPI tables and the NVRAM template: files under one of the host's
//   boot-file directories (its setting), checked after symlinks are resolved;
// - `<nvram>`: a file of this domain's own in the agent's storage (the source's is another host's, and a new VM
//   beside its original must not share it);
// - file consoles: this domain's own log; socket channels: paths libvirt picks;
// - network cards: of type network or bridge only; the source's MAC addresses only when the caller says the source
//   is off (this domain is then the machine), new stable ones otherwise (the source may run on the same network).
//
// Dropped without a word, as noise for the domain or as what describes the source's host rather than the machine:
// `<metadata>` (tools' notes), `<uuid>` (the domain has its own), the `<genid>` value (libvirt makes a new one: the
// guest may be a copy or an older point), `<emulator>` (libvirt picks this host's QEMU for the machine type),
// `<seclabel type='dynamic'>` (the host's own labelling applies; any other seclabel is refused), and host placement
// (`vcpu/@cpuset`, pinning and scheduling in `<cputune>`, `<numatune>`): CPUs and NUMA nodes of the source's host.
// Device addresses are kept: a guest's device order depends on them.
import { createHash } from 'node:crypto';
import { lstatSync, realpathSync } from 'node:fs';
import { dirname, isAbsolute, relative, resolve, sep } from 'node:path';
import { DOMParser, type Element } from '@xmldom/xmldom';
import { badRequest } from '../src/host-api/errors';

export class DefinitionError extends Error {}

/** Where boot files (firmware, kernels, initrds) may come from unless the host process is told otherwise. */
export const DEFAULT_BOOT_FILE_DIRS: readonly string[] = [
  '/usr/share/OVMF',
  '/usr/share/qemu',
  '/usr/share/seabios',
  '/usr/lib/ipxe/qemu',
  '/var/lib/libvirt/boot',
];

export interface DomainSpec {
  /** The domain's name (the replica's, or the new VM's). */
  name: string;
  /** The domain's own UUID once libvirt gave it one: a redefinition keeps it. */
  uuid?: string;
  /** Target device (`vda`) → the image the domain boots from for it; every one must be a disk of the definition. */
  disks: ReadonlyMap<string, string>;
  /** Where file-backed serial consoles and channels go on this host. */
  consoleLog: string;
  /** The domain's own UEFI variable store (libvirt makes it from the template when it is missing). */
  nvram: string;
  /** Directories that firmware, kernels, initrds, device trees and NVRAM templates may be read from. */
  bootFileDirs: readonly string[];
  /**
   * `source`: the source's MAC addresses, for a domain that is the machine itself while the source is off (planned
   * failover). `own`: new ones, the same at every definition of this name, for a domain that may run beside its
   * source (regular failover, failback to a new VM).
   */
  macs: 'source' | 'own';
}

/** An element of the new definition: only names, attributes and text that the allow-list let through. */
interface XmlNode {
  name: string;
  attrs: [string, string][];
  children: XmlNode[];
  text?: string;
}

/** Allowed values of an attribute or of an element's text. */
type Values = RegExp | readonly string[];

interface Rule {
  /** Allowed attributes with their values; `null`: accepted and left out of the new definition. */
  attrs?: Readonly<Record<string, Values | null>>;
  /** The text the element may hold; it holds none when absent. */
  text?: Values;
  children?: Readonly<Record<string, Rule>>;
  /** Makes the element's part of the new definition itself (replaced, checked against the host, dropped: null). */
  make?: (el: Element, at: string, ctx: Context) => XmlNode | null;
}

interface Context {
  spec: DomainSpec;
  /** Network cards seen so far (the next one's index) and the MAC addresses given out. */
  interfaces: number;
  macs: Set<string>;
  /** Target devices of the disks made so far. */
  disks: Set<string>;
}

function refuse(message: string): never {
  throw new DefinitionError(message);
}

const own = <T>(record: Readonly<Record<string, T>> | undefined, key: string): T | undefined =>
  record && Object.hasOwn(record, key) ? record[key] : undefined;

const allows = (values: Values, value: string): boolean =>
  values instanceof RegExp ? values.test(value) : values.includes(value);

const shown = (value: string): string => JSON.stringify(value.length > 80 ? `${value.slice(0, 80)}…` : value);

// Values --------------------------------------------------------------------------------------------------------
const NUM = /^\d{1,20}$/;
const SIGNED = /^-?\d{1,20}$/;
const HEX = /^(0x[0-9a-fA-F]{1,16}|\d{1,20})$/;
const YES_NO = ['yes', 'no'];
const ON_OFF = ['on', 'off'];
/** Model, machine, CPU model and feature names, keymaps: one word. */
const TOKEN = /^[A-Za-z0-9][A-Za-z0-9_.+:-]{0,127}$/;
/** libvirt networks, bridges, port groups, network filters: names on this host's side, one word. */
const HOST_NAME = /^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$/;
const CPU_SET = /^[0-9][0-9,^-]{0,255}$/;
const UNIT = /^(b|bytes|[KMGTPE](i?B)?|[kmgtpe])$/;
const MAC = /^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$/;
const IP_ADDRESS = /^([0-9]{1,3}(\.[0-9]{1,3}){3}|[0-9a-fA-F:]{2,39})$/;
/** Text that is the guest's own business (a title, a kernel command line, SMBIOS strings). */
const ANY = /^[\s\S]{0,65536}$/;
/** libvirt keeps only user aliases (`ua-…`) in a persistent definition. */
const USER_ALIAS = /^ua-[A-Za-z0-9_-]{1,60}$/;
/** A cgroup partition: absolute, no segment starting with a dot (so no `..`). */
const PARTITION = /^(\/[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}){1,8}$/;

const empty: Rule = {};
const DROP: Rule = { make: () => null };
const state: Rule = { attrs: { state: ON_OFF } };
const sized: Rule = { attrs: { unit: UNIT }, text: NUM };
const number: Rule = { text: NUM };
const states = (...names: string[]): Record<string, Rule> => Object.fromEntries(names.map((n) => [n, state]));

const address: Rule = {
  attrs: {
    type: ['pci', 'drive', 'virtio-serial', 'ccid', 'usb', 'isa', 'spapr-vio', 'ccw', 'virtio-mmio', 'unassigned'],
    domain: HEX,
    bus: HEX,
    slot: HEX,
    function: HEX,
    multifunction: ON_OFF,
    controller: NUM,
    target: NUM,
    unit: NUM,
    port: /^\d{1,3}(\.\d{1,3}){0,4}$/,
    reg: HEX,
    iobase: HEX,
    irq: HEX,
    cssid: HEX,
    ssid: HEX,
    devno: HEX,
  },
  children: { zpci: { attrs: { uid: HEX, fid: HEX } } },
};
const virtioDriver: Rule = { attrs: { iommu: ON_OFF, ats: ON_OFF, packed: ON_OFF, page_per_vq: ON_OFF } };
/** What every device may carry: where it sits on its bus, a user alias, its place in the boot order. */
const placed = {
  address,
  alias: { attrs: { name: USER_ALIAS } },
  boot: { attrs: { order: NUM, loadparm: TOKEN } },
  acpi: { attrs: { index: NUM } },
};
const VIRTIO_MODELS = ['virtio', 'virtio-transitional', 'virtio-non-transitional'];

// What the agent takes from the host's side ---------------------------------------------------------------------

function isUnder(file: string, dir: string): boolean {
  const rel = relative(dir, file);
  return rel !== '' && !isAbsolute(rel) && rel.split(sep)[0] !== '..';
}

/**
 * The path with every symlink resolved; when the file does not exist yet, those of its longest existing prefix.
 * A dangling symlink is refused: where it leads could appear later.
 */
function realPath(path: string, at: string): string {
  const present = (p: string) => lstatSync(p, { throwIfNoEntry: false }) !== undefined;
  let existing = path;
  while (!present(existing)) existing = dirname(existing);
  try {
    return resolve(realpathSync.native(existing), relative(existing, path));
  } catch {
    return refuse(`${at} ${shown(path)} leads through a dangling symlink (${existing})`);
  }
}

/** A boot file named by the definition: a normalized absolute path under one of the host's boot-file directories. */
function bootFile(path: string, at: string, dirs: readonly string[]): string {
  if (!isAbsolute(path) || resolve(path) !== path)
    refuse(`${at} ${shown(path)} is not a normalized absolute path (no '..', '.', '//' or trailing '/')`);
  const real = realPath(path, at);
  const allowed = dirs.some((d) => {
    const dir = resolve(d);
    let realDir = dir;
    try {
      realDir = realpathSync.native(dir);
    } catch {
      // a directory this host does not have: nothing in it exists either
    }
    return isUnder(path, dir) && isUnder(real, realDir);
  });
  if (!allowed) refuse(`${at} ${shown(path)} is not under a boot-file directory of this host (${dirs.join(', ')})`);
  return path;
}

/** A MAC address of this domain's own, the same at every definition of the name; never one in `taken`. */
function ownMac(name: string, index: number, taken: ReadonlySet<string>): string {
  for (let attempt = 0; ; attempt++) {
    const h = createHash('sha256').update(`${name}\n${index}\n${attempt}`).digest();
    const mac = ['52', '54', '00', ...[h[0]!, h[1]!, h[2]!].map((b) => b.toString(16).padStart(2, '0'))].join(':');
    if (!taken.has(mac)) return mac;
  }
}

const attrOf = (node: XmlNode, name: string): string | undefined => node.attrs.find(([k]) => k === name)?.[1];
function setAttr(node: XmlNode, name: string, value: string): void {
  const at = node.attrs.find(([k]) => k === name);
  if (at) at[1] = value;
  else node.attrs.push([name, value]);
}
const childOf = (node: XmlNode, name: string): XmlNode | undefined => node.children.find((c) => c.name === name);

// Elements whose part the agent makes itself --------------------------------------------------------------------

/** A file element's text checked as a boot file (an empty `<loader/>` lets libvirt pick the firmware). */
const bootFileRule = (attrs: Rule['attrs'] = {}): Rule => ({
  make: (el, at, ctx) => {
    const node = copy(el, { attrs, text: ANY }, at, ctx);
    if (node.text !== undefined && node.text !== '') node.text = bootFile(node.text, at, ctx.spec.bootFileDirs);
    return node;
  },
});

const nvram: Rule = {
  make: (el, at, ctx) => {
    const node = copy(
      el,
      { attrs: { template: ANY, format: ['raw', 'qcow2'], templateFormat: ['raw', 'qcow2'] }, text: ANY },
      at,
      ctx,
    );
    const template = attrOf(node, 'template');
    if (template !== undefined) setAttr(node, 'template', bootFile(template, `${at}/@template`, ctx.spec.bootFileDirs));
    node.text = ctx.spec.nvram;
    return node;
  },
};

const disk: Rule = {
  make: (el, at, ctx) => {
    const node = copy(el, diskChecked, at, ctx);
    setAttr(node, 'type', 'file');
    const device = attrOf(node, 'device') ?? 'disk';
    if (device !== 'disk') return node; // a CD-ROM or floppy drive, left empty
    const dev = childOf(node, 'target') && attrOf(childOf(node, 'target')!, 'dev');
    if (!dev) refuse('a disk of the source definition has no target device');
    const image = ctx.spec.disks.get(dev);
    if (image === undefined) refuse(`disk ${dev} of the source definition is not one of the replica's disks`);
    if (ctx.disks.has(dev)) refuse(`disk ${dev} appears twice in the source definition`);
    ctx.disks.add(dev);
    let driver = childOf(node, 'driver');
    if (!driver) node.children.unshift((driver = { name: 'driver', attrs: [['name', 'qemu']], children: [] }));
    setAttr(driver, 'type', 'qcow2');
    node.children.splice(node.children.indexOf(driver) + 1, 0, {
      name: 'source',
      attrs: [['file', image]],
      children: [],
    });
    return node;
  },
};
const diskChecked: Rule = {
  attrs: {
    type: ['file', 'block', 'network', 'volume'],
    device: ['disk', 'cdrom', 'floppy'],
    snapshot: ['no', 'internal', 'external'],
    model: VIRTIO_MODELS,
  },
  children: {
    // The disk's contents are the agent's: the source's paths and chain are another host's.
    source: DROP,
    backingStore: DROP,
    driver: {
      attrs: {
        name: ['qemu'],
        type: TOKEN,
        cache: ['default', 'none', 'writethrough', 'writeback', 'directsync', 'unsafe'],
        io: ['threads', 'native', 'io_uring'],
        discard: ['unmap', 'ignore'],
        detect_zeroes: ['off', 'on', 'unmap'],
        error_policy: ['stop', 'report', 'ignore', 'enospace'],
        rerror_policy: ['stop', 'report', 'ignore'],
        ioeventfd: ON_OFF,
        event_idx: ON_OFF,
        copy_on_read: ON_OFF,
        iothread: NUM,
        queues: NUM,
        queue_size: NUM,
        ...virtioDriver.attrs,
      },
    },
    target: {
      attrs: {
        dev: /^[a-z]{2,3}[a-z0-9]{0,8}$/,
        bus: ['virtio', 'scsi', 'sata', 'ide', 'usb', 'fdc', 'sd'],
        tray: ['open', 'closed'],
        removable: ON_OFF,
        rotation_rate: NUM,
      },
    },
    readonly: empty,
    shareable: empty,
    transient: empty,
    serial: { text: /^[A-Za-z0-9_ .+-]{0,40}$/ },
    wwn: { text: /^[0-9a-fA-F]{16}$/ },
    vendor: { text: /^[\x20-\x7e]{0,8}$/ },
    product: { text: /^[\x20-\x7e]{0,16}$/ },
    blockio: { attrs: { logical_block_size: NUM, physical_block_size: NUM, discard_granularity: NUM } },
    geometry: { attrs: { cyls: NUM, heads: NUM, secs: NUM, trans: ['none', 'lba', 'auto'] } },
    iotune: {
      children: {
        ...Object.fromEntries(
          ['total', 'read', 'write'].flatMap((k) =>
            [
              'bytes_sec',
              'iops_sec',
              'bytes_sec_max',
              'iops_sec_max',
              'bytes_sec_max_length',
              'iops_sec_max_length',
            ].map((m) => [`${k}_${m}`, number]),
          ),
        ),
        size_iops_sec: number,
        group_name: { text: TOKEN },
      },
    },
    ...placed,
  },
};

const iface: Rule = {
  make: (el, at, ctx) => {
    const node = copy(el, interfaceChecked, at, ctx);
    const type = attrOf(node, 'type')!;
    const source = childOf(node, 'source');
    const other = type === 'network' ? 'bridge' : 'network';
    if (source && attrOf(source, other) !== undefined)
      refuse(`${at}/source/@${other} is not allowed for type '${type}'`);
    if (source && type === 'bridge' && attrOf(source, 'portgroup') !== undefined)
      refuse(`${at}/source/@portgroup is not allowed for type 'bridge'`);
    const index = ctx.interfaces++;
    let mac = childOf(node, 'mac');
    const sourceMac = mac && attrOf(mac, 'address')?.toLowerCase();
    if (ctx.spec.macs === 'source') return node;
    if (!mac) node.children.unshift((mac = { name: 'mac', attrs: [], children: [] }));
    const taken = new Set([...ctx.macs, ...(sourceMac ? [sourceMac] : [])]);
    const address = ownMac(ctx.spec.name, index, taken);
    ctx.macs.add(address);
    mac.attrs = [['address', address]];
    return node;
  },
};
const interfaceChecked: Rule = {
  attrs: { type: ['network', 'bridge'] },
  children: {
    mac: { attrs: { address: MAC } },
    source: { attrs: { network: HOST_NAME, bridge: HOST_NAME, portgroup: HOST_NAME } },
    model: { attrs: { type: TOKEN } },
    link: { attrs: { state: ['up', 'down'] } },
    mtu: { attrs: { size: NUM } },
    driver: {
      attrs: {
        name: ['vhost', 'qemu'],
        txmode: ['iothread', 'timer'],
        ioeventfd: ON_OFF,
        event_idx: ON_OFF,
        queues: NUM,
        rx_queue_size: NUM,
        tx_queue_size: NUM,
        ...virtioDriver.attrs,
      },
      children: {
        host: {
          attrs: Object.fromEntries(['csum', 'gso', 'tso4', 'tso6', 'ecn', 'ufo', 'mrg_rxbuf'].map((k) => [k, ON_OFF])),
        },
        guest: { attrs: Object.fromEntries(['csum', 'tso4', 'tso6', 'ecn', 'ufo'].map((k) => [k, ON_OFF])) },
      },
    },
    rom: { attrs: { bar: ON_OFF, enabled: YES_NO } },
    bandwidth: {
      children: Object.fromEntries(
        ['inbound', 'outbound'].map((k) => [k, { attrs: { average: NUM, peak: NUM, burst: NUM, floor: NUM } }]),
      ),
    },
    filterref: { attrs: { filter: HOST_NAME }, children: { parameter: { attrs: { name: TOKEN, value: TOKEN } } } },
    tune: { children: { sndbuf: number } },
    port: { attrs: { isolated: YES_NO } },
    ...placed,
  },
};

/** A character device (serial, console, parallel, channel): files go to this domain's log, sockets to libvirt's paths. */
function chardev(types: readonly string[], target: Rule): Rule {
  const checked: Rule = {
    attrs: { type: types },
    children: { source: { attrs: { path: ANY, append: ON_OFF, mode: ['bind'] } }, target, ...placed },
  };
  return {
    make: (el, at, ctx) => {
      const node = copy(el, checked, at, ctx);
      const type = attrOf(node, 'type')!;
      const source = childOf(node, 'source');
      if (type === 'file') {
        if (source && attrOf(source, 'mode') !== undefined) refuse(`${at}/source/@mode is not allowed for type 'file'`);
        if (source) setAttr(source, 'path', ctx.spec.consoleLog);
        else node.children.unshift({ name: 'source', attrs: [['path', ctx.spec.consoleLog]], children: [] });
      } else if (source) {
        // A pty or spice channel has no source; a socket channel's path is libvirt's to pick on this host.
        if (type !== 'unix') refuse(`${at}/source is not allowed for type '${type}'`);
        for (const a of ['path', 'append'])
          if (attrOf(source, a) !== undefined) refuse(`${at}/source/@${a} is not allowed for type 'unix'`);
      }
      return node;
    },
  };
}
const portTarget = (types: readonly string[]): Rule => ({
  attrs: { type: types, port: NUM },
  children: { model: { attrs: { name: TOKEN } } },
});

const seclabel: Rule = {
  make: (el, at) => {
    const type = el.getAttribute('type');
    // libvirt's own dynamic label is the host's business; a static one or none chooses what QEMU runs as.
    if (type === 'dynamic') return null;
    refuse(`${at}/@type=${shown(type ?? '')} is not allowed (only libvirt's own dynamic label)`);
  },
};

const rng: Rule = {
  attrs: { model: VIRTIO_MODELS },
  children: {
    rate: { attrs: { period: NUM, bytes: NUM } },
    backend: {
      make: (el, at, ctx) => {
        const node = copy(
          el,
          { attrs: { model: ['random', 'builtin'] }, text: ['/dev/urandom', '/dev/random'] },
          at,
          ctx,
        );
        if (attrOf(node, 'model') === 'builtin' && node.text !== undefined)
          refuse(`${at} of model 'builtin' holds a path`);
        return node;
      },
    },
    driver: virtioDriver,
    ...placed,
  },
};

const graphicsListen: Rule = {
  attrs: { type: ['address', 'network', 'none'], address: IP_ADDRESS, network: HOST_NAME, autoGenerated: YES_NO },
};
const graphics: Rule = {
  make: (el, at, ctx) => {
    const node = copy(el, graphicsChecked, at, ctx);
    if (attrOf(node, 'type') === 'vnc')
      for (const c of node.children) if (c.name !== 'listen') refuse(`${at}/${c.name} is not allowed for type 'vnc'`);
    return node;
  },
};
const graphicsChecked: Rule = {
  attrs: {
    type: ['vnc', 'spice'],
    port: SIGNED,
    tlsPort: SIGNED,
    websocket: SIGNED,
    autoport: YES_NO,
    listen: IP_ADDRESS,
    sharePolicy: ['allow-exclusive', 'force-shared', 'ignore'],
    keymap: TOKEN,
    defaultMode: ['any', 'secure', 'insecure'],
    passwdValidTo: /^[0-9T:+-]{1,32}$/,
    connected: ['keep', 'disconnect', 'fail'],
    powerControl: YES_NO,
  },
  children: {
    listen: graphicsListen,
    channel: { attrs: { name: TOKEN, mode: ['any', 'secure', 'insecure'] } },
    image: { attrs: { compression: TOKEN } },
    jpeg: { attrs: { compression: TOKEN } },
    zlib: { attrs: { compression: TOKEN } },
    playback: { attrs: { compression: ON_OFF } },
    streaming: { attrs: { mode: TOKEN } },
    clipboard: { attrs: { copypaste: YES_NO } },
    mouse: { attrs: { mode: ['server', 'client'] } },
    filetransfer: { attrs: { enable: YES_NO } },
  },
};

const audioStream: Rule = {
  attrs: { mixingEngine: YES_NO, fixedSettings: YES_NO, voices: NUM, bufferLength: NUM },
  children: { settings: { attrs: { frequency: NUM, channels: NUM, format: TOKEN } } },
};

const devices: Rule = {
  children: {
    // libvirt picks this host's own QEMU for the domain's type and machine.
    emulator: DROP,
    disk,
    controller: {
      attrs: {
        type: ['ide', 'fdc', 'scsi', 'sata', 'usb', 'pci', 'virtio-serial', 'isa'],
        index: NUM,
        model: TOKEN,
        ports: NUM,
        vectors: NUM,
      },
      children: {
        driver: {
          attrs: {
            queues: NUM,
            cmd_per_lun: NUM,
            max_sectors: NUM,
            ioeventfd: ON_OFF,
            event_idx: ON_OFF,
            iothread: NUM,
            ...virtioDriver.attrs,
          },
        },
        model: { attrs: { name: TOKEN } },
        target: {
          attrs: {
            chassisNr: NUM,
            chassis: NUM,
            port: HEX,
            busNr: NUM,
            index: NUM,
            hotplug: ON_OFF,
            memReserve: NUM,
          },
          children: { node: number },
        },
        master: { attrs: { startport: NUM } },
        pcihole64: sized,
        ...placed,
      },
    },
    interface: iface,
    serial: chardev(
      ['file', 'pty'],
      portTarget(['isa-serial', 'usb-serial', 'pci-serial', 'spapr-vio-serial', 'system-serial', 'sclp-serial']),
    ),
    console: chardev(['file', 'pty'], portTarget(['serial', 'virtio'])),
    parallel: chardev(['file', 'pty'], portTarget([])),
    channel: chardev(['file', 'pty', 'unix', 'spicevmc'], {
      attrs: { type: ['virtio'], name: TOKEN, state: null },
    }),
    input: {
      attrs: {
        type: ['tablet', 'mouse', 'keyboard'],
        bus: ['ps2', 'usb', 'virtio', 'xen', 'none'],
        model: VIRTIO_MODELS,
      },
      children: { driver: virtioDriver, ...placed },
    },
    graphics,
    video: {
      children: {
        model: {
          attrs: {
            type: ['vga', 'cirrus', 'vmvga', 'qxl', 'virtio', 'bochs', 'ramfb', 'none'],
            vram: NUM,
            ram: NUM,
            vgamem: NUM,
            vram64: NUM,
            heads: NUM,
            primary: YES_NO,
          },
          children: { resolution: { attrs: { x: NUM, y: NUM } } },
        },
        ...placed,
      },
    },
    sound: {
      attrs: {
        model: ['ich6', 'ich7', 'ich9', 'ac97', 'es1370', 'sb16', 'pcspk', 'usb'],
        multichannel: YES_NO,
        streams: NUM,
      },
      children: { codec: { attrs: { type: ['duplex', 'micro', 'output'] } }, audio: { attrs: { id: NUM } }, ...placed },
    },
    // Only backends with no host path or device: none, or through the SPICE connection.
    audio: { attrs: { id: NUM, type: ['none', 'spice'] }, children: { input: audioStream, output: audioStream } },
    memballoon: {
      attrs: { model: [...VIRTIO_MODELS, 'xen', 'none'], autodeflate: ON_OFF, freePageReporting: ON_OFF },
      children: { stats: { attrs: { period: NUM } }, driver: virtioDriver, ...placed },
    },
    rng,
    watchdog: {
      attrs: {
        model: ['i6300esb', 'ib700', 'diag288', 'itco'],
        action: ['reset', 'shutdown', 'poweroff', 'pause', 'none', 'inject-nmi'],
      },
      children: placed,
    },
    panic: { attrs: { model: ['isa', 'pseries', 'hyperv', 's390', 'pvpanic'] }, children: placed },
    // A TPM emulated by swtpm, whose state libvirt keeps per domain UUID (so this domain's own).
    tpm: {
      attrs: { model: ['tpm-tis', 'tpm-crb', 'spapr-tpm-proxy'] },
      children: {
        backend: {
          attrs: { type: ['emulator'], version: ['1.2', '2.0'], persistent_state: YES_NO },
          children: { active_pcr_banks: { children: states('sha1', 'sha256', 'sha384', 'sha512') } },
        },
        ...placed,
      },
    },
    hub: { attrs: { type: ['usb'] }, children: placed },
    vsock: {
      attrs: { model: VIRTIO_MODELS },
      children: { cid: { attrs: { auto: YES_NO, address: NUM } }, driver: virtioDriver, ...placed },
    },
    memory: {
      attrs: { model: ['dimm'], access: ['shared', 'private'], discard: YES_NO },
      children: { target: { children: { size: sized, node: number } }, ...placed },
    },
  },
};

const hyperv: Rule = {
  attrs: { mode: ['custom', 'passthrough'] },
  children: {
    ...states(
      'relaxed',
      'vapic',
      'vpindex',
      'runtime',
      'synic',
      'reset',
      'frequencies',
      'reenlightenment',
      'ipi',
      'evmcs',
      'avic',
      'emsr_bitmap',
      'xmm_input',
    ),
    spinlocks: { attrs: { state: ON_OFF, retries: NUM } },
    stimer: { attrs: { state: ON_OFF }, children: { direct: state } },
    tlbflush: { attrs: { state: ON_OFF }, children: { direct: state, extended: state } },
    vendor_id: { attrs: { state: ON_OFF, value: /^[A-Za-z0-9_ -]{0,12}$/ } },
  },
};

const features: Rule = {
  children: {
    acpi: empty,
    pae: empty,
    privnet: empty,
    apic: { attrs: { eoi: ON_OFF } },
    ...states('hap', 'pmu', 'vmport', 'vmcoreinfo', 'htm', 'pvspinlock', 'ps2', 'ccf-assist'),
    smm: { attrs: { state: ON_OFF }, children: { tseg: sized } },
    ioapic: { attrs: { driver: ['kvm', 'qemu'] } },
    gic: { attrs: { version: TOKEN } },
    kvm: {
      children: {
        ...states('hidden', 'hint-dedicated', 'poll-control', 'pv-ipi'),
        'dirty-ring': { attrs: { state: ON_OFF, size: NUM } },
      },
    },
    hyperv,
    msrs: { attrs: { unknown: ['ignore', 'fault'] } },
    'async-teardown': { attrs: { enabled: YES_NO } },
    tcg: { children: { 'tb-cache': sized } },
  },
};

const cpu: Rule = {
  attrs: {
    mode: ['host-model', 'host-passthrough', 'custom', 'maximum'],
    match: ['minimum', 'exact', 'strict'],
    check: ['none', 'partial', 'full'],
    migratable: ON_OFF,
  },
  children: {
    model: { attrs: { fallback: ['allow', 'forbid'], vendor_id: TOKEN }, text: TOKEN },
    vendor: { text: TOKEN },
    topology: { attrs: { sockets: NUM, dies: NUM, clusters: NUM, cores: NUM, threads: NUM } },
    feature: { attrs: { policy: ['force', 'require', 'optional', 'disable', 'forbid'], name: TOKEN } },
    cache: { attrs: { level: NUM, mode: ['emulate', 'passthrough', 'disable'] } },
    maxphysaddr: { attrs: { mode: ['emulate', 'passthrough'], bits: NUM, limit: NUM } },
    numa: {
      children: {
        cell: {
          attrs: {
            id: NUM,
            cpus: CPU_SET,
            memory: NUM,
            unit: UNIT,
            memAccess: ['shared', 'private'],
            discard: YES_NO,
          },
          children: { distances: { children: { sibling: { attrs: { id: NUM, value: NUM } } } } },
        },
      },
    },
  },
};

const os: Rule = {
  attrs: { firmware: ['efi', 'bios'] },
  children: {
    type: { attrs: { arch: TOKEN, machine: TOKEN }, text: ['hvm'] },
    firmware: { children: { feature: { attrs: { enabled: YES_NO, name: ['enrolled-keys', 'secure-boot'] } } } },
    loader: bootFileRule({
      readonly: YES_NO,
      secure: YES_NO,
      stateless: YES_NO,
      type: ['rom', 'pflash'],
      format: ['raw', 'qcow2'],
    }),
    nvram,
    kernel: bootFileRule(),
    initrd: bootFileRule(),
    dtb: bootFileRule(),
    cmdline: { text: ANY },
    boot: { attrs: { dev: ['hd', 'cdrom', 'fd', 'network'] } },
    bootmenu: { attrs: { enable: YES_NO, timeout: NUM } },
    smbios: { attrs: { mode: ['emulate', 'host', 'sysinfo'] } },
    bios: { attrs: { useserial: YES_NO, rebootTimeout: SIGNED } },
    acpi: { children: { table: bootFileRule({ type: ['slic', 'msdm'] }) } },
  },
};

const smbiosEntries: Rule = { children: { entry: { attrs: { name: TOKEN }, text: ANY } } };
const LIFECYCLE = ['destroy', 'restart', 'preserve', 'rename-restart'];

/** The allow-list: `<domain>` and everything it may hold. */
const domain: Rule = {
  attrs: { type: ['kvm', 'qemu'] },
  children: {
    name: { make: (_el, _at, ctx) => ({ name: 'name', attrs: [], children: [], text: ctx.spec.name }) },
    uuid: DROP,
    genid: { make: () => ({ name: 'genid', attrs: [], children: [] }) },
    title: { text: ANY },
    description: { text: ANY },
    metadata: DROP,
    maxMemory: { attrs: { slots: NUM, unit: UNIT }, text: NUM },
    memory: { attrs: { unit: UNIT, dumpCore: ON_OFF }, text: NUM },
    currentMemory: sized,
    memoryBacking: {
      children: {
        hugepages: { children: { page: { attrs: { size: NUM, unit: UNIT, nodeset: CPU_SET } } } },
        nosharepages: empty,
        locked: empty,
        source: { attrs: { type: ['file', 'anonymous', 'memfd'] } },
        access: { attrs: { mode: ['shared', 'private'] } },
        allocation: { attrs: { mode: ['immediate', 'ondemand'], threads: NUM } },
        discard: empty,
      },
    },
    memtune: { children: { hard_limit: sized, soft_limit: sized, swap_hard_limit: sized, min_guarantee: sized } },
    blkiotune: { children: { weight: number } },
    vcpu: { attrs: { placement: ['static', 'auto'], current: NUM, cpuset: null }, text: NUM },
    vcpus: {
      children: { vcpu: { attrs: { id: NUM, enabled: YES_NO, hotpluggable: YES_NO, order: NUM } } },
    },
    iothreads: number,
    iothreadids: { children: { iothread: { attrs: { id: NUM, thread_pool_min: NUM, thread_pool_max: NUM } } } },
    cputune: {
      children: {
        ...Object.fromEntries(
          [
            'shares',
            'period',
            'quota',
            'global_period',
            'global_quota',
            'emulator_period',
            'emulator_quota',
            'iothread_period',
            'iothread_quota',
          ].map((k) => [k, { text: SIGNED }]),
        ),
        ...Object.fromEntries(
          [
            'vcpupin',
            'emulatorpin',
            'iothreadpin',
            'vcpusched',
            'iothreadsched',
            'emulatorsched',
            'cachetune',
            'memorytune',
          ].map((k) => [k, DROP]),
        ),
      },
    },
    numatune: DROP,
    resource: { children: { partition: { text: PARTITION } } },
    sysinfo: {
      attrs: { type: ['smbios'] },
      children: {
        bios: smbiosEntries,
        system: smbiosEntries,
        baseBoard: smbiosEntries,
        chassis: smbiosEntries,
        processor: smbiosEntries,
        memory: smbiosEntries,
        oemStrings: { children: { entry: { text: ANY } } },
      },
    },
    os,
    features,
    cpu,
    clock: {
      attrs: {
        offset: ['utc', 'localtime', 'timezone', 'variable', 'absolute'],
        timezone: /^[A-Za-z0-9_+-]{1,32}(\/[A-Za-z0-9_+-]{1,32}){0,3}$/,
        adjustment: /^(-?\d{1,20}|reset)$/,
        basis: ['utc', 'localtime'],
        start: NUM,
      },
      children: {
        timer: {
          attrs: {
            name: ['platform', 'hpet', 'kvmclock', 'pit', 'rtc', 'tsc', 'hypervclock', 'armvtimer'],
            present: YES_NO,
            tickpolicy: ['delay', 'catchup', 'merge', 'discard'],
            track: ['boot', 'guest', 'wall', 'realtime'],
            frequency: NUM,
            mode: ['auto', 'native', 'emulate', 'paravirt', 'smpsafe'],
          },
          children: { catchup: { attrs: { threshold: NUM, slew: NUM, limit: NUM } } },
        },
      },
    },
    on_poweroff: { text: LIFECYCLE },
    on_reboot: { text: LIFECYCLE },
    on_crash: { text: LIFECYCLE },
    pm: {
      children: { 'suspend-to-mem': { attrs: { enabled: YES_NO } }, 'suspend-to-disk': { attrs: { enabled: YES_NO } } },
    },
    seclabel,
    devices,
  },
};

const ELEMENT_NODE = 1;
const TEXT_NODE = 3;
const CDATA_SECTION_NODE = 4;
const PROCESSING_INSTRUCTION_NODE = 7;
const COMMENT_NODE = 8;
const XMLNS = 'http://www.w3.org/2000/xmlns/';

/** The element checked against its rule: its attributes, text and children, each child by its own rule. */
function copy(el: Element, rule: Rule, at: string, ctx: Context): XmlNode {
  const node: XmlNode = { name: el.tagName, attrs: [], children: [] };
  for (const a of Array.from(el.attributes)) {
    if (a.namespaceURI === XMLNS) continue; // a namespace declaration: nothing of it is carried over
    const values = a.namespaceURI === null ? own(rule.attrs, a.name) : undefined;
    if (values === undefined) refuse(`${at}/@${a.name} is not allowed`);
    if (values === null) continue;
    if (!allows(values, a.value)) refuse(`${at}/@${a.name}=${shown(a.value)} is not allowed`);
    node.attrs.push([a.name, a.value]);
  }
  let text = '';
  let elements = false;
  for (const child of Array.from(el.childNodes)) {
    if (child.nodeType === ELEMENT_NODE) {
      elements = true;
      const c = child as Element;
      const path = `${at}/${c.tagName}`;
      const childRule = c.namespaceURI === null ? own(rule.children, c.tagName) : undefined;
      if (!childRule) refuse(`${path} is not allowed`);
      const made = childRule.make ? childRule.make(c, path, ctx) : copy(c, childRule, path, ctx);
      if (made) node.children.push(made);
    } else if (child.nodeType === TEXT_NODE || child.nodeType === CDATA_SECTION_NODE) {
      text += child.nodeValue ?? '';
    } else if (child.nodeType === PROCESSING_INSTRUCTION_NODE) {
      refuse(`${at} holds a processing instruction (${child.nodeName}), which is not allowed`);
    } else if (child.nodeType !== COMMENT_NODE) {
      refuse(`${at} holds ${child.nodeName}, which is not allowed`);
    }
  }
  if (rule.text && !elements) {
    if (text !== '' && !allows(rule.text, text)) refuse(`${at} text ${shown(text)} is not allowed`);
    if (text !== '') node.text = text;
  } else if (text.trim() !== '') {
    refuse(`${at} holds text, which is not allowed`); // whitespace between elements is only layout
  }
  return node;
}

export const escapeXml = (s: string): string =>
  s.replace(/[<>&'"]/g, (c) => ({ '<': '&lt;', '>': '&gt;', '&': '&amp;', "'": '&apos;', '"': '&quot;' })[c]!);

function serialize(node: XmlNode, indent = ''): string {
  const open = node.name + node.attrs.map(([k, v]) => ` ${k}='${escapeXml(v)}'`).join('');
  if (node.children.length > 0)
    return `${indent}<${open}>\n${node.children.map((c) => serialize(c, `${indent}  `)).join('\n')}\n${indent}</${node.name}>`;
  return node.text === undefined ? `${indent}<${open}/>` : `${indent}<${open}>${escapeXml(node.text)}</${node.name}>`;
}

function parse(source: string): Element {
  let problem: string | undefined;
  let root: Element | null;
  let doctype = false;
  try {
    const doc = new DOMParser({
      onError: (level, message) => {
        problem ??= `${level}: ${message}`;
        throw new DefinitionError(message); // stops the parser; xmldom wraps it
      },
    }).parseFromString(source, 'text/xml');
    doctype = doc.doctype !== null;
    root = doc.documentElement;
  } catch (e) {
    problem ??= (e as Error).message;
    root = null;
  }
  if (problem !== undefined) refuse(`the source definition is not well-formed XML (${problem})`);
  if (doctype) refuse('the source definition has a DOCTYPE, which is not allowed');
  if (!root || root.tagName !== 'domain' || root.namespaceURI !== null)
    refuse('the source definition is not a libvirt domain');
  return root;
}

/**
 * The file-backed disks of a domain as libvirt describes it (`virsh dumpxml`): target device and image path, read
 * from the XML, so that a path with spaces or commas is the path.
 */
export function fileDisksOf(xml: string): { target: string; source: string }[] {
  const out: { target: string; source: string }[] = [];
  const devices = [...elementsOf(parse(xml))].find((e) => e.tagName === 'devices');
  for (const disk of devices ? elementsOf(devices) : []) {
    if (disk.tagName !== 'disk' || disk.getAttribute('type') !== 'file') continue;
    if ((disk.getAttribute('device') ?? 'disk') !== 'disk') continue;
    const children = [...elementsOf(disk)];
    const target = children.find((e) => e.tagName === 'target')?.getAttribute('dev');
    const source = children.find((e) => e.tagName === 'source')?.getAttribute('file');
    if (target && source) out.push({ target, source });
  }
  return out;
}

function* elementsOf(parent: Element): Generator<Element> {
  for (let n = parent.firstChild; n !== null; n = n.nextSibling) if (n.nodeType === ELEMENT_NODE) yield n as Element;
}

/** The domain's XML, built anew from what the allow-list lets through; throws DefinitionError naming what it refused. */
export function domainXml(source: string, spec: DomainSpec): string {
  const root = parse(source);
  const ctx: Context = { spec, interfaces: 0, macs: new Set(), disks: new Set() };
  const node = copy(root, domain, 'domain', ctx);
  const name = node.children.findIndex((c) => c.name === 'name');
  if (name < 0) refuse('the source definition has no name');
  if (spec.uuid) node.children.splice(name + 1, 0, { name: 'uuid', attrs: [], children: [], text: spec.uuid });
  const missing = [...spec.disks.keys()].filter((d) => !ctx.disks.has(d));
  if (missing.length > 0) refuse(`the source definition has no disk ${missing.join(', ')} of the replica`);
  return `${serialize(node)}\n`;
}

/** domainXml of a definition that came in a request: one that cannot be made into the domain is a 400. */
export function domainXmlOfRequest(source: string, spec: DomainSpec): string {
  try {
    return domainXml(source, spec);
  } catch (e) {
    if (e instanceof DefinitionError) throw badRequest('body.definition.text', e.message);
    throw e;
  }
}
