/** An answer a host API gives as a 4xx/5xx with a machine-readable code and, for 400, the field. */
export class HostApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly field?: string,
  ) {
    super(message);
  }
}

export const notFound = (what: string, field?: string): HostApiError =>
  new HostApiError(404, 'not_found', `${what} not found`, field);
export const conflict = (message: string): HostApiError => new HostApiError(409, 'conflict', message);
export const badRequest = (field: string, message: string): HostApiError =>
  new HostApiError(400, 'bad_request', `${field}: ${message}`, field);
export const trackingLost = (message: string): HostApiError => new HostApiError(409, 'tracking_lost', message);

/** Error body of every non-2xx host API answer. */
export interface HostApiErrorBody {
  error: { code: string; message: string; field?: string };
}
