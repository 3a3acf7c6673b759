/**
 * The Linux x86 boot protocol for bzImage kernels (Documentation/arch/x86/boot.rst): parse the
 * setup header, load the protected-mode kernel, place the command line and initrd, and build
 * `boot_params` (the "zero page") with an E820 table. The kernel is entered at its 64-bit
 * entry (load address + 0x200, protocol ≥ 2.12 with `XLF_KERNEL_64`) or its 32-bit entry
 * (the load address), with RSI/ESI pointing at `boot_params`.
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
  type EntryState,
  LoadPlan,
  type MemoryMapEntry,
  optionalAddress,
  type ReservedRange,
} from './bootinfo.js';
import { alignUp, cString, ImageReader, StructWriter } from './bytes.js';

/** Offsets inside the image / `boot_params` (the setup header sits at the same place in both). */
const HDR = {
  setup_sects: 0x1f1,
  syssize: 0x1f4,
  boot_flag: 0x1fe,
  jump: 0x200,
  header: 0x202,
  version: 0x206,
  type_of_loader: 0x210,
  loadflags: 0x211,
  code32_start: 0x214,
  ramdisk_image: 0x218,
  ramdisk_size: 0x21c,
  cmd_line_ptr: 0x228,
  initrd_addr_max: 0x22c,
  kernel_alignment: 0x230,
  relocatable_kernel: 0x234,
  xloadflags: 0x236,
  cmdline_size: 0x238,
  pref_address: 0x258,
  init_size: 0x260,
} as const;
/** `boot_params` fields outside the setup header. */
const BP = {
  acpi_rsdp_addr: 0x070,
  ext_ramdisk_image: 0x0c0,
  ext_ramdisk_size: 0x0c4,
  ext_cmd_line_ptr: 0x0c8,
  e820_entries: 0x1e8,
  /** The setup header may not extend past here (`edd_mbr_sig_buffer` follows). */
  hdr_limit: 0x290,
  e820_table: 0x2d0,
  size: 0x1000,
} as const;
const E820_MAX_ENTRIES_ZEROPAGE = 128;
const E820_ENTRY_SIZE = 20;

const LOADED_HIGH = 1 << 0;
const XLF_KERNEL_64 = 1 << 0;
const HDRS_MAGIC = 0x53726448; // "HdrS"
/** Oldest protocol accepted: 2.06 gives `cmdline_size` and a 32-bit entry with `boot_params`. */
export const MIN_BOOT_PROTOCOL = 0x0206;
/** First protocol with the 64-bit entry point. */
export const BOOT_PROTOCOL_64BIT = 0x020c;

/** The fields of the setup header a loader needs. */
export interface LinuxSetupHeader {
  /** Protocol version, e.g. 0x020f for 2.15. */
  readonly version: number;
  /** Setup sectors (0 in the image is read as 4). */
  readonly setupSects: number;
  /** Protected-mode code size in 16-byte paragraphs. */
  readonly syssize: number;
  /** `loadflags`. */
  readonly loadflags: number;
  /** `xloadflags` (0 before 2.12). */
  readonly xloadflags: number;
  /** Maximum command line length, excluding the NUL. */
  readonly cmdlineSize: number;
  /** Highest address the initrd's last byte may occupy. */
  readonly initrdAddrMax: number;
  /** Physical alignment the kernel wants (if relocatable). */
  readonly kernelAlignment: number;
  /** Whether the kernel relocates itself. */
  readonly relocatable: boolean;
  /** Preferred load address (protocol ≥ 2.10), else 0x100000. */
  readonly prefAddress: bigint;
  /** Linear memory the kernel needs from its runtime start while decompressing (≥ 2.10), else 0. */
  readonly initSize: number;
  /** Image offset one past the setup header (`0x202 + byte at 0x201`, capped at 0x290). */
  readonly headerEnd: number;
}

/** A validated bzImage. */
export interface BzImage {
  /** The parsed header. */
  readonly header: LinuxSetupHeader;
  /** Bytes of real-mode setup code preceding the protected-mode kernel. */
  readonly setupSize: number;
  /** The protected-mode kernel (a view into the image). */
  readonly kernel: Uint8Array;
  /** Whether the 64-bit entry point exists. */
  readonly supports64: boolean;
}

/** Options for {@link loadLinux}. */
export interface LinuxBootOptions {
  /** Kernel command line; empty by default. */
  readonly cmdline?: string;
  /** Initial ramdisk contents. */
  readonly initrd?: Uint8Array;
  /** `'64'` (the default when supported), `'32'`, or `'auto'` (64 if the image has it, else 32). */
  readonly entry?: '64' | '32' | 'auto';
  /** Where the protected-mode kernel goes: 0x100000 (`'default'`), `pref_address` (`'preferred'`) or an address. */
  readonly loadAddress?: 'default' | 'preferred' | number | bigint;
  /** Where `boot_params` goes; 0x7000 by default. */
  readonly bootParamsAddress?: number | bigint;
  /** Where the command line goes; 0x20000 by default. */
  readonly cmdlineAddress?: number | bigint;
  /** Where the initrd goes; by default as high as `initrd_addr_max` and RAM allow. */
  readonly initrdAddress?: number | bigint;
  /** ACPI RSDP address for `boot_params.acpi_rsdp_addr` (protocol ≥ 2.14); not set by default. */
  readonly rsdpAddress?: number | bigint;
  /** Ranges to mark non-RAM in the E820 table. */
  readonly reserved?: readonly ReservedRange[];
  /** Ranges the loader must not place anything in (the Machine's GDT, page tables, stack). */
  readonly avoid?: readonly { readonly start: number | bigint; readonly size: number | bigint }[];
}

/** Where {@link loadLinux} put things and how to enter the kernel. */
export interface LinuxLoadResult {
  /** Which entry point {@link LinuxLoadResult.entryState} uses. */
  readonly mode: 64 | 32;
  /** Boot protocol version of the image. */
  readonly protocolVersion: number;
  /** Guest address of `boot_params`. */
  readonly bootParamsAddress: GuestAddress;
  /** Where the protected-mode kernel was copied. */
  readonly kernel: AddressRange;
  /** Memory the kernel may use while decompressing (kept free of everything else). */
  readonly kernelFootprint: readonly AddressRange[];
  /** Guest address of the NUL-terminated command line. */
  readonly cmdlineAddress: GuestAddress;
  /** Where the initrd went, if one was given. */
  readonly initrd?: AddressRange;
  /** The E820 table written into `boot_params`. */
  readonly e820: readonly MemoryMapEntry[];
  /**
   * 64-bit: long mode at load + 0x200, RSI = boot_params, page tables identity-mapping the
   * entry state's `identityMap` ranges. 32-bit: flat protected mode at the load address,
   * ESI = boot_params. Either way the boot protocol wants a GDT with a flat code segment at
   * selector 0x10 (`__BOOT_CS`) and a flat data segment at 0x18 (`__BOOT_DS`), loaded into
   * CS and DS/ES/SS, and interrupts disabled.
   */
  readonly entryState: EntryState;
}

/**
 * Parses and validates a bzImage's setup header.
 * @throws ImageFormatError - `boot_flag`, `header` (no "HdrS"), `version` too old,
 * `loadflags` (not a bzImage), `setup_sects`/`syssize` beyond the file, bad `kernel_alignment`.
 */
export function parseBzImage(image: Uint8Array): BzImage {
  const r = new ImageReader(image);
  if (r.u16(HDR.boot_flag, 'boot_flag') !== 0xaa55) throw new ImageFormatError('boot_flag', 'is not 0xAA55');
  if (r.u32(HDR.header, 'header') !== HDRS_MAGIC) throw new ImageFormatError('header', 'no "HdrS" magic at 0x202 (not a bzImage, or a pre-2.0 kernel)');
  const version = r.u16(HDR.version, 'version');
  if (version < MIN_BOOT_PROTOCOL) throw new ImageFormatError('version', `boot protocol ${protocolString(version)} is older than 2.06`);
  const rawSects = r.u8(HDR.setup_sects, 'setup_sects');
  const setupSects = rawSects === 0 ? 4 : rawSects;
  const setupSize = (setupSects + 1) * 512;
  const headerEnd = Math.min(0x202 + r.u8(HDR.jump + 1, 'jump'), BP.hdr_limit);
  r.check(0, Math.max(headerEnd, HDR.cmdline_size + 4), 'header');
  r.check(0, setupSize, 'setup_sects');
  const syssize = r.u32(HDR.syssize, 'syssize');
  const kernelSize = image.length - setupSize;
  if (kernelSize <= 0) throw new ImageFormatError('setup_sects', 'no protected-mode kernel follows the setup code');
  if (syssize * 16 > kernelSize) throw new ImageFormatError('syssize', `protected-mode kernel needs ${syssize * 16} bytes, image has ${kernelSize}`);
  const loadflags = r.u8(HDR.loadflags, 'loadflags');
  if ((loadflags & LOADED_HIGH) === 0) throw new ImageFormatError('loadflags', 'LOADED_HIGH is clear: a zImage, which must load below 1 MiB, is not supported');
  const xloadflags = version >= 0x020c ? r.u16(HDR.xloadflags, 'xloadflags') : 0;
  const relocatable = r.u8(HDR.relocatable_kernel, 'relocatable_kernel') !== 0;
  const kernelAlignment = r.u32(HDR.kernel_alignment, 'kernel_alignment');
  if (relocatable && (kernelAlignment === 0 || (kernelAlignment & (kernelAlignment - 1)) !== 0)) {
    throw new ImageFormatError('kernel_alignment', `${hex(kernelAlignment)} is not a power of two`);
  }
  const hasPref = version >= 0x020a;
  if (hasPref) r.check(0, HDR.init_size + 4, 'init_size');
  const header: LinuxSetupHeader = {
    version,
    setupSects,
    syssize,
    loadflags,
    xloadflags,
    cmdlineSize: r.u32(HDR.cmdline_size, 'cmdline_size'),
    initrdAddrMax: r.u32(HDR.initrd_addr_max, 'initrd_addr_max'),
    kernelAlignment,
    relocatable,
    prefAddress: hasPref ? r.u64(HDR.pref_address, 'pref_address') : 0x100000n,
    initSize: hasPref ? r.u32(HDR.init_size, 'init_size') : 0,
    headerEnd,
  };
  return {
    header,
    setupSize,
    kernel: image.subarray(setupSize),
    supports64: version >= BOOT_PROTOCOL_64BIT && (xloadflags & XLF_KERNEL_64) !== 0,
  };
}

function protocolString(v: number): string {
  return `${v >> 8}.${(v & 0xff).toString().padStart(2, '0')}`;
}

/**
 * The ranges the kernel occupies at boot: the copied image, and the buffer of `init_size`
 * bytes starting where the decompressor will put the kernel — `max(align_up(load,
 * kernel_alignment), pref_address)` for a relocatable kernel (arch/x86/boot/compressed/head_64.S
 * computes exactly this), `pref_address` otherwise.
 */
function kernelFootprint(bz: BzImage, load: bigint): { start: bigint; end: bigint }[] {
  const h = bz.header;
  const copied = { start: load, end: load + BigInt(bz.kernel.length) };
  if (h.initSize === 0) return [copied];
  let out = h.prefAddress;
  if (h.relocatable) {
    const aligned = alignUp(load, BigInt(h.kernelAlignment));
    if (aligned > out) out = aligned;
  }
  const buffer = { start: out, end: out + BigInt(h.initSize) };
  if (buffer.start <= copied.end && copied.start <= buffer.end) {
    return [{ start: copied.start < buffer.start ? copied.start : buffer.start, end: copied.end > buffer.end ? copied.end : buffer.end }];
  }
  return [copied, buffer].sort((a, b) => (a.start < b.start ? -1 : 1));
}

/**
 * Loads a bzImage with the 64-bit (or 32-bit) boot protocol. Everything — header, kernel
 * footprint, command line length, initrd placement, E820 size — is validated before guest
 * memory is written.
 * @throws ImageFormatError - malformed image or a kernel that does not fit in RAM.
 * @throws InvalidArgumentError - command line longer than `cmdline_size`, an initrd that cannot
 * be placed, caller-chosen addresses that collide, too many E820 entries.
 *
 * @example A bzImage and an initrd through the Linux boot protocol
 * ```ts
 * import { readFileSync } from 'node:fs';
 * import { Machine, loadLinux } from '@tsvm/core';
 *
 * await using vm = await Machine.create({ memory: 256 * 1024 * 1024, irqchip: true });
 * const r = loadLinux(vm.memory, readFileSync('bzImage'), {
 *   cmdline: 'console=ttyS0 panic=-1',
 *   initrd: readFileSync('initrd.img'),
 *   avoid: vm.hostReserved(),
 * });
 * vm.enter(r.entryState);                                 // 64-bit entry when the image has one (r.mode)
 * const stop = await vm.run({ timeout: 300_000 });
 * ```
 */
export function loadLinux(memory: GuestMemory, image: Uint8Array, options: LinuxBootOptions = {}): LinuxLoadResult {
  const bz = parseBzImage(image);
  const h = bz.header;
  const wanted = options.entry ?? 'auto';
  if (wanted !== '64' && wanted !== '32' && wanted !== 'auto') throw new InvalidArgumentError('entry', `must be '64', '32' or 'auto', got ${String(wanted)}`);
  if (wanted === '64' && !bz.supports64) {
    throw new ImageFormatError(h.version < BOOT_PROTOCOL_64BIT ? 'version' : 'xloadflags', `no 64-bit entry point (protocol ${protocolString(h.version)}, xloadflags ${hex(h.xloadflags)})`);
  }
  const mode: 64 | 32 = wanted === '32' || !bz.supports64 ? 32 : 64;

  const cmdline = cString(options.cmdline ?? '', 'cmdline');
  if (cmdline.length - 1 > h.cmdlineSize) throw new InvalidArgumentError('cmdline', `${cmdline.length - 1} bytes exceeds the kernel's cmdline_size of ${h.cmdlineSize}`);
  const initrd = options.initrd;
  if (initrd !== undefined && !(initrd instanceof Uint8Array)) throw new InvalidArgumentError('initrd', 'must be a Uint8Array');

  const allocator = new AddressAllocator(memory);
  applyAvoid(allocator, options.avoid);

  let load: bigint;
  const la = options.loadAddress ?? 'default';
  if (la === 'default') load = 0x100000n;
  else if (la === 'preferred') load = h.prefAddress;
  else load = optionalAddress(la, 'loadAddress') as bigint;
  if (load % 16n !== 0n) throw new InvalidArgumentError('loadAddress', `${hex(load)} is not 16-byte aligned`);
  const footprint = kernelFootprint(bz, load);
  for (const f of footprint) {
    if (f.end > 0x1_0000_0000n) throw new ImageFormatError('init_size', `the kernel's memory [${hex(f.start)}, ${hex(f.end)}) runs past 4 GiB`);
    allocator.claimImage(f.start === load ? 'kernel' : 'init_size', f.start, f.end - f.start);
  }
  const kernelTop = footprint.reduce((m, f) => (f.end > m ? f.end : m), 0n);

  const bpArg = optionalAddress(options.bootParamsAddress, 'bootParamsAddress');
  let bootParams: bigint;
  if (bpArg !== undefined) {
    if (bpArg + BigInt(BP.size) > 0x1_0000_0000n) throw new InvalidArgumentError('bootParamsAddress', 'must lie below 4 GiB');
    allocator.claimArgument('bootParamsAddress', bpArg, BigInt(BP.size));
    bootParams = bpArg;
  } else {
    bootParams = allocator.allocate('boot_params', BigInt(BP.size), { prefer: 0x7000n, min: 0x1000n });
  }
  const clArg = optionalAddress(options.cmdlineAddress, 'cmdlineAddress');
  let cmdlineAddr: bigint;
  if (clArg !== undefined) {
    if (clArg + BigInt(cmdline.length) > 0x1_0000_0000n) throw new InvalidArgumentError('cmdlineAddress', 'must lie below 4 GiB');
    allocator.claimArgument('cmdlineAddress', clArg, BigInt(cmdline.length));
    cmdlineAddr = clArg;
  } else {
    cmdlineAddr = allocator.allocate('cmdline', BigInt(cmdline.length), { prefer: 0x20000n, min: 0x1000n, align: 16n });
  }

  let initrdRange: AddressRange | undefined;
  if (initrd !== undefined && initrd.length > 0) {
    // initrd_addr_max is the highest address the last byte may occupy.
    const limit = BigInt(h.initrdAddrMax) + 1n;
    const size = BigInt(initrd.length);
    const irArg = optionalAddress(options.initrdAddress, 'initrdAddress');
    let start: bigint;
    if (irArg !== undefined) {
      if (irArg + size > limit) throw new InvalidArgumentError('initrdAddress', `the initrd would end at ${hex(irArg + size)}, above initrd_addr_max ${hex(h.initrdAddrMax)}`);
      allocator.claimArgument('initrdAddress', irArg, size);
      start = irArg;
    } else {
      try {
        start = allocator.allocate('initrd', size, { fromTop: true, min: kernelTop, max: limit });
      } catch (e) {
        throw new InvalidArgumentError('initrd', `${initrd.length} bytes do not fit in free RAM between the kernel (${hex(kernelTop)}) and initrd_addr_max (${hex(h.initrdAddrMax)}): ${(e as Error).message}`);
      }
    }
    initrdRange = { start: start as GuestAddress, end: (start + size) as GuestAddress };
  }

  const e820 = buildMemoryMap(memory, options.reserved);
  if (e820.length > E820_MAX_ENTRIES_ZEROPAGE) {
    throw new InvalidArgumentError('reserved', `the memory map has ${e820.length} entries; boot_params holds ${E820_MAX_ENTRIES_ZEROPAGE}`);
  }
  const rsdp = optionalAddress(options.rsdpAddress, 'rsdpAddress');
  if (rsdp !== undefined && h.version < 0x020e) throw new InvalidArgumentError('rsdpAddress', `boot protocol ${protocolString(h.version)} has no acpi_rsdp_addr (needs 2.14)`);

  const bp = new StructWriter(BP.size);
  bp.set(HDR.setup_sects, image.subarray(HDR.setup_sects, h.headerEnd));
  bp.u8(HDR.type_of_loader, 0xff);
  bp.u32(HDR.code32_start, load);
  bp.u32(HDR.cmd_line_ptr, cmdlineAddr & 0xffff_ffffn);
  bp.u32(BP.ext_cmd_line_ptr, cmdlineAddr >> 32n);
  if (initrdRange !== undefined) {
    const start = BigInt(initrdRange.start);
    const size = BigInt(initrdRange.end) - start;
    bp.u32(HDR.ramdisk_image, start & 0xffff_ffffn);
    bp.u32(BP.ext_ramdisk_image, start >> 32n);
    bp.u32(HDR.ramdisk_size, size & 0xffff_ffffn);
    bp.u32(BP.ext_ramdisk_size, size >> 32n);
  }
  if (rsdp !== undefined) bp.u64(BP.acpi_rsdp_addr, rsdp);
  bp.u8(BP.e820_entries, e820.length);
  e820.forEach((e, i) => {
    const o = BP.e820_table + i * E820_ENTRY_SIZE;
    bp.u64(o, e.start);
    bp.u64(o + 8, e.size);
    bp.u32(o + 16, e.type);
  });

  const plan = new LoadPlan();
  plan.copy(load, bz.kernel, 'kernel');
  plan.copy(bootParams, bp.bytes, 'boot_params');
  plan.copy(cmdlineAddr, cmdline, 'cmdline');
  if (initrdRange !== undefined && initrd !== undefined) plan.copy(BigInt(initrdRange.start), initrd, 'initrd');
  plan.commit(memory);

  const kernel = { start: load as GuestAddress, end: (load + BigInt(bz.kernel.length)) as GuestAddress };
  const kernelFootprintRanges = footprint.map((f) => ({ start: f.start as GuestAddress, end: f.end as GuestAddress }));
  const registers = { rsi: bootParams };
  const entryState: EntryState =
    mode === 64
      ? {
          mode: 'long64',
          rip: load + 0x200n,
          registers,
          identityMap: [
            ...kernelFootprintRanges,
            { start: bootParams as GuestAddress, end: (bootParams + BigInt(BP.size)) as GuestAddress },
            { start: cmdlineAddr as GuestAddress, end: (cmdlineAddr + BigInt(cmdline.length)) as GuestAddress },
          ],
        }
      : { mode: 'protected32', rip: load, registers };
  return {
    mode,
    protocolVersion: h.version,
    bootParamsAddress: bootParams as GuestAddress,
    kernel,
    kernelFootprint: kernelFootprintRanges,
    cmdlineAddress: cmdlineAddr as GuestAddress,
    ...(initrdRange !== undefined ? { initrd: initrdRange } : {}),
    e820,
    entryState,
  };
}
