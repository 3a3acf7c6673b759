/**
 * Ports tsvm itself uses, which the PIO bus refuses to hand to a device: a device there would
 * either never see its accesses (the monitor takes them first) or make them look like tsvm's
 * own events. Each entry names its owner, and only a registration that claims that owner gets
 * the range (core's exception reporter claims `exception`).
 * @module
 */
import { EXCEPTION_PORT } from './cpu/x86.js';

/** One reserved port range. */
export interface ReservedPorts {
  /** First port. */
  readonly port: number;
  /** Number of ports. */
  readonly size: number;
  /** Who uses it (what a registration must claim to get it). */
  readonly owner: 'probe' | 'exception' | 'hypercall';
  /** Why, for the error message. */
  readonly why: string;
}

/** Port of the monitor's probe trap, `out 0xe5, al` (`e6 e5`): `out imm8` reaches only ports below 256. */
export const PROBE_PORT = 0x00e5;
/** Default hypercall port: a guest `out` here is a hypercall (`vmcall` hangs on PVM). */
export const HYPERCALL_PORT = 0x0ee8;

/** The ports the PIO bus refuses to give to devices. */
export const RESERVED_PORTS: readonly ReservedPorts[] = Object.freeze([
  { port: PROBE_PORT, size: 1, owner: 'probe', why: "the monitor's exec probes trap with `out 0xe5, al`" },
  { port: EXCEPTION_PORT, size: 1, owner: 'exception', why: 'core\'s exception stubs report the vector here' },
  { port: HYPERCALL_PORT, size: 1, owner: 'hypercall', why: 'guest hypercalls are `out` to this port' },
]);
