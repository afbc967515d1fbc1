// Replays the recorded histories of every release (test/histories/<release>/, recorded once by
// `npm run record-history` and never again) against today's workflow code: a change that would break workflows
// already running when a worker is upgraded (entities live for months, a halted session for days) fails here.
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { Worker } from '@temporalio/worker';

const root = join(__dirname, 'histories');

/**
 * 52b01fc recorded 0.2.0/ again after the release, with an incompatible change to the final copy not behind
 * patched() (helper point 2 opened again only after a halt). That change is behind a marker now, and a history
 * without it takes the release's path (0.2.0-release/, which bd68b94 recorded): these four, whose first final copy
 * ran without a halt, cannot replay with the release's histories, and fail exactly there (histories/README.md).
 */
const recordedOverTheRelease = new Set(
  [
    'planned-failover-session.json',
    'planned-failover-session-halted-abort.json',
    'planned-failover-session-halted-force.json',
    'planned-failover-session-halted-retry.json',
  ].map((f) => `0.2.0/${f}`),
);
const releasePathTaken =
  /Activity type of scheduled event 'copyDisk' does not match activity type of activity command 'beginRestorePoint'/;
const releases = readdirSync(root)
  .filter((d) => statSync(join(root, d)).isDirectory())
  .sort();

describe('every release’s recorded histories replay with the current workflow code', () => {
  it('has histories to replay', () => assert.ok(releases.length > 0, 'no test/histories/<release>/ directory'));

  for (const release of releases) {
    const dir = join(root, release);
    for (const file of readdirSync(dir).filter((f) => f.endsWith('.json'))) {
      it(`${release}/${file}`, async () => {
        const history: unknown = JSON.parse(readFileSync(join(dir, file), 'utf8'));
        const codePath = process.env.PF_TEST_WORKFLOW_BUNDLE;
        const replay = Worker.runReplayHistory(
          codePath ? { workflowBundle: { codePath } } : { workflowsPath: require.resolve('../src/workflows') },
          history,
        );
        if (recordedOverTheRelease.has(`${release}/${file}`)) await assert.rejects(replay, releasePathTaken);
        else await replay;
      });
    }
  }
});
