// Errors every hypervisor adapter raises. Activities map `retryable` onto Temporal retry policy:
// retryable errors are thrown as-is, the others as non-retryable application failures.

export type HypervisorErrorCode =
  | 'host_unreachable'
  | 'host_failure'
  | 'host_timeout'
  | 'host_identity'
  | 'not_found'
  | 'conflict'
  | 'tracking_lost'
  | 'transfer_interrupted'
  | 'bad_request';

export abstract class HypervisorError extends Error {
  abstract readonly code: HypervisorErrorCode;
  abstract readonly retryable: boolean;
  readonly host: string | undefined;

  constructor(message: string, options: { host?: string; cause?: unknown } = {}) {
    super(message, { cause: options.cause });
    this.name = new.target.name;
    this.host = options.host;
  }
}

/** The host cannot be reached (connection refused, reset or dropped before any answer). */
export class HostUnreachableError extends HypervisorError {
  readonly code = 'host_unreachable';
  readonly retryable = true;
}

/** The host answered with an internal failure (HTTP 5xx); the operation may succeed later. */
export class HostFailureError extends HypervisorError {
  readonly code = 'host_failure';
  readonly retryable = true;
}

/** The host did not answer within the caller's deadline. */
export class HostTimeoutError extends HypervisorError {
  readonly code = 'host_timeout';
  readonly retryable = true;
}

/**
 * The host's API could not be trusted to be that host, or did not trust us: over mutual TLS, its certificate names
 * another host or comes from another CA, it speaks no TLS, or it refused our client certificate. A configuration (or
 * certificate) to fix, not a failure that retrying cures.
 */
export class HostIdentityError extends HypervisorError {
  readonly code = 'host_identity';
  readonly retryable = false;
}

/** The VM, disk, checkpoint, reference point, replica, restore point or backup does not exist. */
export class NotFoundError extends HypervisorError {
  readonly code = 'not_found';
  readonly retryable = false;
}

/** The object exists but its state forbids the operation (e.g. writing a running VM's disk). */
export class ConflictError extends HypervisorError {
  readonly code = 'conflict';
  readonly retryable = false;
}

/** Change tracking since the reference point is gone (unclean host stop); compare digests instead. */
export class TrackingLostError extends HypervisorError {
  readonly code = 'tracking_lost';
  readonly retryable = false;
}

/** A block stream broke part-way; retrying the transfer is safe because writes are idempotent by offset. */
export class TransferInterruptedError extends HypervisorError {
  readonly code = 'transfer_interrupted';
  readonly retryable = true;
}

/** The request was malformed; `field` names the offending input. */
export class BadRequestError extends HypervisorError {
  readonly code = 'bad_request';
  readonly retryable = false;
  readonly field: string | undefined;

  constructor(message: string, options: { host?: string; cause?: unknown; field?: string } = {}) {
    super(message, options);
    this.field = options.field;
  }
}

export function isHypervisorError(error: unknown): error is HypervisorError {
  return error instanceof HypervisorError;
}
