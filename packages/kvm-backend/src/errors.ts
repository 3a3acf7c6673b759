/**
 * The root of tsvm's error hierarchy. It lives in the lowest layer so that every package
 * (backend, core, devices, monitor) throws subclasses of one class.
 *
 * `instanceof` works across duplicated copies of the package, for every class of the
 * hierarchy, because the check uses a `Symbol.for` brand listing the error's classes rather
 * than prototype identity (the undici habit).
 * @module
 */

const BRAND = Symbol.for('tsvm.error');

/** Base class of every error tsvm throws on purpose. `code` is stable and safe to switch on. */
export class TsvmError extends Error {
  /** Stable, machine-readable error code, e.g. `TSVM_KVM_IOCTL`. */
  readonly code: string;

  /**
   * @param code - stable error code.
   * @param message - human readable explanation.
   * @param options - standard `cause` chaining.
   */
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.name = new.target.name;
    // The brand lists every class of the chain, so `instanceof KvmError` (not just TsvmError)
    // holds for an error thrown by another copy of the package.
    const chain: string[] = [];
    for (let c: unknown = new.target; typeof c === 'function' && c !== Error; c = Object.getPrototypeOf(c)) chain.push((c as { name: string }).name);
    Object.defineProperty(this, BRAND, { value: Object.freeze(chain) });
  }

  /** Brand-based `instanceof` for this class and every subclass, across copies of the package. */
  static override [Symbol.hasInstance](value: unknown): boolean {
    if (typeof value !== 'object' || value === null) return false;
    const chain = (value as Record<symbol, unknown>)[BRAND];
    return Array.isArray(chain) ? chain.includes(this.name) : Function.prototype[Symbol.hasInstance].call(this, value);
  }
}

/** Named errno values that callers commonly test for. */
const ERRNO_NAMES: Readonly<Record<number, string>> = {
  1: 'EPERM', 2: 'ENOENT', 4: 'EINTR', 5: 'EIO', 9: 'EBADF', 11: 'EAGAIN', 12: 'ENOMEM',
  13: 'EACCES', 14: 'EFAULT', 16: 'EBUSY', 17: 'EEXIST', 19: 'ENODEV', 22: 'EINVAL',
  24: 'EMFILE', 25: 'ENOTTY', 28: 'ENOSPC', 38: 'ENOSYS', 95: 'EOPNOTSUPP',
};

/** Returns the symbolic name of an errno value (`EINVAL`), or `errno N` when unknown. */
export function errnoName(errno: number): string {
  return ERRNO_NAMES[errno] ?? `errno ${errno}`;
}

/** A system call or KVM ioctl failed. Carries the ioctl (or libc function) name and errno. */
export class KvmError extends TsvmError {
  /** The ioctl or libc call that failed, e.g. `KVM_SET_USER_MEMORY_REGION`. */
  readonly ioctl: string;
  /** The `errno` reported by the kernel. */
  readonly errno: number;

  /**
   * @param ioctl - name of the failing ioctl or libc function.
   * @param errno - errno value.
   * @param detail - optional extra context.
   */
  constructor(ioctl: string, errno: number, detail?: string) {
    super('TSVM_KVM_IOCTL', `${ioctl} failed: ${errnoName(errno)}${detail ? ` (${detail})` : ''}`);
    this.ioctl = ioctl;
    this.errno = errno;
  }
}

/** `/dev/kvm` is missing, unreadable, or speaks an unsupported API version. */
export class KvmUnavailableError extends TsvmError {
  /** Why KVM cannot be used on this host, phrased for a person. */
  readonly reason: string;

  /**
   * @param reason - why KVM is unusable.
   * @param options - `cause` chaining.
   */
  constructor(reason: string, options?: { cause?: unknown }) {
    super('TSVM_KVM_UNAVAILABLE', `KVM is not available: ${reason}`, options);
    this.reason = reason;
  }
}
