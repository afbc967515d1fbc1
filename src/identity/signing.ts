import type { KeyObject } from 'node:crypto';
import { Client, type WorkflowClientInterceptor } from '@temporalio/client';
import { isSigned, isSignedOperation, requestTarget } from '../contract/requests';
import { signRequest } from './keys';

/**
 * Finds the private key of a user: throws, saying how to make one, when there is none (the project CLI), or gives
 * undefined to send the request as it is (a test of what an unsigned request gets).
 */
export type KeyFinder = (user: string) => KeyObject | undefined;

/**
 * Signs, on their way out, the requests this client sends that change anything and are not signed yet: the
 * requester's key signs over the operation, its target workflow and the request. What the project CLI, the demo and
 * the tests send; the Temporal CLI sends what `failover sign` printed.
 */
export function signingInterceptor(keyOf: KeyFinder): WorkflowClientInterceptor {
  const signed = (operation: string, target: string, args: readonly unknown[]): unknown[] => {
    const [request, ...rest] = args;
    if (!isSignedOperation(operation) || isSigned(request)) return [...args];
    if (request === null || typeof request !== 'object' || Array.isArray(request)) return [...args];
    const requestedBy = (request as { requestedBy?: unknown }).requestedBy;
    if (typeof requestedBy !== 'string') return [...args]; // refused for its missing requester, not for its signature
    const key = keyOf(requestedBy);
    if (!key) return [...args];
    return [signRequest(operation, target, request as Record<string, unknown>, key), ...rest];
  };
  return {
    startWithDetails: (input, next) =>
      next({
        ...input,
        options: {
          ...input.options,
          args: signed(
            input.workflowType,
            isSignedOperation(input.workflowType) ? requestTarget(input.workflowType) : '',
            input.options.args,
          ),
        },
      }),
    signal: (input, next) =>
      next({ ...input, args: signed(input.signalName, input.workflowExecution.workflowId, input.args) }),
    startUpdate: (input, next) =>
      next({ ...input, args: signed(input.updateName, input.workflowExecution.workflowId, input.args) }),
  };
}

/** A client on the same connection and namespace that signs what it sends with its requesters' keys. */
export const signingClient = (client: Client, keyOf: KeyFinder): Client =>
  new Client({
    connection: client.connection,
    namespace: client.options.namespace,
    interceptors: { workflow: [signingInterceptor(keyOf)] },
  });
