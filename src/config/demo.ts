import { readFile } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { parseDocument } from 'yaml';
import { writeFileAtomic, exists } from '../host-api/persist';
import { createUserKey, loadUserKey, publicKeyLine, userKeyDir, userKeyFile } from '../identity/keys';

/** The demo site's configurations as committed: every setting but its users' public keys, which are this machine's. */
export const DEMO_TEMPLATES = ['config/planned-failover.yaml', 'config/planned-failover-kvm.yaml'] as const;

/**
 * Where the demo's configuration with this machine's keys is written: beside `.data/certs`, one directory below the
 * project like the template, so the relative paths in it (the TLS files, the scheduler's key) mean the same.
 */
export const demoConfigurationOf = (template: string): string =>
  join(dirname(template), '..', '.data', basename(template));

export interface DemoConfiguration {
  file: string;
  /** The users whose keys were made now (first run). */
  madeKeys: string[];
}

/**
 * The demo's configuration, ready to use: each demo user's key pair made when missing (the private key in the
 * per-user configuration directory, as `failover keys create` makes it; the service identity's where the template's
 * scheduledRuns.key says), and the template written out with their public keys.
 */
export async function ensureDemoConfiguration(template: string, keyDir = userKeyDir()): Promise<DemoConfiguration> {
  const doc = parseDocument(await readFile(template, 'utf8'));
  const plain = doc.toJS() as { users?: { name: string }[]; scheduledRuns?: { requestedBy: string; key?: string } };
  const madeKeys: string[] = [];
  for (const [i, user] of (plain.users ?? []).entries()) {
    const service = plain.scheduledRuns?.requestedBy === user.name && plain.scheduledRuns.key;
    const file = service ? resolve(dirname(template), service) : userKeyFile(user.name, keyDir);
    if (!(await exists(file))) {
      await createUserKey(file);
      madeKeys.push(user.name);
    }
    doc.setIn(['users', i, 'keys'], doc.createNode([publicKeyLine(loadUserKey(file))], { flow: true }));
  }
  doc.commentBefore = ` Made by the demo from ${template}, with the public keys of this machine's demo users; edit that file.\n${doc.commentBefore ?? ''}`;
  const file = demoConfigurationOf(template);
  await writeFileAtomic(file, doc.toString({ lineWidth: 120 }));
  return { file, madeKeys };
}
