/**
 * PVH direct boot of an uncompressed ELF kernel (`vmlinux`) that carries the
 * `XEN_ELFNOTE_PHYS32_ENTRY` note: load the ELF by physical address, build `hvm_start_info`
 * (xen/include/public/arch-x86/hvm/start_info.h) with a module list, command line and memory
 * map, and enter at the note's 32-bit address with EBX pointing at the start info.
 * @module
 */
import { ImageFormatError, InvalidArgumentError } from '../errors.js';
import { type GuestAddress, hex } from '../address.js';
import type { GuestMemory } from '../memory.js';
import {
  AddressAllocator,
  type AddressRange,
  applyAvoid,
  buildMemoryMap,
  type MemoryMapEntry,
  optionalAddress,
  type Protected32Entry,
  type ReservedRange,
} from './bootinfo.js';
import { cString, StructWriter } from './bytes.js';
import { elfNotes, type ElfLoadResult, planElf } from './elf.js';

/** Note type of the 32-bit physical PVH entry point, owner `Xen`. */
export const XEN_ELFNOTE_PHYS32_ENTRY = 18;
/** `hvm_start_info.magic`. */
export const HVM_START_MAGIC_VALUE = 0x336ec578;

const START_INFO_SIZE = 56;
const MODLIST_ENTRY_SIZE = 32;
const MEMMAP_ENTRY_SIZE = 24;

/** A module handed to the kernel (Linux takes the first as its initrd). */
export interface PvhModule {
  /** Contents. */
  readonly data: Uint8Array;
  /** The module's command line; none by default. */
  readonly cmdline?: string;
}

/** Options for {@link loadPvh}. */
export interface PvhOptions {
  /** Kernel command line; empty by default. */
  readonly cmdline?: string;
  /** Modules, placed page-aligned above the kernel. */
  readonly modules?: readonly PvhModule[];
  /** Where the start-info block (start info, module list, memory map, strings) goes; by default 0x6000 if free. */
  readonly startInfoAddress?: number | bigint;
  /** `rsdp_paddr`; 0 (let the guest search) by default. */
  readonly rsdpAddress?: number | bigint;
  /** Ranges to mark non-RAM in the memory map. */
  readonly reserved?: readonly ReservedRange[];
  /** Ranges the loader must not place anything in (the Machine's own structures). */
  readonly avoid?: readonly { readonly start: number | bigint; readonly size: number | bigint }[];
}

/** Where {@link loadPvh} put things and how to enter the kernel. */
export interface PvhLoadResult {
  /** The PVH entry point from the note (EIP). */
  readonly entry: bigint;
  /** Guest address of `hvm_start_info`. */
  readonly startInfoAddress: GuestAddress;
  /** EBX = {@link PvhLoadResult.startInfoAddress}. */
  readonly registers: { readonly ebx: bigint };
  /** The ELF load (segments, `e_entry`, class). */
  readonly elf: ElfLoadResult;
  /** Each module's range. */
  readonly modules: readonly AddressRange[];
  /** The memory map handed to the guest. */
  readonly memoryMap: readonly MemoryMapEntry[];
  /** Flat 32-bit protected mode, paging off, EBX = start info. */
  readonly entryState: Protected32Entry;
}

/**
 * Returns the PVH entry point from the `Xen` note of type 18, or `undefined` if the image has
 * none. The descriptor holds a 32-bit address (Linux emits it as `.quad` on x86-64, so 8
 * bytes whose upper half must be zero are accepted too).
 * @throws ImageFormatError - a malformed ELF, or the note with a bad descriptor size.
 */
export function findPvhEntry(image: Uint8Array): bigint | undefined {
  for (const note of elfNotes(image)) {
    if (note.name !== 'Xen' || note.type !== XEN_ELFNOTE_PHYS32_ENTRY) continue;
    const d = note.desc;
    if (d.length !== 4 && d.length !== 8) {
      throw new ImageFormatError('XEN_ELFNOTE_PHYS32_ENTRY', `descriptor is ${d.length} bytes, expected 4 or 8`);
    }
    const view = new DataView(d.buffer, d.byteOffset, d.length);
    const entry = d.length === 4 ? BigInt(view.getUint32(0, true)) : view.getBigUint64(0, true);
    if (entry >= 0x1_0000_0000n) throw new ImageFormatError('XEN_ELFNOTE_PHYS32_ENTRY', `${hex(entry)} is not a 32-bit address`);
    return entry;
  }
  return undefined;
}

/**
 * Loads a PVH-capable ELF kernel and its start info. Everything is validated before guest
 * memory is written.
 * @throws ImageFormatError - malformed ELF, no PVH note or a bad one, segments outside RAM.
 * @throws InvalidArgumentError - bad options or a `startInfoAddress` that collides.
 *
 * @example Boot a distribution kernel without firmware
 * The complete platform is in `packages/examples/src/linux-boot.ts`.
 * ```ts
 * import { readFileSync } from 'node:fs';
 * import { Machine, extractVmlinux, loadPvh, writeAcpiTables } from '@tsvm/core';
 *
 * await using vm = await Machine.create({ memory: 256 * 1024 * 1024, irqchip: true });
 * // … attach a Uart16550 on IRQ 4, an I8042, a CmosRtc and Unpopulated.ranges() …
 * const { vmlinux } = extractVmlinux(readFileSync('/boot/vmlinuz'));   // the bzImage's payload, unpacked
 * const acpi = writeAcpiTables(vm.memory);
 * const r = loadPvh(vm.memory, vmlinux, { cmdline: 'console=ttyS0', rsdpAddress: acpi.rsdpAddress, avoid: vm.hostReserved() });
 * vm.enter(r.entryState);                                               // 32-bit protected mode at the PVH entry
 * const stop = await vm.run({ timeout: 300_000 });
 * ```
 */
export function loadPvh(memory: GuestMemory, image: Uint8Array, options: PvhOptions = {}): PvhLoadResult {
  const entry = findPvhEntry(image);
  if (entry === undefined) throw new ImageFormatError('XEN_ELFNOTE_PHYS32_ENTRY', 'the image has no PVH entry note (Xen, type 18); is it a vmlinux built with CONFIG_PVH?');
  const cmdline = cString(options.cmdline ?? '', 'cmdline');
  const modules = options.modules ?? [];
  if (!Array.isArray(modules)) throw new InvalidArgumentError('modules', 'must be an array');
  const moduleStrings = modules.map((m, i) => {
    if (!(m.data instanceof Uint8Array)) throw new InvalidArgumentError(`modules[${i}].data`, 'must be a Uint8Array');
    return m.cmdline === undefined ? undefined : cString(m.cmdline, `modules[${i}].cmdline`);
  });
  const rsdp = optionalAddress(options.rsdpAddress, 'rsdpAddress') ?? 0n;
  const siArg = optionalAddress(options.startInfoAddress, 'startInfoAddress');
  const memoryMap = buildMemoryMap(memory, options.reserved);

  const allocator = new AddressAllocator(memory);
  applyAvoid(allocator, options.avoid);
  const { plan, result: elf } = planElf(image, allocator, { addresses: 'physical' });
  if (!elf.segments.some((s) => entry >= s.start && entry < s.end)) {
    throw new ImageFormatError('XEN_ELFNOTE_PHYS32_ENTRY', `entry ${hex(entry)} is not inside any loaded segment`);
  }

  const modlistOff = 64;
  const memmapOff = modlistOff + modules.length * MODLIST_ENTRY_SIZE;
  let strOff = memmapOff + memoryMap.length * MEMMAP_ENTRY_SIZE;
  const cmdlineOff = strOff;
  strOff += cmdline.length;
  const modStrOffs = moduleStrings.map((s) => {
    const o = strOff;
    strOff += s?.length ?? 0;
    return o;
  });
  const blockSize = BigInt(strOff);
  let si: bigint;
  if (siArg !== undefined) {
    if (siArg % 8n !== 0n) throw new InvalidArgumentError('startInfoAddress', `${hex(siArg)} is not 8-byte aligned`);
    if (siArg + blockSize > 0x1_0000_0000n) throw new InvalidArgumentError('startInfoAddress', 'must lie below 4 GiB');
    allocator.claimArgument('startInfoAddress', siArg, blockSize);
    si = siArg;
  } else {
    si = allocator.allocate('hvm_start_info', blockSize, { prefer: 0x6000n, min: 0x1000n });
  }
  const moduleRanges = modules.map((m, i) => {
    const size = BigInt(m.data.length);
    const start = allocator.allocate(`modules[${i}]`, size > 0n ? size : 1n, { min: elf.highestAddress });
    return { start, end: (start + size) as GuestAddress };
  });

  const w = new StructWriter(Number(blockSize));
  w.u32(0, HVM_START_MAGIC_VALUE);
  w.u32(4, 1); // version 1: has the memory map fields
  w.u32(8, 0); // flags
  w.u32(12, modules.length);
  w.u64(16, modules.length > 0 ? si + BigInt(modlistOff) : 0n);
  w.u64(24, si + BigInt(cmdlineOff));
  w.u64(32, rsdp);
  w.u64(40, si + BigInt(memmapOff));
  w.u32(48, memoryMap.length);
  moduleRanges.forEach((m, i) => {
    const o = modlistOff + i * MODLIST_ENTRY_SIZE;
    w.u64(o, m.start);
    w.u64(o + 8, BigInt(m.end) - BigInt(m.start));
    w.u64(o + 16, moduleStrings[i] === undefined ? 0n : si + BigInt(modStrOffs[i] as number));
  });
  memoryMap.forEach((e, i) => {
    const o = memmapOff + i * MEMMAP_ENTRY_SIZE;
    w.u64(o, e.start);
    w.u64(o + 8, e.size);
    w.u32(o + 16, e.type);
  });
  w.set(cmdlineOff, cmdline);
  moduleStrings.forEach((s, i) => {
    if (s !== undefined) w.set(modStrOffs[i] as number, s);
  });

  plan.copy(si, w.bytes, 'hvm_start_info');
  modules.forEach((m, i) => plan.copy(BigInt((moduleRanges[i] as AddressRange).start), m.data, `modules[${i}]`));
  plan.commit(memory);

  return {
    entry,
    startInfoAddress: si as GuestAddress,
    registers: { ebx: si },
    elf,
    modules: moduleRanges,
    memoryMap,
    entryState: { mode: 'protected32', rip: entry, registers: { rbx: si } },
  };
}
