// The workflow bundle entry: every workflow type the worker registers.
export { plannedFailover } from './planned-failover';
