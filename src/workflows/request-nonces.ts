import {
  allHandlersFinished,
  condition,
  continueAsNew,
  setCurrentDetails,
  setHandler,
  workflowInfo,
} from '@temporalio/workflow';
import { claimNonceUpdate, type NonceClaim, type RequestNoncesInput } from '../contract';

/**
 * The registry of nonces that signed requests used, id request-nonces: one owner, so a request replayed to any
 * workflow, through any worker, is seen. A nonce is kept only while a request carrying it could still be accepted
 * (its `keepUntil`); later the request is refused as expired anyway. Claims survive continue-as-new.
 */
export async function requestNonces(input: RequestNoncesInput): Promise<void> {
  const claims = new Map<string, NonceClaim>();
  const keyOf = (c: Pick<NonceClaim, 'target' | 'nonce'>) => `${c.target}\n${c.nonce}`;
  for (const c of input.carried ?? []) claims.set(keyOf(c), c);

  const forget = () => {
    const now = Date.now();
    for (const [key, c] of claims) if (c.keepUntil < now) claims.delete(key);
  };

  setHandler(claimNonceUpdate, (claim) => {
    forget();
    const earlier = claims.get(keyOf(claim));
    // The same claimer again is an activity retried after a crash, not a replay.
    if (earlier && earlier.claimer !== claim.claimer) return { claimed: false, claimedBy: earlier.claimer };
    claims.set(keyOf(claim), claim);
    setCurrentDetails(`${claims.size} nonce(s) kept`);
    return { claimed: true };
  });

  await condition(() => workflowInfo().continueAsNewSuggested && allHandlersFinished());
  forget();
  await continueAsNew<typeof requestNonces>({ carried: [...claims.values()] });
}
