// What the test proxies in front of the lab share (test/crash-harness.ts, test/chaos/recorder.ts): a call passed
// on to the lab as it came, cut when its caller goes away.
import http from 'node:http';

/** Opens the same call on `target`; the caller sends its body into `upstream` and awaits `answered`. */
export function forwardTo(
  target: URL,
  agent: http.Agent,
  req: http.IncomingMessage,
  res: http.ServerResponse,
): { upstream: http.ClientRequest; answered: Promise<http.IncomingMessage> } {
  const upstream = http.request(new URL(req.url ?? '/', target), { method: req.method, headers: req.headers, agent });
  res.once('close', () => {
    if (!res.writableFinished) upstream.destroy();
  });
  const answered = new Promise<http.IncomingMessage>((resolve, reject) => {
    upstream.once('response', resolve);
    upstream.once('error', reject);
  });
  return { upstream, answered };
}
