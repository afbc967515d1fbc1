/** An answer the lab API gives as a 4xx/5xx with a machine-readable code and, for 400, the field. */
export class LabError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly field?: string,
  ) {
    super(message);
  }
}

export const notFound = (what: string, field?: string): LabError =>
  new LabError(404, 'not_found', `${what} not found`, field);
export const conflict = (message: string): LabError => new LabError(409, 'conflict', message);
export const badRequest = (field: string, message: string): LabError =>
  new LabError(400, 'bad_request', `${field}: ${message}`, field);
export const trackingLost = (message: string): LabError => new LabError(409, 'tracking_lost', message);
