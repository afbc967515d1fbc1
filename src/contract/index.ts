// The public contract: names users type and the shapes of what crosses the workflow boundary.
// Safe to import from workflow code (no I/O, no Node built-ins).
export * from './names';
export * from './validation';
export * from './planned-failover';
export * from './replica';
export * from './proxy';
export * from './replication';
export * from './messages';
export * from './operations';
export * from './metrics';
export * from './requests';
