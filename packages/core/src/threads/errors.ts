/**
 * The pool's own errors: both are back-pressure, not faults — the caller may retry later.
 * @module
 */
import { TsvmError } from '../errors.js';

/** `acquire()` waited `timeoutMs` without a machine becoming free. */
export class PoolTimeoutError extends TsvmError {
  /** How long it waited, in milliseconds. */
  readonly timeoutMs: number;

  /** @param timeoutMs - how long `acquire()` waited. */
  constructor(timeoutMs: number) {
    super('TSVM_POOL_TIMEOUT', `no pooled machine became free within ${timeoutMs} ms`);
    this.timeoutMs = timeoutMs;
  }
}

/** `acquire()` found every machine in use and the wait queue at its bound (`maxWaiting`). */
export class PoolQueueFullError extends TsvmError {
  /** The queue's bound. */
  readonly maxWaiting: number;

  /** @param maxWaiting - the queue's bound. */
  constructor(maxWaiting: number) {
    super('TSVM_POOL_QUEUE_FULL', `every pooled machine is in use and ${maxWaiting} callers already wait`);
    this.maxWaiting = maxWaiting;
  }
}
