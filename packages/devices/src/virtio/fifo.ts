/**
 * A bounded FIFO with O(1) `shift` (a head index, compacted once the consumed part is the
 * larger half): the receive backlog of virtio-net and virtio-vsock. `push` refuses beyond the
 * bound, so a peer that never reads costs bounded memory.
 * @module
 */

/** A bounded first-in first-out queue. */
export class BoundedFifo<T> {
  #items: Array<T | undefined> = [];
  #head = 0;
  readonly #limit: number;

  /** @param limit - most items held at once. */
  constructor(limit: number) {
    this.#limit = limit;
  }

  /** Items waiting. */
  get size(): number {
    return this.#items.length - this.#head;
  }

  /** Appends `item`; false (and nothing stored) when the queue is full. */
  push(item: T): boolean {
    if (this.size >= this.#limit) return false;
    this.#items.push(item);
    return true;
  }

  /** The oldest item, or undefined when empty. */
  peek(): T | undefined {
    return this.size === 0 ? undefined : this.#items[this.#head];
  }

  /** Replaces the oldest item (e.g. with the part of it not yet delivered). */
  replaceHead(item: T): void {
    if (this.size > 0) this.#items[this.#head] = item;
  }

  /** Removes and returns the oldest item. */
  shift(): T | undefined {
    if (this.size === 0) return undefined;
    const item = this.#items[this.#head];
    this.#items[this.#head] = undefined;
    this.#head++;
    if (this.#head > 64 && this.#head * 2 > this.#items.length) {
      this.#items = this.#items.slice(this.#head);
      this.#head = 0;
    }
    return item;
  }

  /** Drops everything. */
  clear(): void {
    this.#items = [];
    this.#head = 0;
  }

  /** The items waiting, oldest first (a copy; for snapshots). */
  toArray(): T[] {
    return this.#items.slice(this.#head) as T[];
  }
}
