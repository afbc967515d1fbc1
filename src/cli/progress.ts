import type { Client } from '@temporalio/client';
import { replicaQueries, replicaWorkflowId, SearchAttributes, sessionQueries } from '../contract';
import { formatBytes } from './format';

interface CopyHeartbeat {
  disk?: string;
  bytesCopied?: number;
  bytesTotal?: number;
}

/** The SDK's built-in query for a workflow's current details (what `setCurrentDetails` said last). */
const WORKFLOW_METADATA_QUERY = '__temporal_workflow_metadata';

/** " (x of y)" for the copies the workflow runs now, from their last heartbeats; empty when it copies nothing. */
async function copyProgress(client: Client, workflowId: string): Promise<string> {
  const described = await client.workflow.getHandle(workflowId).describe();
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
  return total > 0 ? ` (${formatBytes(copied)} of ${formatBytes(total)})` : '';
}

/**
 * Runs `poll` every half second until stopped, then once more so the last state is printed. Visibility lags and
 * blips must not end the command, so a failed poll is only skipped.
 */
function pollUntilStopped(poll: () => Promise<void>): () => Promise<void> {
  let stopped = false;
  const loop = (async () => {
    while (!stopped) {
      await poll().catch(() => undefined);
      await new Promise((r) => setTimeout(r, 500));
    }
  })();
  return async () => {
    stopped = true;
    await loop;
    await poll().catch(() => undefined);
  };
}

/**
 * What an operator needs when a session halts in its critical window (the source is off, the replica not on, and
 * the command waits): the halt and the command that decides it, to run from another terminal.
 */
async function haltGuidance(client: Client, sessionWorkflowId: string): Promise<string> {
  const { halted } = await client.workflow.getHandle(sessionWorkflowId).query(sessionQueries.progress);
  if (!halted) return '';
  return (
    ` #${halted.id} at ${halted.step}: ${halted.reason}\n` +
    `    Waiting for a decision. From another terminal: npm run failover -- decide <retry|abort|forceFailover> ` +
    `--session ${sessionWorkflowId} --user <you> --reason <why>   (see: npm run failover -- decide --help)`
  );
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
  return pollUntilStopped(async () => {
    for await (const wf of client.workflow.list({ query: `RootWorkflowId="${rootWorkflowId}"` })) {
      if (wf.workflowId === rootWorkflowId) continue;
      const vm = wf.typedSearchAttributes.get(SearchAttributes.FailoverVm);
      if (!vm) continue; // visibility has not caught up with the session's first step yet
      const step = wf.typedSearchAttributes.get(SearchAttributes.FailoverStep) ?? 'Starting';
      let line = `${vm}: ${step}`;
      if (wf.status.name === 'RUNNING' && /Sync/.test(step)) line += await copyProgress(client, wf.workflowId);
      if (wf.status.name === 'RUNNING' && step === 'Halted') line += await haltGuidance(client, wf.workflowId);
      if (seen.get(wf.workflowId) !== line) {
        seen.set(wf.workflowId, line);
        print(line);
      }
    }
  });
}

/**
 * Follows an operation on replica/<vm> while it runs (the one requested by `requestedBy` for `reason`): prints
 * its step whenever it changes, with the bytes copied so far while it copies. A queued operation prints nothing
 * until its turn comes.
 */
export function followOperation(
  client: Client,
  vm: string,
  request: { requestedBy: string; reason: string },
  print: (line: string) => void,
): () => Promise<void> {
  let last = '';
  return pollUntilStopped(async () => {
    const view = await client.workflow.getHandle(replicaWorkflowId(vm)).query(replicaQueries.state);
    const session = view.currentSession;
    if (session?.requestedBy !== request.requestedBy || session.reason !== request.reason) return;
    const operation = client.workflow.getHandle(session.workflowId);
    const metadata = await operation.query<{ currentDetails?: string }>(WORKFLOW_METADATA_QUERY);
    if (!metadata.currentDetails) return;
    // The details are Markdown for the Web UI; the terminal gets them plain.
    const line = metadata.currentDetails.replace(/\*\*/g, '') + (await copyProgress(client, session.workflowId));
    if (line !== last) {
      last = line;
      print(line);
    }
  });
}
