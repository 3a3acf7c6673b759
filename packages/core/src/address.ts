/**
 * Branded guest-physical addresses. Guest addresses are `bigint`s at API boundaries so that
 * 64-bit values never silently lose precision; the brand stops a host offset or a port
 * number from being passed where a guest address is expected.
 * @module
 */
import { InvalidArgumentError } from './errors.js';

declare const guestAddressBrand: unique symbol;

/** A guest-physical address. Create one with {@link gpa}. */
export type GuestAddress = bigint & { readonly [guestAddressBrand]: true };

/** Largest guest-physical address tsvm accepts (52-bit physical address space). */
export const MAX_GUEST_PHYS = (1n << 52n) - 1n;

/**
 * Makes a {@link GuestAddress} from a number or bigint, rejecting negative, fractional,
 * unsafe or out-of-range values.
 * @param value - the address.
 * @param argument - argument name used in the error message.
 */
export function gpa(value: number | bigint, argument = 'address'): GuestAddress {
  let v: bigint;
  if (typeof value === 'number') {
    if (!Number.isSafeInteger(value) || value < 0) {
      throw new InvalidArgumentError(argument, `must be a non-negative safe integer, got ${value}`);
    }
    v = BigInt(value);
  } else if (typeof value === 'bigint') {
    v = value;
  } else {
    throw new InvalidArgumentError(argument, `must be a number or bigint, got ${typeof value}`);
  }
  if (v < 0n || v > MAX_GUEST_PHYS) {
    throw new InvalidArgumentError(argument, `0x${v.toString(16)} is outside the guest-physical address space`);
  }
  return v as GuestAddress;
}

/** Formats a guest address or port as `0x...` for messages. */
export function hex(value: number | bigint, width = 0): string {
  return `0x${value.toString(16).padStart(width, '0')}`;
}
