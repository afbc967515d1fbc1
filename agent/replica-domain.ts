// The libvirt domain of a replica, made from the source domain's definition (which travels with every replication):
// the same machine (processors, memory, firmware or kernel, devices, network cards with their MAC addresses, since
// a replica runs only while its source is off) with its own name and identity, booting from the replica's disks on
// this host. libvirt writes its XML in one fixed form (`virsh dumpxml`), so the few elements we change are found by
// their tags; everything else is passed through untouched. A failback to a new VM makes that VM's domain on the
// production host the same way, from the definition its replica keeps.
import { badRequest } from '../src/host-api/errors';

export class ReplicaDefinitionError extends Error {}

export interface ReplicaDomainSpec {
  /** The replica's domain name. */
  name: string;
  /** Target device (`vda`) → the image the replica boots from for it; every replicated disk must be here. */
  disks: ReadonlyMap<string, string>;
  /** Where file-backed serial consoles and channels go on this host (the source's paths are on another machine). */
  consoleLog: string;
  /** The replica domain's own UUID once libvirt gave it one: a redefinition keeps it. */
  uuid?: string;
}

const escapeXml = (s: string): string =>
  s.replace(/[<>&'"]/g, (c) => ({ '<': '&lt;', '>': '&gt;', '&': '&amp;', "'": '&apos;', '"': '&quot;' })[c]!);

const attr = (element: string, name: string): string | undefined =>
  new RegExp(`\\s${name}=(['"])([^'"]*)\\1`).exec(element)?.[2];

const setAttr = (element: string, name: string, value: string): string =>
  attr(element, name) === undefined
    ? element.replace(/^<(\w+)/, `<$1 ${name}='${escapeXml(value)}'`)
    : element.replace(new RegExp(`(\\s${name}=)(['"])[^'"]*\\2`), `$1'${escapeXml(value)}'`);

/** `<source>` in either form, `<backingStore>` (the chain is ours now) in either form. */
const SOURCE = /<source\b[^>]*?(\/>|>[\s\S]*?<\/source>)/;
const BACKING_STORE = /\s*<backingStore\b[^>]*?(\/>|>[\s\S]*?<\/backingStore>)/g;

function replicaDisk(block: string, spec: ReplicaDomainSpec, seen: Set<string>): string {
  const open = /^<disk\b[^>]*>/.exec(block)![0];
  const device = attr(open, 'device') ?? 'disk';
  if (device === 'cdrom' || device === 'floppy') return block.replace(SOURCE, '').replace(BACKING_STORE, '');
  const target = /<target\b[^>]*>/.exec(block)?.[0];
  const dev = target ? attr(target, 'dev') : undefined;
  if (!dev) throw new ReplicaDefinitionError('a disk of the source definition has no target device');
  const image = spec.disks.get(dev);
  if (image === undefined)
    throw new ReplicaDefinitionError(`disk ${dev} of the source definition is not one of the replica's disks`);
  seen.add(dev);
  let out = block.replace(open, setAttr(open, 'type', 'file'));
  out = SOURCE.test(out)
    ? out.replace(SOURCE, `<source file='${escapeXml(image)}'/>`)
    : out.replace(/<target\b/, `<source file='${escapeXml(image)}'/>\n      <target`);
  out = out.replace(/<driver\b[^>]*>/, (driver) => setAttr(driver, 'type', 'qcow2'));
  return out.replace(BACKING_STORE, '');
}

/** The replica's domain XML; throws ReplicaDefinitionError when the source's cannot be made into one. */
export function replicaDomainXml(source: string, spec: ReplicaDomainSpec): string {
  if (!/^\s*(<\?xml[^>]*>\s*)?<domain\b/.test(source))
    throw new ReplicaDefinitionError('the source definition is not a libvirt domain');
  if (!/<name>[^<]*<\/name>/.test(source)) throw new ReplicaDefinitionError('the source definition has no name');
  const identity =
    `<name>${escapeXml(spec.name)}</name>` + (spec.uuid ? `\n  <uuid>${escapeXml(spec.uuid)}</uuid>` : '');
  let xml = source.replace(/\s*<uuid>[^<]*<\/uuid>/, '');
  xml = xml.replace(/<name>[^<]*<\/name>/, identity);
  const seen = new Set<string>();
  xml = xml.replace(/<disk\b[^>]*>[\s\S]*?<\/disk>/g, (block) => replicaDisk(block, spec, seen));
  const missing = [...spec.disks.keys()].filter((d) => !seen.has(d));
  if (missing.length > 0)
    throw new ReplicaDefinitionError(`the source definition has no disk ${missing.join(', ')} of the replica`);
  // File-backed character devices (serial, console, channels) write to this host's log instead of the source's path.
  return xml.replace(/<(serial|console|channel|parallel)\s+type='file'[^>]*>[\s\S]*?<\/\1>/g, (device) =>
    device.replace(/<source\b[^>]*?\/>/, (s) => setAttr(s, 'path', spec.consoleLog)),
  );
}

/** replicaDomainXml of a definition that came in a request: one that cannot be made into the domain is a 400. */
export function domainXmlOfRequest(source: string, spec: ReplicaDomainSpec): string {
  try {
    return replicaDomainXml(source, spec);
  } catch (e) {
    if (e instanceof ReplicaDefinitionError) throw badRequest('body.definition.text', e.message);
    throw e;
  }
}
