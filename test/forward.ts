// What the test proxies in front of the lab share (test/crash-harness.ts, test/chaos/recorder.ts): they stand in
// for the lab, over mutual TLS with the lab's own certificate, and pass each call on to the lab as it came, with the
// tests' client certificate, cut when its caller goes away.
import { readFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import { readPrivateKeyFile, type ServerTlsFiles } from '../src/host-api/certificates';
import { hostApiHttps } from '../src/host-api/server';
import { testClientTls } from './tls';

/** A server that the workers take for the lab: the lab's TLS files, and the same refusal of unknown clients. */
export function standInForLab(tls: ServerTlsFiles, handler: http.RequestListener): https.Server {
  return https.createServer(hostApiHttps({ tls }, '127.0.0.1')!, handler);
}

/** Connections to the lab behind a proxy, presenting the tests' client certificate. */
export function labAgent(options: https.AgentOptions): https.Agent {
  const tls = testClientTls();
  return new https.Agent({
    ...options,
    ca: readFileSync(tls.ca),
    cert: readFileSync(tls.cert),
    key: readPrivateKeyFile(tls.key),
  });
}

/** Opens the same call on `target`; the caller sends its body into `upstream` and awaits `answered`. */
export function forwardTo(
  target: URL,
  agent: https.Agent,
  req: http.IncomingMessage,
  res: http.ServerResponse,
  /** The name the target's certificate proves: the lab proves `lab`, whatever address it is reached at. */
  servername = 'lab',
): { upstream: http.ClientRequest; answered: Promise<http.IncomingMessage> } {
  const upstream = https.request(new URL(req.url ?? '/', target), {
    method: req.method,
    headers: req.headers,
    agent,
    servername,
  });
  res.once('close', () => {
    if (!res.writableFinished) upstream.destroy();
  });
  const answered = new Promise<http.IncomingMessage>((resolve, reject) => {
    upstream.once('response', resolve);
    upstream.once('error', reject);
  });
  return { upstream, answered };
}
