/**
 * What the host connects to a machine besides RAM: devices on the PIO/MMIO buses, interrupt
 * lines of the in-kernel irqchip, coalesced write ranges and MSR intercepts.
 * @module
 */
import type { RangeSpec } from '../bus.js';
import { checkMsrIndices, checkObject, show } from '../check.js';
import type { Device, DeviceMapping, IrqLine } from '../device.js';
import { InvalidArgumentError, StateError } from '../errors.js';
import type { MachineState } from './state.js';

/** @internal `Machine.irqLine`. */
export function irqLine(s: MachineState, irq: number): IrqLine {
  s.assertOpen();
  if (!s.irqchip) throw new StateError('interrupt lines need Machine.create({ irqchip: true })');
  if (!Number.isInteger(irq) || irq < 0 || irq > 23) throw new InvalidArgumentError('irq', `must be 0..23, got ${show(irq)}`);
  const vm = s.vm;
  return {
    irq,
    set: (level: boolean) => { if (!s.closed) vm.irqLine(irq, level); },
    pulse: () => { if (!s.closed) { vm.irqLine(irq, true); vm.irqLine(irq, false); } },
  };
}

/** @internal `Machine.attach`. */
export function attach(s: MachineState, range: RangeSpec, device: Device): () => void {
  checkObject(range, 'range');
  return attachDevice(s, [{ range, device }]);
}

/** @internal `Machine.attachDevice`: all mappings or none. */
export function attachDevice(s: MachineState, source: { mappings(): DeviceMapping[] } | readonly DeviceMapping[]): () => void {
  s.assertOpen();
  const list = Array.isArray(source) ? source : typeof (source as { mappings?: unknown })?.mappings === 'function' ? (source as { mappings(): DeviceMapping[] }).mappings() : undefined;
  if (!Array.isArray(list)) throw new InvalidArgumentError('source', 'must be a device with mappings() or an array of { range, device }');
  const undo: Array<() => void> = [];
  try {
    list.forEach((m: DeviceMapping, i: number) => {
      if (!m || typeof m !== 'object' || !m.range || typeof m.range !== 'object') throw new InvalidArgumentError(`mappings[${i}].range`, 'must be { port, size } or { address, size }');
      undo.push(('port' in m.range ? s.io : s.mmio).register(m.range, m.device));
    });
  } catch (e) {
    for (const u of undo) u();
    throw e;
  }
  for (const m of list as readonly DeviceMapping[]) s.devices.add(m.device);
  return () => { for (const u of undo) u(); };
}

/** @internal `Machine.coalesce`. */
export function coalesce(s: MachineState, range: RangeSpec): () => void {
  s.assertOpen();
  if (s.hooksSealed) throw new StateError('the machine is sealed: a new coalesced range could bypass mediation');
  checkObject(range, 'range');
  const pio = 'port' in range;
  if (pio ? !s.capabilities.coalescedPio : !s.capabilities.coalescedMmio) throw new StateError(`this host has no coalesced ${pio ? 'PIO' : 'MMIO'}`);
  const raw: unknown = pio ? range.port : range.address;
  if (typeof raw === 'number' ? !Number.isSafeInteger(raw) || raw < 0 : typeof raw !== 'bigint' || raw < 0n) throw new InvalidArgumentError('range.start', `must be a non-negative integer, got ${show(raw)}`);
  const start = BigInt(raw as number | bigint);
  if (!Number.isSafeInteger(range.size) || range.size <= 0) throw new InvalidArgumentError('range.size', 'must be positive');
  s.vm.registerCoalesced(start, range.size, pio);
  const z = { start, size: range.size, pio };
  s.coalesced.push(z);
  return () => {
    if (s.closed) return;
    s.vm.unregisterCoalesced(start, range.size, pio);
    s.coalesced = s.coalesced.filter((x) => x !== z);
  };
}

/** @internal `Machine.coalescedRanges`. */
export function coalescedRanges(s: MachineState): RangeSpec[] {
  return s.coalesced.map((z) => (z.pio ? { port: Number(z.start), size: z.size } : { address: z.start, size: z.size }));
}

/** @internal `Machine.interceptMsrs`. */
export function interceptMsrs(s: MachineState, reads: readonly number[], writes: readonly number[]): void {
  s.assertOpen();
  if (!s.capabilities.userSpaceMsr) throw new StateError('this host has no user-space MSR exits');
  s.vm.setMsrIntercepts(checkMsrIndices(reads, 'reads'), checkMsrIndices(writes, 'writes'));
}
