/**
 * The scan example's monitor: what one sandbox child may do, and the verdict derived from what
 * the monitor saw. Every rule is a mediate hook, so every decision is in the child's hash-chained
 * audit log; the first forbidden act stops the child (deny, effect `stop`) and becomes a
 * {@link Finding}. The verdict is a function of the findings and of why the run stopped, nothing
 * else: the sample's expected verdict is never consulted.
 *
 * Rules (see `scan-sandbox.ts` for the layout):
 * - ports: `out` to the console and the debug-exit port is allowed, and core's exception
 *   reporting port when ring 0 writes it (the exception stubs); any other port access is a
 *   `forbidden-port`;
 * - the disk controller's window: allowed until the disk has delivered the payload (the device's
 *   DMA into the used ring ends the loading phase), a `device-access` afterwards, whichever code
 *   makes it (a sample jumping into the loader's notify instruction is caught too);
 * - the code area: device DMA from the disk while loading is the delivery; any guest store is
 *   `self-modifying-code` (W^X: the sample may run its code, never write it);
 * - the loader's region: DMA from the disk while loading (used ring, status byte); any guest
 *   store is a `wild-write`;
 * - everything that is not RAM or the controller: a store is a `wild-write`, a load a `wild-read`.
 * @module
 */
import { EXCEPTION_PORT, type Stop } from '@tsvm/core';
import { allow, deny, type Decision, type HookContext, type Monitor, type MonitorEvent } from '@tsvm/monitor';
import { CODE, CONSOLE_PORT, DISK_NAME, EXIT_PORT, LOADER, LOADER_FAILED, VIRTIO_BASE } from './scan-sandbox.js';

/** What the monitor can find wrong with a sample. */
export type FindingKind = 'forbidden-port' | 'device-access' | 'self-modifying-code' | 'wild-write' | 'wild-read';

/** One forbidden act, as the monitor saw it. */
export interface Finding {
  /** What kind of act. */
  readonly kind: FindingKind;
  /** Guest RIP of the instruction. */
  readonly rip: bigint;
  /** Port or guest-physical address. */
  readonly address: bigint;
  /** Human description (also the deny reason in the audit log). */
  readonly detail: string;
}

/**
 * A verdict: `benign` (the sample finished by itself), `malicious:<kind>` (the monitor stopped a
 * forbidden act), `timeout` (still running at the deadline), `crashed:<why>` (a CPU exception
 * such as `#GP`, or another stop), `error:loader` (the payload never arrived).
 */
export type Verdict = 'benign' | 'timeout' | 'error:loader' | `malicious:${FindingKind}` | `crashed:${string}`;

/** What the monitor recorded for one child. */
export interface Watch {
  /** Forbidden acts, in order (the first one stopped the child). */
  readonly findings: Finding[];
  /** Bytes of payload the disk delivered into the code area. */
  delivered: number;
  /** True once the disk has completed the load (its DMA into the used ring). */
  loaded: boolean;
}

const VECTOR_NAMES: Readonly<Record<number, string>> = { 0: '#DE', 1: '#DB', 3: '#BP', 4: '#OF', 5: '#BR', 6: '#UD', 7: '#NM', 8: '#DF', 10: '#TS', 11: '#NP', 12: '#SS', 13: '#GP', 14: '#PF', 16: '#MF', 17: '#AC', 18: '#MC', 19: '#XM' };
const hex = (v: bigint | number): string => `0x${v.toString(16)}`;
const USED_RING = BigInt(LOADER.start + 0x2000);

/** Registers the sandbox rules on `mon` (not sealed here) and returns the record they fill. */
export function watchSandbox(mon: Monitor): Watch {
  const watch: Watch = { findings: [], delivered: 0, loaded: false };
  const forbid = (kind: FindingKind, ctx: HookContext, address: bigint, detail: string): Decision => {
    watch.findings.push({ kind, rip: ctx.rip(), address, detail });
    return deny({ effect: 'stop', reason: `${kind}: ${detail}` });
  };
  const ports = (ev: MonitorEvent, ctx: HookContext): Decision => {
    if (ev.event !== 'pio') return allow();
    if (ev.direction === 'out' && (ev.port === CONSOLE_PORT || ev.port === EXIT_PORT)) return allow();
    // Core's exception stubs (ring 0) report a fault's vector here; a ring-3 sample writing it would fake a crash.
    if (ev.direction === 'out' && ev.port === EXCEPTION_PORT && ctx.machine.vcpu(ctx.vcpu).getSregs().cs.dpl === 0) return allow();
    return forbid('forbidden-port', ctx, BigInt(ev.port), `${ev.direction} port ${hex(ev.port)}`);
  };
  mon.mediate({ event: 'pio', ports: [0, 0xffff] }, ports, { name: 'ports' });

  mon.mediate({ event: 'mmio', range: [VIRTIO_BASE, VIRTIO_BASE + 0x1ffn] }, (ev, ctx) => {
    if (ev.event !== 'mmio') return allow();
    if (!watch.loaded) return allow();
    return forbid('device-access', ctx, ev.address, `${ev.direction} of the disk controller at ${hex(ev.address)} after the payload was loaded`);
  }, { name: 'disk-controller' });

  const code: [bigint, bigint] = [BigInt(CODE.start), BigInt(CODE.start + CODE.size - 1)];
  mon.mediate({ event: 'write-watch', range: code }, (ev, ctx) => {
    if (ev.event !== 'write-watch') return allow();
    if (ev.source === 'dma' && ev.device === DISK_NAME && !watch.loaded) {
      watch.delivered += ev.size;
      return allow();
    }
    if (ev.source === 'dma') return forbid('wild-write', ctx, ev.address, `DMA by ${ev.device ?? '?'} into the code area after loading`);
    return forbid('self-modifying-code', ctx, ev.address, `${ev.size}-byte store into its own code at ${hex(ev.address)}`);
  }, { name: 'code-area' });

  const loader: [bigint, bigint] = [BigInt(LOADER.start), BigInt(LOADER.start + LOADER.size - 1)];
  mon.mediate({ event: 'write-watch', range: loader }, (ev, ctx) => {
    if (ev.event !== 'write-watch') return allow();
    if (ev.source === 'dma' && ev.device === DISK_NAME && !watch.loaded) {
      // The used ring's idx is the device's last write of a request: loading is over.
      if (ev.address <= USED_RING + 2n && USED_RING + 2n < ev.address + BigInt(ev.size)) watch.loaded = true;
      return allow();
    }
    return forbid('wild-write', ctx, ev.address, `${ev.source === 'dma' ? `DMA by ${ev.device ?? '?'}` : `${ev.size}-byte store`} into the loader at ${hex(ev.address)}`);
  }, { name: 'loader-area' });

  // No RAM and no device: [end of scratch, loader), [after loader, code), [after code, controller), [after controller, 4 GiB).
  const holes: Array<[bigint, bigint]> = [
    [BigInt(LOADER.start + LOADER.size), BigInt(CODE.start - 1)],
    [BigInt(CODE.start + CODE.size), VIRTIO_BASE - 1n],
    [VIRTIO_BASE + 0x200n, 0xffff_ffffn],
  ];
  holes.forEach((range, i) => mon.mediate({ event: 'mmio', range }, (ev, ctx) => {
    if (ev.event !== 'mmio') return allow();
    return ev.direction === 'write'
      ? forbid('wild-write', ctx, ev.address, `${ev.size}-byte store to ${hex(ev.address)}, which is not RAM`)
      : forbid('wild-read', ctx, ev.address, `${ev.size}-byte load from ${hex(ev.address)}, which is not RAM`);
  }, { name: `no-ram-${i}` }));
  return watch;
}

/** The verdict for a run that ended with `stop`, from what `watch` recorded. */
export function verdictOf(stop: Stop, watch: Watch): Verdict {
  const first = watch.findings[0];
  if (stop.reason === 'violation' && first) return `malicious:${first.kind}`;
  switch (stop.reason) {
    case 'timeout': return 'timeout';
    case 'debug-exit': return stop.code === LOADER_FAILED && watch.delivered === 0 ? 'error:loader' : 'benign';
    case 'exception': return `crashed:${VECTOR_NAMES[stop.vector] ?? `vector-${stop.vector}`}`;
    default: return `crashed:${stop.reason}`;
  }
}

/** The audit lines of one child, with its chain head (`AuditLog.head`). */
export interface AuditChain {
  /** One JSON line per decision. */
  readonly lines: readonly string[];
  /** Hash of the last line. */
  readonly head: string;
}
