// Which addresses stay on this machine: the only ones where the host API may be spoken in plain HTTP.

/** Whether a host (a name, an IPv4 or IPv6 address, bracketed or not) is a loopback address. */
export function isLoopback(host: string): boolean {
  const h = host.toLowerCase().replace(/^\[(.*)\]$/, '$1');
  return h === 'localhost' || h === '::1' || /^127(\.\d{1,3}){3}$/.test(h) || /^::ffff:127(\.\d{1,3}){3}$/.test(h);
}
