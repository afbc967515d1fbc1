import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { batchExtents, differingExtents, extentBytes, extentsFrom, unionExtents } from '../../src/activities/copy-plan';
import { BLOCK_SIZE } from '../../src/hypervisor/port';

const B = BLOCK_SIZE;

describe('copy planning', () => {
  it('resumes after the last copied offset, trimming a straddled extent', () => {
    const extents = [
      { offset: 0, length: 4 * B },
      { offset: 10 * B, length: 2 * B },
    ];
    assert.deepEqual(extentsFrom(extents, 0), extents);
    assert.deepEqual(extentsFrom(extents, 2 * B), [
      { offset: 2 * B, length: 2 * B },
      { offset: 10 * B, length: 2 * B },
    ]);
    assert.deepEqual(extentsFrom(extents, 12 * B), []);
  });

  it('batches into bounded requests without losing or reordering a byte', () => {
    const extents = [
      { offset: 0, length: 5 * B },
      { offset: 8 * B, length: B },
      { offset: 20 * B, length: 7 * B },
    ];
    const batches = batchExtents(extents, 4 * B);
    for (const batch of batches) assert.ok(extentBytes(batch) <= 4 * B);
    const flat = batches.flat();
    assert.equal(extentBytes(flat), extentBytes(extents));
    for (let i = 1; i < flat.length; i++) assert.ok(flat[i]!.offset >= flat[i - 1]!.offset + flat[i - 1]!.length);
    assert.equal(batches.length, 4);
  });

  it('turns differing digests into merged extents', () => {
    assert.deepEqual(differingExtents(100, ['a', 'b', 'c', 'd', 'e'], ['a', 'x', 'y', 'd', 'z']), [
      { offset: 101 * B, length: 2 * B },
      { offset: 104 * B, length: B },
    ]);
  });

  it('unites extent lists, merging overlaps and neighbours', () => {
    assert.deepEqual(
      unionExtents(
        [
          { offset: 0, length: 2 * B },
          { offset: 10 * B, length: B },
        ],
        [
          { offset: B, length: 3 * B },
          { offset: 4 * B, length: B },
          { offset: 20 * B, length: B },
        ],
      ),
      [
        { offset: 0, length: 5 * B },
        { offset: 10 * B, length: B },
        { offset: 20 * B, length: B },
      ],
    );
    assert.deepEqual(unionExtents([], []), []);
  });
});
