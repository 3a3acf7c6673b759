/**
 * Write-watch for device DMA. A device's write into guest RAM (a virtio buffer, a used ring) is
 * a store the vCPU never executed: no read-only memslot traps it and KVM's dirty log does not
 * record it. Core routes every such write through the memory's `DmaGate`; this hook puts it
 * through the same write-watch hooks as the guest's own stores, as an event with
 * `source: 'dma'` and the device's name, with the write's exact address and length.
 *
 * - mediate hooks decide before RAM changes: deny → the device gets a `DmaDeniedError` (a
 *   guest-visible I/O error or DEVICE_NEEDS_RESET) and RAM is untouched; `emulate(value)`
 *   replaces a write of up to 8 bytes and denies a longer one (a value cannot stand for it);
 *   a hook that answers with a Promise denies (DMA happens inside a device call, which cannot
 *   wait), fail closed;
 * - observe hooks are told after the write, whichever mechanism watches their range (the dirty
 *   log would miss it).
 * @module
 */
import type { DmaDecision, DmaHook, DmaWrite } from '@tsvm/core';
import type { MonitorEvent } from './events.js';
import type { InternalEnv } from './internal-hooks.js';
import { callObserve, hookContext, runMediators, type HookRecord } from './records.js';

function overlapping(env: InternalEnv, w: DmaWrite): HookRecord[] {
  const last = w.address + BigInt(w.length) - 1n;
  return env.records().filter((r) => r.spec.event === 'write-watch' && r.spec.lo <= last && w.address <= r.spec.hi);
}

function eventOf(w: DmaWrite): MonitorEvent {
  let value: bigint | undefined;
  if (w.length <= 8) {
    value = 0n;
    for (let i = w.length - 1; i >= 0; i--) value = (value << 8n) | BigInt(w.data[i] ?? 0);
  }
  return { event: 'write-watch', address: w.address, size: w.length, value, source: 'dma', device: w.device };
}

/** The monitor's DMA hook: device writes → write-watch events. */
export function dmaWatchHook(env: InternalEnv): DmaHook {
  return {
    name: 'monitor:write-watch-dma',
    mediate: (w): DmaDecision | undefined => {
      const recs = overlapping(env, w).filter((r) => r.mode === 'mediate');
      if (recs.length === 0) return undefined;
      const d = runMediators(env, recs, eventOf(w), undefined, undefined);
      if (d instanceof Promise) {
        d.catch(() => undefined); // the verdict is already "deny"; a late rejection is not an error here
        return { verdict: 'deny', reason: 'a mediate write-watch hook answered asynchronously; device DMA cannot wait' };
      }
      if (d.verdict === 'allow') return undefined;
      if (d.verdict === 'deny') return { verdict: 'deny', ...(d.reason === undefined ? {} : { reason: d.reason }) };
      if (w.length > 8) return { verdict: 'deny', reason: `emulate(value) cannot replace a ${w.length}-byte DMA write` };
      const data = new Uint8Array(w.length);
      let v = BigInt.asUintN(64, BigInt(d.value));
      for (let i = 0; i < w.length; i++) { data[i] = Number(v & 0xffn); v >>= 8n; }
      return { verdict: 'replace', data };
    },
    observe: (w) => {
      const recs = overlapping(env, w).filter((r) => r.mode === 'observe');
      if (recs.length === 0) return;
      const ctx = hookContext(env.machine, undefined, undefined);
      const ev = eventOf(w);
      for (const r of recs) callObserve(r, ev, ctx);
    },
  };
}
