// Replays the recorded histories of every release (test/histories/<release>/, recorded once by
// `npm run record-history` and never again) against today's workflow code: a change that would break workflows
// already running when a worker is upgraded (entities live for months, a halted session for days) fails here.
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { Worker } from '@temporalio/worker';

const root = join(__dirname, 'histories');
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
        await Worker.runReplayHistory(
          codePath ? { workflowBundle: { codePath } } : { workflowsPath: require.resolve('../src/workflows') },
          history,
        );
      });
    }
  }
});
