import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { connectHypervisor } from '../../src/config/hypervisor';
import { parseConfiguration } from '../../src/config/load';
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
});
