// The critical window of a planned failover: from the source's power-off until the replica runs. Its steps, and
// what each operator decision does from each of them. Pure, so the session workflow and its tests share it.

/** The steps of the window, in order. Helper point 2 is sealed only once verified, so a sealed one is trusted. */
export const WindowSteps = ['powerOff', 'checkpoint', 'copy', 'verify', 'seal', 'switch', 'powerOn'] as const;
export type WindowStep = (typeof WindowSteps)[number];

export type Decision = 'retry' | 'abort' | 'forceFailover';

/**
 * Where a retry starts: the step that failed, except that a mismatch found by the verification copies again, and
 * that with `checkpointAgain` a failed copy or verification starts from the final checkpoint. The source is off,
 * so a view taken again shows the same disks; the copy then writes what it says changed since helper point 1 and
 * the verification compares against it (the host keeps a view that still serves, so this costs nothing then).
 */
export function retryFrom(failed: WindowStep, mismatch: boolean, checkpointAgain = false): WindowStep {
  if (checkpointAgain && (failed === 'copy' || failed === 'verify')) return 'checkpoint';
  return failed === 'verify' && mismatch ? 'copy' : failed;
}

/**
 * Force failover moves to the newest verified point and goes on from the switch (or from the replica's power-on,
 * if that is what failed): helper point 2 when the DR host shows it sealed, since it is sealed only once verified
 * (nothing is lost); helper point 1 otherwise (what changed after it is lost). The host, not the failed step, says
 * whether the seal happened: a seal whose answer was lost may have been done.
 */
export function forceTarget(
  failed: WindowStep,
  helper2Sealed: boolean,
): { point: 'helper1' | 'helper2'; from: WindowStep } {
  return { point: helper2Sealed ? 'helper2' : 'helper1', from: failed === 'powerOn' ? 'powerOn' : 'switch' };
}

/** An abort must power the replica off before the source goes on once the replica may have been started. */
export const replicaMayRun = (failed: WindowStep): boolean => failed === 'powerOn';
