// The workflow bundle entry: every workflow type the worker registers.
export { plannedFailover, plannedFailoverSession } from './planned-failover';
export { replicationJob, replicationSession } from './replication';
export { replica } from './replica';
export { replicaOperation } from './replica-operations';
export { proxySlots } from './proxy-slots';
export { requestNonces } from './request-nonces';
