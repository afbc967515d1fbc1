import { Context, ApplicationFailure } from '@temporalio/activity';
import type { ProxyTransport } from '../config/schema';
import { FailureTypes, type RestorePointSummary } from '../contract';
import { NotFoundError, TrackingLostError } from '../hypervisor/errors';
import {
  BLOCK_SIZE,
  type DiskRef,
  type Extent,
  type ExtentData,
  type HypervisorPort,
  type ReplicaRef,
  type RestorePointKind,
  type VmRef,
} from '../hypervisor/port';
import { batchExtents, extentBytes, extentsFrom } from './copy-plan';
import { allPages, differingBlocks } from './extents';
import { withHypervisorFailures } from './failures';
import { heartbeatWhile } from './heartbeat';
import { summarizePoint } from './inventory';

/** Where a disk's blocks are read from: a checkpoint of the running source VM, or a backup point. */
export type CopySource =
  | { kind: 'checkpoint'; vm: VmRef; checkpointId: string; baseReferencePointId: string | null }
  | { kind: 'backup'; backupId: string };

export interface CopyDiskInput {
  source: CopySource;
  disk: { id: string; sizeBytes: number };
  replica: ReplicaRef;
  pointId: string;
  /** The replica point the new one is layered over; digests are compared against it when tracking is lost. */
  replicaHeadPointId: string | null;
  /**
   * The DR host proves every block it stores against the source's digest of it, taken as the source read it (the
   * final sync): the proof costs what the bytes cost, with no second pass over either side.
   */
  verify?: boolean;
}

/** A verified copy's proof: the blocks it stored, read back against the source's digests, and how many differed. */
export interface CopyVerification {
  blocksCompared: number;
  mismatchedBlocks: number;
}

export interface CopyDiskResult {
  disk: string;
  mode: 'full' | 'tracked' | 'digest' | 'backup';
  /** How the blocks travelled: through the proxy, or straight from the source host to the DR host. */
  transport: ProxyTransport;
  bytesCopied: number;
  bytesTotal: number;
  verification?: CopyVerification;
}

/** What a copy heartbeats: progress for the Web UI, and the offset a retry resumes from. */
export interface CopyProgress {
  disk: string;
  mode: CopyDiskResult['mode'];
  bytesCopied: number;
  bytesTotal: number;
  resumeOffset: number;
  /** A verified copy's proof of the batches before `resumeOffset`. */
  verification?: CopyVerification;
}

/** Each write is one streamed request; 32 MiB keeps requests large while a cut transfer loses little. */
const BATCH_BYTES = 32 * 1024 * 1024;

export function createReplicationActivities(port: HypervisorPort) {
  async function changedExtents(
    input: CopyDiskInput,
    signal: AbortSignal,
  ): Promise<{ mode: CopyDiskResult['mode']; extents: Extent[] }> {
    const { source } = input;
    if (source.kind === 'backup') {
      const ref = { backupId: source.backupId, disk: input.disk.id };
      return { mode: 'backup', extents: await allPages((page) => port.listBackupExtents(ref, page, { signal })) };
    }
    const disk: DiskRef = { ...source.vm, disk: input.disk.id };
    if (source.baseReferencePointId) {
      try {
        const range = { referencePointId: source.baseReferencePointId, checkpointId: source.checkpointId };
        return {
          mode: 'tracked',
          extents: await allPages((page) => port.listChangedExtents(disk, range, page, { signal })),
        };
      } catch (err) {
        if (!(err instanceof TrackingLostError)) throw err;
        Context.current().log.warn('Change tracking lost; comparing block digests instead', { disk: input.disk.id });
      }
    }
    if (!input.replicaHeadPointId) {
      return {
        mode: 'full',
        extents: await allPages((page) => port.listAllocatedExtents(disk, source.checkpointId, page, { signal })),
      };
    }
    // No usable reference point: the replica already has data, so only blocks whose digests differ are copied.
    const replicaDisk = { ...input.replica, disk: input.disk.id };
    const view = { pointId: input.replicaHeadPointId };
    const whole = [{ offset: 0, length: Math.ceil(input.disk.sizeBytes / BLOCK_SIZE) * BLOCK_SIZE }];
    const { extents } = await differingBlocks(
      (range) => port.blockDigests(disk, source.checkpointId, range, { signal }),
      (range) => port.replicaBlockDigests(replicaDisk, view, range, { signal }),
      whole,
    );
    return { mode: 'digest', extents };
  }

  function read(input: CopyDiskInput, extents: Extent[], signal: AbortSignal): AsyncIterable<ExtentData> {
    const { source } = input;
    if (source.kind === 'backup')
      return port.readBackupExtents({ backupId: source.backupId, disk: input.disk.id }, extents, { signal });
    return port.readExtents({ ...source.vm, disk: input.disk.id }, source.checkpointId, extents, {
      signal,
      digests: input.verify === true,
    });
  }

  return {
    /**
     * A consistent view of every disk while the guest keeps writing; the id is the session's, so a retry reuses
     * it. Returns the instant it shows, on the host's clock: the restore point copied from it records it. With
     * `sourceOff` (a final checkpoint taken after a halt) it is refused unless the VM is still off: one powered on
     * meanwhile has moved on from what the window set out to copy.
     */
    async createCheckpoint(input: {
      vm: VmRef;
      checkpointId: string;
      sourceOff?: boolean;
    }): Promise<{ id: string; createdAt: string }> {
      if (input.sourceOff) {
        const { powerState } = await withHypervisorFailures(() => port.getVm(input.vm));
        if (powerState !== 'Off')
          throw ApplicationFailure.create({
            type: FailureTypes.wrongState,
            message: `${input.vm.vm} is ${powerState}: the final checkpoint is taken of a powered-off source only`,
            nonRetryable: true,
          });
      }
      const checkpoint = await withHypervisorFailures(() => port.createCheckpoint(input.vm, input.checkpointId));
      return { id: checkpoint.id, createdAt: checkpoint.createdAt };
    },

    async beginRestorePoint(input: {
      replica: ReplicaRef;
      pointId: string;
      kind: RestorePointKind;
      metadata: Record<string, string>;
    }): Promise<void> {
      await withHypervisorFailures(() =>
        port.beginRestorePoint(input.replica, input.pointId, {
          kind: input.kind,
          crashConsistent: true,
          metadata: input.metadata,
        }),
      );
    },

    /**
     * Copies one disk's changed blocks into the open restore point, the way of the proxy that runs it (its
     * `transport`; backups always go through the proxy). Heartbeats its progress; a retry after a crash resumes
     * from the last heartbeat, and re-writing a block at the same offset is harmless.
     */
    async copyDisk(input: CopyDiskInput, proxyTransport: ProxyTransport = 'network'): Promise<CopyDiskResult> {
      const ctx = Context.current();
      const signal = ctx.cancellationSignal;
      const previous = ctx.info.heartbeatDetails as CopyProgress | undefined;
      // Until this attempt has progress of its own, its heartbeats keep the earlier attempt's resume point.
      let progress: CopyProgress | undefined = previous;
      return withHypervisorFailures(() =>
        heartbeatWhile(
          async () => {
            const { mode, extents } = await changedExtents(input, signal);
            const bytesTotal = extentBytes(extents);
            const resumed = previous?.mode === mode ? previous : undefined;
            const resumeOffset = resumed?.resumeOffset ?? 0;
            const remaining = extentsFrom(extents, resumeOffset);
            const verify = input.verify === true && input.source.kind === 'checkpoint';
            progress = {
              disk: input.disk.id,
              mode,
              bytesTotal,
              bytesCopied: bytesTotal - extentBytes(remaining),
              resumeOffset,
              ...(verify
                ? { verification: { ...(resumed?.verification ?? { blocksCompared: 0, mismatchedBlocks: 0 }) } }
                : {}),
            };
            const state = progress;
            if (resumeOffset > 0) ctx.log.info('Resuming copy', { ...state });
            ctx.heartbeat(state);
            const replicaDisk = { ...input.replica, disk: input.disk.id };
            const { source } = input;
            const transport = source.kind === 'checkpoint' ? proxyTransport : 'network';
            for (const batch of batchExtents(remaining, BATCH_BYTES)) {
              const before = state.bytesCopied;
              // Progress as the bytes go (on the network, framed bytes: a little more than the data), then what the
              // DR host says it wrote.
              const batchBytes = extentBytes(batch);
              const onProgress = (bytes: number) => (state.bytesCopied = before + Math.min(bytes, batchBytes));
              // The source's stream is forwarded as it is (no decoding and encoding again in the proxy).
              const written =
                source.kind === 'checkpoint' && transport === 'host-to-host'
                  ? await port.sendToRestorePoint(
                      { ...source.vm, disk: input.disk.id, checkpointId: source.checkpointId },
                      { ...replicaDisk, pointId: input.pointId },
                      batch,
                      { signal, onProgress, verify },
                    )
                  : await port.writeRestorePoint(replicaDisk, input.pointId, read(input, batch, signal), {
                      signal,
                      onProgress,
                    });
              state.bytesCopied = before + written.bytesWritten;
              if (state.verification) {
                if (!written.verification)
                  throw ApplicationFailure.nonRetryable(
                    `the DR host ${input.replica.host} answered the copy of disk ${input.disk.id} without verifying it`,
                    FailureTypes.hypervisor,
                  );
                state.verification.blocksCompared += written.verification.blocksCompared;
                state.verification.mismatchedBlocks += extentBytes(written.verification.mismatched) / BLOCK_SIZE;
              }
              const last = batch.at(-1);
              // Only a finished batch moves the resume point: a retry rewrites the unfinished one (idempotent by offset).
              if (last) state.resumeOffset = last.offset + last.length;
              ctx.heartbeat(state);
            }
            if (state.bytesCopied !== bytesTotal)
              throw ApplicationFailure.retryable(
                `Copied ${state.bytesCopied} of ${bytesTotal} bytes of disk ${input.disk.id}`,
                'ShortCopy',
              );
            return {
              disk: input.disk.id,
              mode,
              transport,
              bytesCopied: bytesTotal,
              bytesTotal,
              ...(state.verification ? { verification: state.verification } : {}),
            };
          },
          () => progress,
        ),
      );
    },

    /**
     * Flushes the point to stable storage and makes it the replica's head, recording where and when its data came
     * from; a retry returns the sealed point.
     */
    async sealRestorePoint(input: {
      replica: ReplicaRef;
      pointId: string;
      metadata: Record<string, string>;
    }): Promise<RestorePointSummary> {
      return withHypervisorFailures(async () =>
        summarizePoint(await port.sealRestorePoint(input.replica, input.pointId, { metadata: input.metadata })),
      );
    },

    /** Drops a point that was opened and never sealed (a session that stopped); done already is fine. */
    async discardRestorePoint(input: { replica: ReplicaRef; pointId: string }): Promise<void> {
      await withHypervisorFailures(() => ignoreNotFound(port.discardRestorePoint(input.replica, input.pointId)));
    },

    /**
     * After the point is sealed, the checkpoint becomes the reference point the next run diffs against, and
     * older reference points and the checkpoint are dropped. Every step tolerates having been done before.
     */
    async promoteCheckpoint(input: { vm: VmRef; checkpointId: string; referencePointId: string }): Promise<void> {
      await withHypervisorFailures(async () => {
        const known = await port.listReferencePoints(input.vm);
        if (!known.some((r) => r.id === input.referencePointId)) {
          await port.createReferencePoint(input.vm, input.referencePointId, input.checkpointId);
        }
        await ignoreNotFound(port.deleteCheckpoint(input.vm, input.checkpointId));
        for (const old of known.filter((r) => r.id !== input.referencePointId)) {
          await ignoreNotFound(port.deleteReferencePoint(input.vm, old.id));
        }
      });
    },

    /** Drops a checkpoint a failed session leaves behind, so the host does not keep its copy-on-write data. */
    async discardCheckpoint(input: { vm: VmRef; checkpointId: string }): Promise<void> {
      await withHypervisorFailures(() => ignoreNotFound(port.deleteCheckpoint(input.vm, input.checkpointId)));
    },

    /** Retention: merges the oldest points down until `keep` remain; returns the points left. */
    async applyRetention(input: { replica: ReplicaRef; keep: number }): Promise<RestorePointSummary[]> {
      return withHypervisorFailures(() =>
        heartbeatWhile(async () => {
          let points = (await port.listRestorePoints(input.replica)).filter((p) => p.sealed);
          while (points.length > input.keep) {
            const oldest = points[0];
            if (!oldest) break;
            const info = await port.mergeOldestRestorePoint(input.replica, oldest.id);
            points = info.points.filter((p) => p.sealed);
          }
          return points.map(summarizePoint);
        }),
      );
    },
  };
}

async function ignoreNotFound(call: Promise<unknown>): Promise<void> {
  try {
    await call;
  } catch (err) {
    if (!(err instanceof NotFoundError)) throw err;
  }
}
