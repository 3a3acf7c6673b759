import { describe, expect, it } from 'vitest';
import { BoundedFifo } from './fifo.js';

describe('BoundedFifo', () => {
  it('keeps order, refuses beyond its bound, and survives long use (compaction)', () => {
    const q = new BoundedFifo<number>(3);
    expect([q.push(1), q.push(2), q.push(3), q.push(4)]).toEqual([true, true, true, false]);
    expect(q.size).toBe(3);
    expect(q.peek()).toBe(1);
    q.replaceHead(10);
    expect(q.shift()).toBe(10);
    expect(q.toArray()).toEqual([2, 3]);
    for (let i = 0; i < 1000; i++) { expect(q.push(i)).toBe(true); expect(q.shift()).toBe(i < 2 ? [2, 3][i] : i - 2); }
    expect(q.size).toBe(2);
    q.clear();
    expect([q.size, q.peek(), q.shift()]).toEqual([0, undefined, undefined]);
  });
});
