/**
 * tsvm's error hierarchy. Every error is a {@link TsvmError} with a stable `code`.
 * The backend errors ({@link KvmError}, {@link KvmUnavailableError}) are defined in
 * `@tsvm/kvm-backend` and re-exported here so users need only one import.
 * @module
 */
import { TsvmError } from '@tsvm/kvm-backend';

export { TsvmError, KvmError, KvmUnavailableError, errnoName } from '@tsvm/kvm-backend';

/** A public function was called with arguments it cannot accept. Nothing was changed. */
export class InvalidArgumentError extends TsvmError {
  /** Name of the offending argument or option, e.g. `memory` or `regions[1].size`. */
  readonly argument: string;

  /**
   * @param argument - the offending argument's name.
   * @param message - what is wrong with it.
   */
  constructor(argument: string, message: string) {
    super('TSVM_INVALID_ARGUMENT', `${argument}: ${message}`);
    this.argument = argument;
  }
}

/**
 * A hook failed on the exit path: thrown by a dispatcher (such as the monitor's) that runs
 * several user hooks behind one core hook, so the `hook-error` stop names the user's hook, not
 * the dispatcher. `cause` is what the hook threw.
 */
export class HookFailure extends TsvmError {
  /** Name of the hook that failed. */
  readonly hook: string;

  /**
   * @param hook - the failing hook's name.
   * @param cause - what it threw (or why its decision was rejected).
   */
  constructor(hook: string, cause: unknown) {
    super('TSVM_HOOK_FAILED', `hook '${hook}' failed: ${cause instanceof Error ? cause.message : String(cause)}`, { cause });
    this.hook = hook;
  }
}

/** A guest-physical access fell outside guest RAM, straddled a hole, or overflowed. */
export class GuestMemoryError extends TsvmError {
  /** First guest-physical address of the rejected access. */
  readonly address: bigint;
  /** Length in bytes of the rejected access. */
  readonly length: number;

  /**
   * @param address - guest-physical start of the access.
   * @param length - its length in bytes.
   * @param why - short reason.
   */
  constructor(address: bigint, length: number, why: string) {
    super('TSVM_GUEST_MEMORY', `guest memory access [0x${address.toString(16)}, +${length}) rejected: ${why}`);
    this.address = address;
    this.length = length;
  }
}

/** The object was used after `close()`, or in a state that does not allow the call. */
export class StateError extends TsvmError {
  /** @param message - what was attempted and why it is not allowed now. */
  constructor(message: string) {
    super('TSVM_STATE', message);
  }
}

/** A snapshot manifest has another version or shape than this build understands. */
export class SnapshotFormatError extends TsvmError {
  /** @param message - what is wrong with the manifest. */
  constructor(message: string, options?: { cause?: unknown }) {
    super('TSVM_SNAPSHOT_FORMAT', message, options);
  }
}

/** An image (ELF, multiboot, bzImage, ...) is malformed, truncated or does not fit. */
export class ImageFormatError extends TsvmError {
  /** The header field or structure that is wrong, e.g. `e_phoff` or `multiboot.header_addr`. */
  readonly field: string;

  /**
   * @param field - the offending field.
   * @param message - what is wrong with it.
   */
  constructor(field: string, message: string) {
    super('TSVM_IMAGE_FORMAT', `${field}: ${message}`);
    this.field = field;
  }
}

/**
 * A monitor refused an event (deny-by-default or an explicit deny). Carried by a
 * `{ reason: 'violation' }` stop and usable as an exception by monitor code.
 */
export class MonitorViolation extends TsvmError {
  /** The event kind, e.g. `io`, `mmio`, `msr`. */
  readonly event: string;
  /** The address the event concerned (port, guest-physical address, MSR index), if any. */
  readonly address: bigint | undefined;
  /** Guest RIP at the event. */
  readonly rip: bigint | undefined;

  /**
   * @param event - event kind.
   * @param message - why it was refused.
   * @param details - address and RIP.
   */
  constructor(event: string, message: string, details: { address?: bigint; rip?: bigint; cause?: unknown } = {}) {
    super('TSVM_MONITOR_VIOLATION', message, details.cause === undefined ? undefined : { cause: details.cause });
    this.event = event;
    this.address = details.address;
    this.rip = details.rip;
  }
}

/**
 * The worker thread that ran a machine ended while calls on it were pending, or before one was
 * made: it was terminated, ran out of memory, called `process.exit`, or threw where nothing
 * caught it. Every pending call of that machine's handle rejects with this error; the machine
 * (and its guest state) is gone. `cause` is the worker's own error when it reported one.
 */
export class WorkerExitedError extends TsvmError {
  /** `threadId` of the worker that ended. */
  readonly threadId: number;
  /** The worker's exit code (1 after an uncaught error; what it passed to `process.exit`). */
  readonly exitCode: number;
  /**
   * How it ended: `terminated` (its handle or pool stopped it), `out-of-memory` (its heap limit),
   * `error` (an uncaught exception), `exit` (it exited on its own) or, for a machine in a child
   * process (`isolation: 'process'`), `signal` (killed by {@link WorkerExitedError.signal}: a native
   * crash such as `SIGSEGV` inside `KVM_RUN` or koffi, `SIGKILL` from the OOM killer).
   */
  readonly how: 'terminated' | 'out-of-memory' | 'error' | 'exit' | 'signal';
  /** The signal that ended a child process (`how: 'signal'`), e.g. `SIGSEGV`. */
  readonly signal: string | undefined;

  /**
   * @param threadId - the worker's `threadId` (the child's pid with `isolation: 'process'`).
   * @param exitCode - its exit code (-1 when a signal ended it).
   * @param how - how it ended.
   * @param options - `cause`: the worker's error, if any; `signal`: the signal that ended a child process.
   */
  constructor(threadId: number, exitCode: number, how: WorkerExitedError['how'], options?: { cause?: unknown; signal?: string }) {
    const why = options?.cause instanceof Error ? `: ${options.cause.message}` : '';
    const end = options?.signal !== undefined ? `signal ${options.signal}` : `exit code ${exitCode}`;
    super('TSVM_WORKER_EXITED', `machine worker ${threadId} ended (${how}, ${end})${why}`, options?.cause === undefined ? undefined : { cause: options.cause });
    this.threadId = threadId;
    this.exitCode = exitCode;
    this.how = how;
    this.signal = options?.signal;
  }
}
