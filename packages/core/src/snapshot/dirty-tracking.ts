/**
 * Which dirty-page tracking a forked machine uses, by price: the kernel's bitmap per memslot
 * (`KVM_GET_DIRTY_LOG`, which scans and re-protects the whole slot) or per-vCPU rings
 * (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL` + `KVM_RESET_DIRTY_RINGS`, which touch only the pages
 * written). Both serve `BackendVm.dirtyLog` and so `Machine.reset()` alike. The prices are
 * measured once per backend and process ({@link measureDirtyTracking}: two small VMs, ~5 ms)
 * the first time a choice is asked for; the monitor's calibration table records the same
 * measurement (`dirty-log-harvest` / `dirty-ring-harvest`), and a caller holding such a table
 * can pass its choice instead (`Snapshot.prewarm(n, backend, { dirtyTracking })`). Core does not
 * read the monitor's table itself: core must not depend on the monitor.
 * @module
 */
import type { Backend, BackendVcpu } from '../backend.js';

/** How dirty pages are found: `'log'` (bitmap per memslot) or `'ring'` (per-vCPU rings). */
export type DirtyTracking = 'log' | 'ring';

/** What {@link measureDirtyTracking} found. */
export interface DirtyTrackingPrices {
  /** One reset's harvest (`dirtyPagesForReset`, else `dirtyLog`) of a 16 MiB slot with 4 pages written since the last, through the bitmap: median ns. */
  readonly logNs: number;
  /** The same through the rings (harvest; `KVM_RESET_DIRTY_RINGS` only once pages would stay writable past a bound), or undefined where the host has none. */
  readonly ringNs: number | undefined;
  /** Rounds each median is taken over. */
  readonly rounds: number;
}

/** Ring bytes per vCPU a forked machine gets: 65536 entries, more than a 256 MiB guest has pages. */
export const DIRTY_RING_BYTES = 1 << 20;

const SLOT = 16 * 1024 * 1024;
// Real mode at 0:0, DS = 0x1000: store to 4 pages, then `out 0x80, al`, in a loop.
const GUEST = [
  0xb8, 0x00, 0x10, 0x8e, 0xd8,
  0xfe, 0x06, 0x00, 0x00, 0xfe, 0x06, 0x00, 0x10, 0xfe, 0x06, 0x00, 0x20, 0xfe, 0x06, 0x00, 0x30,
  0xe6, 0x80, 0xeb, 0xee,
];

function priceOne(backend: Backend, ring: boolean, rounds: number): number | undefined {
  const vm = backend.createVm(ring ? { irqchip: false, dirtyRing: 64 * 1024 } : { irqchip: false });
  if (ring && vm.dirtyTracking !== 'ring') { vm.close(); return undefined; }
  const mem = vm.allocateMemory(SLOT, 'tsvm-dirty-price');
  let vcpu: BackendVcpu | undefined;
  try {
    mem.bytes.set(GUEST, 0);
    vm.mapMemory(0, 0n, mem, SLOT, { readonly: false, logDirty: true });
    vcpu = vm.createVcpu(0);
    const s = vcpu.getSregs();
    for (const seg of [s.cs, s.ds, s.es, s.ss]) { seg.base = 0n; seg.selector = 0; }
    vcpu.setSregs(s);
    vcpu.setRegs({ ...vcpu.getRegs(), rip: 0n, rflags: 2n });
    const ns: number[] = [];
    for (let i = 0; i < rounds + 2; i++) {
      vcpu.beginSlice(50_000_000);
      let exit;
      try { exit = vcpu.run(); } finally { vcpu.endSlice(); }
      if (exit.kind !== 'io') return undefined;
      const t0 = process.hrtime.bigint();
      // What a reset pays: its harvest (rings: pages named stay writable, no ioctl while few).
      const pages = vm.dirtyPagesForReset?.(0, SLOT, []);
      const bits = pages ? undefined : vm.dirtyLog(0, SLOT);
      const t = Number(process.hrtime.bigint() - t0);
      // Pages 0x10-0x13: the guest's 4 stores, nothing else.
      if (pages ? ![16, 17, 18, 19].every((p) => pages.includes(p)) : bits?.[2] !== 0x0f) return undefined;
      if (i >= 2) ns.push(t);
    }
    ns.sort((a, b) => a - b);
    return ns[ns.length >> 1];
  } finally {
    vcpu?.close();
    try { vm.unmapMemory(0); } catch { /* closing the VM frees it too */ }
    mem.close();
    vm.close();
  }
}

/**
 * Measures one reset's harvest with the same 4 pages written each time on `backend`, through
 * the bitmap and (where the host has them) the rings. Never throws: a mechanism that fails to measure is reported absent
 * (`ringNs` undefined; `logNs` Infinity).
 */
export function measureDirtyTracking(backend: Backend, rounds = 15): DirtyTrackingPrices {
  const safe = (ring: boolean): number | undefined => { try { return priceOne(backend, ring, rounds); } catch { return undefined; } };
  const logNs = safe(false) ?? Infinity;
  const ringNs = backend.capabilities.dirtyLogRing ? safe(true) : undefined;
  return { logNs, ringNs, rounds };
}

const measured = new WeakMap<Backend, DirtyTrackingPrices>();

/** The prices for `backend`, measured on first use (see {@link measureDirtyTracking}). */
export function dirtyTrackingPrices(backend: Backend): DirtyTrackingPrices {
  let p = measured.get(backend);
  if (!p) { p = measureDirtyTracking(backend); measured.set(backend, p); }
  return p;
}

/**
 * `'ring'` when this host has rings, they priced lower than the bitmap, and no ring of this
 * backend has overflowed in this process (a KVM backend learns that at run time: PVM's emulator
 * can push a burst of ring-0 stores past the ring's end), else `'log'`.
 */
export function cheaperDirtyTracking(backend: Backend): DirtyTracking {
  if (!backend.capabilities.dirtyLogRing) return 'log';
  if ((backend as { ringOverflowSeen?: boolean }).ringOverflowSeen === true) return 'log';
  const p = dirtyTrackingPrices(backend);
  return p.ringNs !== undefined && p.ringNs < p.logNs ? 'ring' : 'log';
}
