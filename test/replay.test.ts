// Replays histories of real runs (recorded by `npm run record-history`) against today's workflow code:
// a change that would make running workflows non-deterministic fails here before it reaches a worker.
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { Worker } from '@temporalio/worker';

const dir = join(__dirname, 'histories');
const files = readdirSync(dir).filter((f) => f.endsWith('.json'));

describe('stored histories replay with the current workflow code', () => {
  it('has histories to replay', () => assert.ok(files.length > 0));

  for (const file of files) {
    it(file, async () => {
      const history: unknown = JSON.parse(readFileSync(join(dir, file), 'utf8'));
      const codePath = process.env.PF_TEST_WORKFLOW_BUNDLE;
      await Worker.runReplayHistory(
        codePath ? { workflowBundle: { codePath } } : { workflowsPath: require.resolve('../src/workflows') },
        history,
      );
    });
  }
});
