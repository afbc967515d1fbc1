// What every benchmark records for the report: comparisons of a measured series against a baseline measured in the
// same run, timed the same way, with the targets the issue set. Pure: the report and the tests share it.

import { z } from 'zod';

const seriesSchema = z.strictObject({
  /** What was timed, in the report's words: "planned failover", "cp of the same bytes". */
  label: z.string().min(1),
  samples: z.array(z.number().finite().nonnegative()).min(1, 'needs at least one sample'),
});

const targetSchema = z.strictObject({
  /** The target as the issue states it: "controllable part at most 0.1x the naive move's sync". */
  text: z.string().min(1),
  /** ratio: median measured / median baseline; median: the measured median itself, in the comparison's unit. */
  of: z.enum(['ratio', 'median']),
  atMost: z.number().finite().optional(),
  atLeast: z.number().finite().optional(),
});

export const comparisonSchema = z.strictObject({
  title: z.string().min(1),
  unit: z.enum(['ms', 'MiB/s', 'MB', 'events', 'KiB']),
  measured: seriesSchema,
  baseline: seriesSchema,
  targets: z.array(targetSchema).default([]),
  /** Why a target is missed, or what the figures leave out. */
  note: z.string().optional(),
});

export type Comparison = z.input<typeof comparisonSchema>;
export type ComparisonTarget = z.infer<typeof targetSchema>;

/** The fields of a result file the report reads; the rest is each benchmark's own detail. */
export const benchResultSchema = z.looseObject({
  benchmark: z.string().regex(/^[a-z0-9-]+$/),
  commit: z.string().min(7),
  date: z.string(),
  machine: z.looseObject({ cpus: z.number(), node: z.string() }).optional(),
  rounds: z.number().optional(),
  comparisons: z.array(comparisonSchema).optional(),
});
export type BenchResult = z.infer<typeof benchResultSchema>;

export interface SeriesSummary {
  label: string;
  median: number;
  min: number;
  max: number;
  count: number;
}

export interface TargetVerdict extends ComparisonTarget {
  value: number;
  met: boolean;
}

export interface ComparisonSummary {
  title: string;
  unit: string;
  measured: SeriesSummary;
  baseline: SeriesSummary;
  /** median measured / median baseline. */
  ratio: number;
  targets: TargetVerdict[];
  note?: string;
}

/** The median of the samples (NaN for none); every benchmark's, through bench/lib.ts. */
export const median = (values: readonly number[]): number => {
  if (values.length === 0) return Number.NaN;
  const s = [...values].sort((x, y) => x - y);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

function summarise(series: { label: string; samples: number[] }): SeriesSummary {
  return {
    label: series.label,
    median: median(series.samples),
    min: Math.min(...series.samples),
    max: Math.max(...series.samples),
    count: series.samples.length,
  };
}

export function summariseComparison(input: Comparison): ComparisonSummary {
  const c = comparisonSchema.parse(input);
  const measured = summarise(c.measured);
  const baseline = summarise(c.baseline);
  const ratio = baseline.median === 0 ? Number.POSITIVE_INFINITY : measured.median / baseline.median;
  const targets = c.targets.map((t): TargetVerdict => {
    const value = t.of === 'ratio' ? ratio : measured.median;
    const met = (t.atMost === undefined || value <= t.atMost) && (t.atLeast === undefined || value >= t.atLeast);
    return { ...t, value, met };
  });
  return { title: c.title, unit: c.unit, measured, baseline, ratio, targets, ...(c.note ? { note: c.note } : {}) };
}
