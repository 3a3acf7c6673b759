/**
 * Exit statuses of `tsvm`, one per class of outcome, and the mapping from a guest's {@link Stop}
 * and from errors to them. A guest's debug-exit value is its own status (0-255), as with QEMU's
 * `isa-debug-exit`, so a guest may collide with a tool status on purpose or not: the one line on
 * stderr always says which it was.
 * @module
 */
import { CommanderError } from 'commander';
import { ImageFormatError, KvmUnavailableError, TsvmError, type Stop } from '@tsvm/core';
import { PolicyConflictError, PolicyError } from '@tsvm/monitor';

/** Exit statuses by meaning. */
export const EXIT = {
  /** The guest halted, powered off through ACPI (S5), or wrote 0 to the debug-exit port; a check passed. */
  ok: 0,
  /** `audit verify`: the chain is broken. `policy check`: not used (see `policyInvalid`). */
  failed: 1,
  /** Bad command line: unknown command or option, bad option value. */
  usage: 2,
  /** An input file (image, policy, log) is missing or unreadable. */
  noFile: 3,
  /** The image is truncated or not in the format it claims (or any format tsvm loads). */
  badImage: 4,
  /** The policy file is not valid JSON or fails the schema (the message names the JSON path). */
  policyInvalid: 5,
  /** `/dev/kvm` is missing or unusable. */
  noKvm: 6,
  /** `--gdb`: the gdb stub is not part of this build. */
  gdbUnavailable: 7,
  /** `--gdb`: the port is already in use. */
  portInUse: 8,
  /** A bug in tsvm (an error that is none of the above). */
  internal: 9,
  /** The monitor stopped the guest for a policy violation. */
  violation: 10,
  /** `--timeout` ran out. */
  timeout: 11,
  /** The guest crashed: triple fault (shutdown), unhandled exception, an exit nothing handles, KVM gave up. */
  guestCrash: 12,
  /** A hook or device of the host side failed while the guest ran. */
  hostFault: 13,
  /** The guest asked for a reset, which `tsvm run` does not perform. */
  reset: 14,
  /** The guest suspended to RAM (ACPI S3), which `tsvm run` does not resume. */
  suspended: 15,
  /** Interrupted (SIGINT), the shell's convention 128 + 2. */
  interrupted: 130,
} as const;

/** An error that ends the command with a given status and one line for people. */
export class CliError extends Error {
  /** The exit status. */
  readonly status: number;

  /**
   * @param status - exit status (one of {@link EXIT}).
   * @param message - one line naming the problem.
   * @param options - the underlying error.
   */
  constructor(status: number, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'CliError';
    this.status = status;
  }
}

/** Status of a guest stop: its debug-exit value, or the class of the stop. */
export function stopStatus(stop: Stop): number {
  switch (stop.reason) {
    case 'halt': case 'poweroff': return EXIT.ok;
    case 'suspend': return EXIT.suspended;
    case 'debug-exit': return stop.code & 0xff;
    case 'violation': return EXIT.violation;
    case 'timeout': return EXIT.timeout;
    case 'aborted': return EXIT.interrupted;
    case 'reset': return EXIT.reset;
    case 'shutdown': case 'exception': case 'unhandled-exit': case 'internal-error': case 'fail-entry': return EXIT.guestCrash;
    case 'hook-error': case 'device-error': case 'backend-error': return EXIT.hostFault;
  }
}

/** One line saying why the guest stopped. */
export function describeStop(stop: Stop): string {
  const at = `at rip=0x${stop.rip.toString(16)}`;
  switch (stop.reason) {
    case 'debug-exit': return `guest wrote ${stop.code} to the debug-exit port ${at}`;
    case 'timeout': return `timed out after ${stop.elapsedMs.toFixed(0)} ms ${at}${stop.halted ? ' (halted, waiting for an interrupt)' : ''}`;
    case 'aborted': return `interrupted ${at}`;
    case 'violation': return `policy violation: ${stop.violation.message}`;
    case 'exception': return `unhandled exception ${stop.vector} at 0x${stop.faultRip.toString(16)}${stop.errorCode === undefined ? '' : ` (error code ${stop.errorCode})`}`;
    case 'unhandled-exit': return `unhandled exit: ${stop.message}`;
    case 'internal-error': return `KVM internal error (suberror ${stop.suberror}): ${stop.message} ${at}`;
    case 'fail-entry': return `VM entry failed (hardware reason 0x${stop.hardwareReason.toString(16)})`;
    case 'hook-error': return `hook '${stop.hook}' failed: ${errorText(stop.error)}`;
    case 'device-error': return `device '${stop.device}' failed: ${errorText(stop.error)}`;
    case 'backend-error': return `backend error: ${stop.error.message}`;
    case 'shutdown': return `guest shut down (triple fault) ${at}`;
    case 'reset': return `guest requested a reset ${at}`;
    case 'halt': return `guest halted ${at}`;
    case 'poweroff': return `guest powered off (ACPI S5) ${at}`;
    case 'suspend': return `guest suspended to RAM (ACPI S3) ${at}; waking vector 0x${stop.wakingVector.toString(16)}`;
  }
}

function errorText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** Status and one line for an error that ended a command. */
export function errorStatus(e: unknown): { status: number; message: string } {
  if (e instanceof CliError) return { status: e.status, message: e.message };
  if (e instanceof CommanderError) {
    // --help and --version exit 0, help shown for a missing subcommand is a usage error;
    // commander has printed its own message already.
    return { status: e.exitCode === 0 ? EXIT.ok : EXIT.usage, message: '' };
  }
  if (e instanceof KvmUnavailableError || (e instanceof TsvmError && e.code === 'TSVM_KVM_UNAVAILABLE')) return { status: EXIT.noKvm, message: `KVM not usable: ${e.message}` };
  if (e instanceof ImageFormatError) return { status: EXIT.badImage, message: `bad image: ${e.message}` };
  if (e instanceof PolicyError || e instanceof PolicyConflictError) return { status: EXIT.policyInvalid, message: `bad policy: ${e.message}` };
  if (e instanceof TsvmError && e.code === 'TSVM_INVALID_ARGUMENT') return { status: EXIT.usage, message: e.message };
  return { status: EXIT.internal, message: `internal error: ${e instanceof Error ? e.stack ?? e.message : String(e)}` };
}
