import type { Client } from '@temporalio/client';
import { SearchAttributes } from '../contract';
import { formatBytes } from './format';

interface CopyHeartbeat {
  disk?: string;
  bytesCopied?: number;
  bytesTotal?: number;
}

/**
 * Follows the sessions started by one workflow (children share its root id) and prints a line whenever a VM's
 * step changes, with the bytes copied so far while it copies. Returns a function that stops following.
 */
export function followSessions(
  client: Client,
  rootWorkflowId: string,
  print: (line: string) => void,
): () => Promise<void> {
  const seen = new Map<string, string>();
  let stopped = false;
  const poll = async () => {
    for await (const wf of client.workflow.list({ query: `RootWorkflowId="${rootWorkflowId}"` })) {
      if (wf.workflowId === rootWorkflowId) continue;
      const vm = wf.typedSearchAttributes.get(SearchAttributes.FailoverVm);
      if (!vm) continue; // visibility has not caught up with the session's first step yet
      const step = wf.typedSearchAttributes.get(SearchAttributes.FailoverStep) ?? 'Starting';
      let line = `${vm}: ${step}`;
      if (wf.status.name === 'RUNNING' && /Sync/.test(step)) {
        const described = await client.workflow.getHandle(wf.workflowId).describe();
        const copying = (described.raw.pendingActivities ?? [])
          .map((a) => {
            const payload = a.heartbeatDetails?.payloads?.[0];
            return payload
              ? client.options.loadedDataConverter.payloadConverter.fromPayload<CopyHeartbeat>(payload)
              : undefined;
          })
          .filter((h): h is CopyHeartbeat => h?.bytesTotal !== undefined);
        const copied = copying.reduce((n, h) => n + (h.bytesCopied ?? 0), 0);
        const total = copying.reduce((n, h) => n + (h.bytesTotal ?? 0), 0);
        if (total > 0) line += ` (${formatBytes(copied)} of ${formatBytes(total)})`;
      }
      if (seen.get(wf.workflowId) !== line) {
        seen.set(wf.workflowId, line);
        print(line);
      }
    }
  };
  const loop = (async () => {
    while (!stopped) {
      await poll().catch(() => undefined); // visibility lags and blips must not end the command
      await new Promise((r) => setTimeout(r, 500));
    }
  })();
  return async () => {
    stopped = true;
    await loop;
    await poll().catch(() => undefined);
  };
}
