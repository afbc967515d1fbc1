// The manifest of released workflow histories (test/histories/RELEASED): the sha256 of every file of every release
// directory, in `sha256sum` form (`cd test/histories && sha256sum -c RELEASED` checks it by hand). A release's
// histories are recorded once: the recorder refuses a release the manifest names, and a unit test fails when a
// listed file changes, goes, or a file or directory the manifest does not name appears.
import { createHash } from 'node:crypto';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';

export const MANIFEST = 'RELEASED';

/** The sha256 of every file of one release directory, by file name. */
export function digestsOf(root: string, release: string): Map<string, string> {
  return new Map(
    readdirSync(join(root, release))
      .sort()
      .map((file) => [
        file,
        createHash('sha256')
          .update(readFileSync(join(root, release, file)))
          .digest('hex'),
      ]),
  );
}

/** The manifest's lines for one release directory: `<sha256>  <release>/<file>`. */
export const manifestLinesOf = (root: string, release: string): string[] =>
  [...digestsOf(root, release)].map(([file, digest]) => `${digest}  ${release}/${file}`);

/** The releases the manifest names, each with its files' digests. */
export function readManifest(root: string): Map<string, Map<string, string>> {
  const releases = new Map<string, Map<string, string>>();
  const path = join(root, MANIFEST);
  if (!existsSync(path)) return releases;
  for (const [i, line] of readFileSync(path, 'utf8').split('\n').entries()) {
    if (line === '') continue;
    const m = /^([0-9a-f]{64}) {2}([^/]+)\/([^/]+)$/.exec(line);
    if (!m) throw new Error(`${MANIFEST} line ${i + 1} is not '<sha256>  <release>/<file>': ${line}`);
    const files = releases.get(m[2]!) ?? new Map<string, string>();
    files.set(m[3]!, m[1]!);
    releases.set(m[2]!, files);
  }
  return releases;
}

/** What differs between the release directories under `root` and the manifest; empty when nothing does. */
export function releasedHistoryProblems(root: string): string[] {
  const manifest = readManifest(root);
  const problems: string[] = [];
  const dirs = readdirSync(root).filter((d) => statSync(join(root, d)).isDirectory());
  for (const dir of dirs)
    if (!manifest.has(dir))
      problems.push(`${dir}/ is not in ${MANIFEST}: a release's histories are listed there when they are recorded`);
  for (const [release, files] of manifest) {
    if (!dirs.includes(release)) {
      problems.push(`${release}/ is gone`);
      continue;
    }
    const present = digestsOf(root, release);
    for (const [file, digest] of files) {
      const now = present.get(file);
      if (now === undefined) problems.push(`${release}/${file} is gone`);
      else if (now !== digest) problems.push(`${release}/${file} changed (sha256 ${now}, released as ${digest})`);
    }
    for (const file of present.keys()) if (!files.has(file)) problems.push(`${release}/${file} was added`);
  }
  return problems;
}
