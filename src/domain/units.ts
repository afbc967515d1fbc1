// Sizes as operators read them, in workflow summaries and the CLI alike (pure: safe in workflow code).

/** 1536 → "1.50 KiB": binary units, two decimals under 10, one above. */
export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${unit === 0 ? value : value.toFixed(value < 10 ? 2 : 1)} ${units[unit]}`;
}

const UNIT_MS = { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 } as const;

/** A duration written like `30s`, `15m`, `1h` or `7d` (a whole number and a unit, already checked) in milliseconds. */
export const durationMs = (text: string): number =>
  Number(text.slice(0, -1)) * UNIT_MS[text.slice(-1) as keyof typeof UNIT_MS];
