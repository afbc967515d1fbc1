import { z } from 'zod';

/** One problem with an input, named by its path so the operator knows which field to fix. */
export interface InputProblem {
  path: string;
  message: string;
}

export type Validation<T> = { ok: true; value: T } | { ok: false; problems: InputProblem[] };

function pathOf(path: readonly PropertyKey[]): string {
  let out = '';
  for (const part of path) {
    if (typeof part === 'number') out += `[${part}]`;
    else out += out ? `.${String(part)}` : String(part);
  }
  return out || '(input)';
}

/** Validates with a schema and reports every problem at once, never only the first. */
export function validate<S extends z.ZodType>(schema: S, input: unknown): Validation<z.output<S>> {
  const result = schema.safeParse(input);
  if (result.success) return { ok: true, value: result.data };
  const problems: InputProblem[] = [];
  for (const issue of result.error.issues) {
    if (issue.code === 'unrecognized_keys') {
      for (const key of issue.keys)
        problems.push({ path: pathOf([...issue.path, key]), message: 'is not a known field' });
    } else {
      problems.push({ path: pathOf(issue.path), message: issue.message });
    }
  }
  return { ok: false, problems };
}

export function formatProblems(what: string, problems: readonly InputProblem[]): string {
  const lines = problems.map((p) => `${p.path}: ${p.message}`);
  return `${what} was refused (${problems.length} problem${problems.length === 1 ? '' : 's'}): ${lines.join('; ')}`;
}

/** A non-empty, trimmed text, the way names and reasons are typed at a prompt. */
export const requiredText = (max = 500) =>
  z
    .string({ error: (iss) => (iss.input === undefined ? 'is required' : 'must be a string') })
    .trim()
    .min(1, { error: 'must not be empty' })
    .max(max, { error: `must be at most ${max} characters` });
