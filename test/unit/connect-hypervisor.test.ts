import assert from 'node:assert/strict';
import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { connectHypervisor } from '../../src/config/hypervisor';
import { parseConfiguration } from '../../src/config/load';
import { clientTlsFiles, ensureSite } from '../../src/host-api/certificates';
import { HostApiHypervisor } from '../../src/hypervisor/host-api-adapter';
import { RoutedHypervisor } from '../../src/hypervisor/routed';

const configWith = (prod: string, dr: string, backups: string) =>
  parseConfiguration(`
hosts:
  - { name: prod, role: production, adapter: { type: lab, url: '${prod}' } }
  - { name: dr, role: dr, adapter: { type: kvm, url: '${dr}' } }
backupRepository:
  adapter: { type: lab, url: '${backups}' }
proxies: [{ name: p1, slots: 1 }]
users: [{ name: alice, roles: [BackupAdministrator] }]
`);

describe('connectHypervisor', () => {
  it('gives the one client itself when every host and the backups share a server', () => {
    // Spelled differently, one server still.
    const port = connectHypervisor(
      configWith('http://127.0.0.1:7300', 'http://127.0.0.1:7300/', 'http://127.0.0.1:7300'),
    );
    assert.ok(port instanceof HostApiHypervisor);
    port.close();
  });

  it('routes by host when the hosts are served by different servers', async () => {
    const port = connectHypervisor(
      configWith('http://127.0.0.1:7300', 'http://127.0.0.1:7400', 'http://127.0.0.1:7300'),
    );
    assert.ok(port instanceof RoutedHypervisor);
    await assert.rejects(port.getVm({ host: 'elsewhere', vm: 'vm1' }), /host elsewhere not found/);
    port.close();
  });

  describe('over mutual TLS', () => {
    let dir: string;
    before(async () => {
      dir = mkdtempSync(join(tmpdir(), 'pf-connect-'));
      await ensureSite(dir, {}, ['workers']);
    });
    after(() => rmSync(dir, { recursive: true, force: true }));

    const httpsConfig = (tls: object) =>
      parseConfiguration(`
hosts:
  - { name: kvm01, role: production, adapter: { type: kvm, url: 'https://10.0.0.5:7400' } }
  - { name: kvm-dr01, role: dr, adapter: { type: kvm, url: 'https://10.0.0.6:7400' } }
proxies: [{ name: p1, slots: 1 }]
users: [{ name: alice, roles: [BackupAdministrator] }]
tls: ${JSON.stringify(tls)}
`);

    it('makes its https:// clients from the tls block (no "Protocol https: not supported")', () => {
      const port = connectHypervisor(httpsConfig(clientTlsFiles(dir, 'workers')));
      assert.ok(port instanceof RoutedHypervisor);
      port.close();
    });

    it('refuses a client key that group or others may read, naming the file, and one that is missing', () => {
      const files = clientTlsFiles(dir, 'workers');
      chmodSync(files.key, 0o644);
      try {
        assert.throws(
          () => connectHypervisor(httpsConfig(files)),
          (e: Error) =>
            e.message.startsWith(`tls.key: private key ${files.key} is readable by group or others (mode 0644)`) &&
            e.message.includes(`chmod 600 ${files.key}`),
        );
      } finally {
        chmodSync(files.key, 0o600);
      }
      assert.throws(
        () => connectHypervisor(httpsConfig({ ...files, cert: join(dir, 'nobody.crt') })),
        new RegExp(`^Error: tls\\.cert: ENOENT.*${join(dir, 'nobody.crt')}`),
      );
    });
  });
});
