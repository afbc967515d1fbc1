// Released histories are never re-recorded: test/histories/RELEASED holds the sha256 of every file of every release
// directory, and any difference between the two fails here (52b01fc re-recorded 0.2.0's files 45 minutes after the
// release, and nothing noticed).
import assert from 'node:assert/strict';
import { appendFileSync, cpSync, mkdtempSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { projectRoot } from '../../scripts/lib/dev-server';
import { readManifest, releasedHistoryProblems } from '../../scripts/lib/released-histories';

const root = join(projectRoot, 'test', 'histories');

describe('released histories', () => {
  const copies: string[] = [];
  after(() => copies.forEach((d) => rmSync(d, { recursive: true, force: true })));
  /** A copy of test/histories to break. */
  const copy = (): string => {
    const dir = mkdtempSync(join(tmpdir(), 'pf-histories-'));
    copies.push(dir);
    cpSync(root, dir, { recursive: true });
    return dir;
  };

  it('every release directory is listed with every file, each as released', () => {
    assert.deepEqual(releasedHistoryProblems(root), []);
    const manifest = readManifest(root);
    assert.ok(manifest.has('0.2.0-release'), 'the 0.2.0 release commit’s histories are listed');
    assert.equal(manifest.get('0.2.0-release')!.size, 23, '22 histories and the README saying where they come from');
  });

  it('a changed, removed or added file, or an unlisted directory, is named', () => {
    const dir = copy();
    appendFileSync(join(dir, '0.2.0-release', 'planned-failover-session.json'), ' ');
    unlinkSync(join(dir, '0.2.0', 'proxy-slots.json'));
    writeFileSync(join(dir, '0.2.0', 'extra.json'), '{}');
    cpSync(join(dir, '0.2.0'), join(dir, '0.3.0'), { recursive: true });
    const problems = releasedHistoryProblems(dir);
    assert.equal(problems.length, 4, problems.join('\n'));
    assert.match(
      problems.find((p) => p.startsWith('0.2.0-release/'))!,
      /planned-failover-session\.json changed/,
    );
    assert.ok(problems.includes('0.2.0/proxy-slots.json is gone'), problems.join('\n'));
    assert.ok(problems.includes('0.2.0/extra.json was added'), problems.join('\n'));
    assert.match(
      problems.find((p) => p.startsWith('0.3.0/'))!,
      /not in RELEASED/,
    );
  });

  it('a release directory that is gone, and a malformed manifest, are named', () => {
    const dir = copy();
    rmSync(join(dir, '0.2.0'), { recursive: true });
    assert.deepEqual(releasedHistoryProblems(dir), ['0.2.0/ is gone']);
    appendFileSync(join(dir, 'RELEASED'), 'not a digest line\n');
    assert.throws(() => releasedHistoryProblems(dir), /RELEASED line 46 is not/);
  });
});
