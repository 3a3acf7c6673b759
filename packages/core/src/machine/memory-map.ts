/**
 * Guest RAM as memslots: validating the regions of `Machine.create`, adding and removing
 * memfd-backed regions, flipping memslot flags (read-only, dirty logging) and reading dirty logs.
 * `GuestMemory` does the checked access; this module keeps it and KVM's slot map in step.
 * @module
 */
import { gpa, hex } from '../address.js';
import { checkObject, checkOptionalBoolean, show } from '../check.js';
import { InvalidArgumentError, StateError } from '../errors.js';
import { checkRegionSize, type MemoryRegion } from '../memory.js';
import type { MachineState } from './state.js';

/** A memory region to create. */
export interface RegionOptions {
  /** Guest-physical start (4 KiB aligned). */
  readonly start: number | bigint;
  /** Size in bytes (multiple of 4 KiB). */
  readonly size: number;
  /** Guest writes exit as MMIO instead of reaching RAM. */
  readonly readonly?: boolean;
  /** Track dirty pages. */
  readonly logDirty?: boolean;
  /** Label for diagnostics. */
  readonly name?: string;
}

/** Our own cap on memslots (KVM's may be higher). */
const MAX_SLOTS = 32;

/** @internal `MachineOptions.memory` as a list of regions, rejected before KVM is touched. */
export function normaliseRegions(memory: number | readonly RegionOptions[]): RegionOptions[] {
  if (typeof memory === 'number') {
    checkRegionSize(memory, 'memory');
    return [{ start: 0, size: memory, name: 'ram' }];
  }
  if (!Array.isArray(memory) || memory.length === 0) throw new InvalidArgumentError('memory', 'must be a size in bytes or a non-empty array of regions');
  memory.forEach((r, i) => {
    if (!r || typeof r !== 'object') throw new InvalidArgumentError(`memory[${i}]`, 'must be an object');
    checkRegionSize(r.size, `memory[${i}].size`);
    gpa(r.start, `memory[${i}].start`);
  });
  const sorted = [...memory].sort((a, b) => (BigInt(a.start) < BigInt(b.start) ? -1 : 1));
  for (let i = 1; i < sorted.length; i++) {
    const p = sorted[i - 1] as RegionOptions, c = sorted[i] as RegionOptions;
    if (BigInt(c.start) < BigInt(p.start) + BigInt(p.size)) throw new InvalidArgumentError('memory', `region at ${hex(BigInt(c.start))} overlaps region at ${hex(BigInt(p.start))}`);
  }
  return memory.slice();
}

/** @internal `Machine.addRegion`. */
export function addRegion(s: MachineState, options: RegionOptions): MemoryRegion {
  s.assertOpen();
  checkObject(options, 'options');
  checkOptionalBoolean(options.readonly, 'readonly');
  checkOptionalBoolean(options.logDirty, 'logDirty');
  if (options.name !== undefined && typeof options.name !== 'string') throw new InvalidArgumentError('name', `must be a string, got ${show(options.name)}`);
  const size = checkRegionSize(options.size, 'size');
  const start = gpa(options.start, 'start');
  if (start % 4096n !== 0n) throw new InvalidArgumentError('start', `${hex(start)} is not 4 KiB aligned`);
  if (options.readonly && !s.capabilities.readonlyMemory) throw new InvalidArgumentError('readonly', 'this host does not support read-only memslots');
  let slot = 0;
  while (s.slots.has(slot)) slot++;
  if (slot >= Math.min(MAX_SLOTS, s.capabilities.maxMemslots)) throw new InvalidArgumentError('regions', 'too many memory regions');
  const region: MemoryRegion = { slot, start, size, readonly: options.readonly ?? false, name: options.name ?? `ram${slot}` };
  // Check overlap before allocating anything.
  for (const r of s.memory.regions()) {
    if (start < BigInt(r.start) + BigInt(r.size) && BigInt(r.start) < start + BigInt(size)) {
      throw new InvalidArgumentError('start', `[${hex(start)}, +${size}) overlaps region '${r.name}' at ${hex(r.start)}`);
    }
  }
  const host = s.vm.allocateMemory(size, `tsvm-${region.name}`);
  try {
    s.memory.addRegion(region, host);
    s.vm.mapMemory(slot, start, host, size, { readonly: region.readonly, logDirty: options.logDirty ?? false });
  } catch (e) {
    s.memory.removeRegion(slot);
    host.close();
    throw e;
  }
  s.slots.add(slot);
  if (options.logDirty) s.logDirty.add(slot);
  return region;
}

/** @internal `Machine.removeRegion`. */
export function removeRegion(s: MachineState, slot: number): void {
  s.assertOpen();
  if (s.running) throw new StateError('cannot remove memory while the machine runs');
  if (!s.slots.has(slot)) throw new InvalidArgumentError('slot', `no region in slot ${show(slot)}`);
  s.vm.unmapMemory(slot);
  s.memory.removeRegion(slot)?.close();
  s.slots.delete(slot);
  s.logDirty.delete(slot);
}

/** @internal `Machine.dirtyPages`. */
export function dirtyPages(s: MachineState, slot: number): Uint8Array {
  s.assertOpen();
  return s.vm.dirtyLog(slot, regionIn(s, slot).size);
}

/** @internal `Machine.setRegionFlags`. */
export function setRegionFlags(s: MachineState, slot: number, flags: { readonly?: boolean; logDirty?: boolean }): MemoryRegion {
  s.assertOpen();
  if (s.running) throw new StateError('cannot change memslot flags while the machine runs');
  checkObject(flags, 'flags');
  checkOptionalBoolean(flags.readonly, 'flags.readonly');
  checkOptionalBoolean(flags.logDirty, 'flags.logDirty');
  const r = regionIn(s, slot);
  if (flags.readonly && !s.capabilities.readonlyMemory) throw new InvalidArgumentError('readonly', 'this host does not support read-only memslots');
  const host = s.memory.removeRegion(slot);
  if (!host) throw new InvalidArgumentError('slot', `no region in slot ${slot}`);
  const next: MemoryRegion = { ...r, readonly: flags.readonly ?? r.readonly };
  const logDirty = flags.logDirty ?? s.logDirty.has(slot);
  s.vm.unmapMemory(slot);
  s.vm.mapMemory(slot, BigInt(r.start), host, r.size, { readonly: next.readonly, logDirty });
  s.memory.addRegion(next, host);
  if (logDirty) s.logDirty.add(slot); else s.logDirty.delete(slot);
  return next;
}

/** The region in `slot`, or an error naming the slot. */
function regionIn(s: MachineState, slot: number): MemoryRegion {
  const r = s.memory.regions().find((x) => x.slot === slot);
  if (!r) throw new InvalidArgumentError('slot', `no region in slot ${show(slot)}`);
  return r;
}
