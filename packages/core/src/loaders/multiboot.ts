/**
 * Multiboot (version 1) kernels: find the header in the first 8 KiB, load the kernel either
 * from the a.out-kludge addresses (flag bit 16) or as ELF, place modules, and build the
 * multiboot information structure with a memory map, command line and boot loader name.
 * The guest is entered in flat 32-bit protected mode with EAX=0x2BADB002 and EBX=&info.
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
  E820Type,
  LoadPlan,
  type MemoryMapEntry,
  optionalAddress,
  type Protected32Entry,
  type ReservedRange,
} from './bootinfo.js';
import { cString, ImageReader, StructWriter } from './bytes.js';
import { planElf } from './elf.js';

/** The value a multiboot header starts with. */
export const MULTIBOOT_HEADER_MAGIC = 0x1badb002;
/** The value EAX holds when the kernel is entered. */
export const MULTIBOOT_BOOTLOADER_MAGIC = 0x2badb002;
/** How far into the image the header may start. */
export const MULTIBOOT_SEARCH_LIMIT = 8192;

const FLAG_PAGE_ALIGN = 1 << 0;
const FLAG_MEMORY_INFO = 1 << 1;
const FLAG_VIDEO_MODE = 1 << 2;
const FLAG_AOUT_KLUDGE = 1 << 16;
/** Required-feature bits (0–15) this loader understands; any other one set must fail the load. */
const KNOWN_REQUIRED = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE;

/** Bits of the info structure's `flags`. */
const INFO_MEMORY = 1 << 0;
const INFO_CMDLINE = 1 << 2;
const INFO_MODS = 1 << 3;
const INFO_MEM_MAP = 1 << 6;
const INFO_BOOT_LOADER_NAME = 1 << 9;

/** Size of `struct multiboot_info` up to and including the framebuffer fields (116), padded. */
const INFO_SIZE = 128;
const MMAP_ENTRY_SIZE = 24;
const MODULE_SIZE = 16;

/** A parsed multiboot header. */
export interface MultibootHeader {
  /** File offset of the magic. */
  readonly offset: number;
  /** `flags`. */
  readonly flags: number;
  /** The a.out-kludge address fields, present when flag bit 16 is set. */
  readonly aout?: {
    readonly headerAddr: number;
    readonly loadAddr: number;
    readonly loadEndAddr: number;
    readonly bssEndAddr: number;
    readonly entryAddr: number;
  };
}

/** A boot module (initrd, config file, ...) handed to the kernel. */
export interface MultibootModule {
  /** Contents. */
  readonly data: Uint8Array;
  /** The module's string (conventionally its command line); empty by default. */
  readonly cmdline?: string;
}

/** Options for {@link loadMultiboot}. */
export interface MultibootOptions {
  /** Kernel command line; empty by default. */
  readonly cmdline?: string;
  /** Modules, placed page-aligned above the kernel in the given order. */
  readonly modules?: readonly MultibootModule[];
  /**
   * Where the information block (info structure, memory map, module list, strings) goes;
   * by default the first free page above the kernel.
   */
  readonly infoAddress?: number | bigint;
  /** `boot_loader_name`; `tsvm` by default. */
  readonly bootLoaderName?: string;
  /** Ranges to mark non-RAM in the memory map. */
  readonly reserved?: readonly ReservedRange[];
  /** Ranges the loader must not place anything in (the Machine's own structures). */
  readonly avoid?: readonly { readonly start: number | bigint; readonly size: number | bigint }[];
}

/** Where {@link loadMultiboot} put things and how to enter the kernel. */
export interface MultibootLoadResult {
  /** Entry point (EIP). */
  readonly entry: bigint;
  /** Guest address of `struct multiboot_info`. */
  readonly infoAddress: GuestAddress;
  /** EAX = 0x2BADB002, EBX = {@link MultibootLoadResult.infoAddress}. */
  readonly registers: { readonly eax: bigint; readonly ebx: bigint };
  /** How the kernel was loaded. */
  readonly format: 'aout-kludge' | 'elf';
  /** The kernel's loaded ranges (text, data and bss). */
  readonly kernel: readonly AddressRange[];
  /** Each module's range, in order. */
  readonly modules: readonly AddressRange[];
  /** The memory map given to the kernel. */
  readonly memoryMap: readonly MemoryMapEntry[];
  /** Flat 32-bit protected mode, paging off, at {@link MultibootLoadResult.entry}. */
  readonly entryState: Protected32Entry;
}

/**
 * Finds and validates the multiboot header.
 * @throws ImageFormatError - no header (`multiboot.magic`), a magic without a valid checksum
 * (`multiboot.checksum`), unsupported required flags (`multiboot.flags`), or truncated fields.
 */
export function findMultibootHeader(image: Uint8Array): MultibootHeader {
  const r = new ImageReader(image);
  let badChecksum = false;
  const limit = Math.min(MULTIBOOT_SEARCH_LIMIT, image.length);
  for (let off = 0; off + 4 <= limit; off += 4) {
    if (r.u32(off, 'multiboot.magic') !== MULTIBOOT_HEADER_MAGIC) continue;
    if (off + 12 > image.length) {
      badChecksum = true;
      continue;
    }
    const flags = r.u32(off + 4, 'multiboot.flags');
    const checksum = r.u32(off + 8, 'multiboot.checksum');
    if (((MULTIBOOT_HEADER_MAGIC + flags + checksum) >>> 0) !== 0) {
      badChecksum = true;
      continue;
    }
    const unknown = flags & 0xffff & ~KNOWN_REQUIRED;
    if (unknown !== 0) throw new ImageFormatError('multiboot.flags', `requires features this loader does not provide (bits ${hex(unknown)})`);
    if ((flags & FLAG_AOUT_KLUDGE) === 0) return { offset: off, flags };
    const aout = {
      headerAddr: r.u32(off + 12, 'multiboot.header_addr'),
      loadAddr: r.u32(off + 16, 'multiboot.load_addr'),
      loadEndAddr: r.u32(off + 20, 'multiboot.load_end_addr'),
      bssEndAddr: r.u32(off + 24, 'multiboot.bss_end_addr'),
      entryAddr: r.u32(off + 28, 'multiboot.entry_addr'),
    };
    return { offset: off, flags, aout };
  }
  if (badChecksum) throw new ImageFormatError('multiboot.checksum', 'a header magic was found but its checksum does not match');
  throw new ImageFormatError('multiboot.magic', `no multiboot header in the first ${MULTIBOOT_SEARCH_LIMIT} bytes`);
}

/** Plans the a.out-kludge load: file bytes from `load_addr`'s offset, then bss. */
function planAout(
  image: Uint8Array,
  header: MultibootHeader & { aout: NonNullable<MultibootHeader['aout']> },
  allocator: AddressAllocator,
): { plan: LoadPlan; entry: bigint; kernel: AddressRange } {
  const { headerAddr, loadAddr, loadEndAddr, bssEndAddr, entryAddr } = header.aout;
  if (headerAddr < loadAddr) throw new ImageFormatError('multiboot.header_addr', `${hex(headerAddr)} is below load_addr ${hex(loadAddr)}`);
  const fileStart = header.offset - (headerAddr - loadAddr);
  if (fileStart < 0) throw new ImageFormatError('multiboot.load_addr', `would start ${-fileStart} bytes before the file`);
  let loadSize: number;
  if (loadEndAddr === 0) {
    loadSize = image.length - fileStart;
  } else {
    if (loadEndAddr <= loadAddr) throw new ImageFormatError('multiboot.load_end_addr', `${hex(loadEndAddr)} is not above load_addr ${hex(loadAddr)}`);
    loadSize = loadEndAddr - loadAddr;
    if (fileStart + loadSize > image.length) {
      throw new ImageFormatError('multiboot.load_end_addr', `needs ${fileStart + loadSize} bytes of file, image has ${image.length}`);
    }
  }
  const loadEnd = loadAddr + loadSize;
  if (loadEnd > 0x1_0000_0000) throw new ImageFormatError('multiboot.load_end_addr', 'the kernel runs past 4 GiB');
  let end = loadEnd;
  if (bssEndAddr !== 0) {
    if (bssEndAddr < loadEnd) throw new ImageFormatError('multiboot.bss_end_addr', `${hex(bssEndAddr)} is below the end of the loaded data ${hex(loadEnd)}`);
    end = bssEndAddr;
  }
  if (entryAddr < loadAddr || entryAddr >= end) {
    throw new ImageFormatError('multiboot.entry_addr', `${hex(entryAddr)} is outside the loaded kernel [${hex(loadAddr)}, ${hex(end)})`);
  }
  allocator.claimImage('multiboot.load_addr', BigInt(loadAddr), BigInt(end - loadAddr));
  const plan = new LoadPlan();
  plan.copy(BigInt(loadAddr), image.subarray(fileStart, fileStart + loadSize), 'multiboot.load_addr');
  plan.zero(BigInt(loadEnd), BigInt(end - loadEnd), 'multiboot.bss_end_addr');
  return { plan, entry: BigInt(entryAddr), kernel: { start: BigInt(loadAddr) as GuestAddress, end: BigInt(end) as GuestAddress } };
}

/** `mem_lower`/`mem_upper` in KiB: RAM contiguous from 0 (≤ 640 KiB) and from 1 MiB. */
function memoryInfo(map: readonly MemoryMapEntry[]): { lower: number; upper: number } {
  const ramEndFrom = (from: bigint): bigint => {
    let end = from;
    for (const e of map) {
      if (e.type === E820Type.Ram && e.start <= end && e.start + e.size > end) end = e.start + e.size;
    }
    return end;
  };
  const lowEnd = ramEndFrom(0n);
  const lower = Number((lowEnd < 0xa0000n ? lowEnd : 0xa0000n) / 1024n);
  const upperKiB = (ramEndFrom(0x100000n) - 0x100000n) / 1024n;
  return { lower, upper: Number(upperKiB > 0xffff_ffffn ? 0xffff_ffffn : upperKiB) };
}

/**
 * Loads a multiboot kernel, its modules and the information structure. Everything is
 * validated (header, kernel placement, every structure fitting in RAM below 4 GiB) before
 * guest memory is written.
 * @throws ImageFormatError - bad or missing header, a kernel or module that does not fit.
 * @throws InvalidArgumentError - bad options (e.g. an `infoAddress` that collides).
 *
 * @example A multiboot kernel with one module, entered as a boot loader would (EAX magic, EBX info)
 * ```ts
 * import { readFileSync } from 'node:fs';
 * import { Machine, loadMultiboot } from '@tsvm/core';
 *
 * await using vm = await Machine.create({ memory: 64 * 1024 * 1024 });
 * const r = loadMultiboot(vm.memory, readFileSync('kernel.bin'), {
 *   cmdline: 'console=com1',
 *   modules: [{ data: readFileSync('initrd.img'), cmdline: 'initrd' }],
 *   avoid: vm.hostReserved(),                                        // keep clear of the host's tables
 * });
 * vm.enter(r.entryState);
 * const stop = await vm.run({ timeout: 10_000 });
 * ```
 */
export function loadMultiboot(memory: GuestMemory, image: Uint8Array, options: MultibootOptions = {}): MultibootLoadResult {
  const header = findMultibootHeader(image);
  const cmdline = cString(options.cmdline ?? '', 'cmdline');
  const loaderName = cString(options.bootLoaderName ?? 'tsvm', 'bootLoaderName');
  const modules = options.modules ?? [];
  if (!Array.isArray(modules)) throw new InvalidArgumentError('modules', 'must be an array');
  const moduleStrings = modules.map((m, i) => {
    if (!(m.data instanceof Uint8Array)) throw new InvalidArgumentError(`modules[${i}].data`, 'must be a Uint8Array');
    return cString(m.cmdline ?? '', `modules[${i}].cmdline`);
  });
  const infoAddress = optionalAddress(options.infoAddress, 'infoAddress');
  const memoryMap = buildMemoryMap(memory, options.reserved);

  const allocator = new AddressAllocator(memory);
  applyAvoid(allocator, options.avoid);
  let plan: LoadPlan;
  let entry: bigint;
  let kernel: readonly AddressRange[];
  let format: MultibootLoadResult['format'];
  if (header.aout !== undefined) {
    const a = planAout(image, { ...header, aout: header.aout }, allocator);
    ({ plan, entry } = a);
    kernel = [a.kernel];
    format = 'aout-kludge';
  } else {
    const e = planElf(image, allocator, { addresses: 'physical' });
    if (e.result.highestAddress > 0x1_0000_0000n) throw new ImageFormatError('phdr', 'a segment lies above 4 GiB, out of reach of a 32-bit kernel');
    plan = e.plan;
    entry = e.result.entry;
    kernel = e.result.segments;
    format = 'elf';
  }
  if (entry >= 0x1_0000_0000n) throw new ImageFormatError('e_entry', `${hex(entry)} is not reachable in 32-bit protected mode`);
  const kernelEnd = kernel.reduce((m, s) => (s.end > m ? BigInt(s.end) : m), 0n);

  // The information block: info struct, memory map, module list, then strings.
  const mmapOff = INFO_SIZE;
  const modsOff = mmapOff + memoryMap.length * MMAP_ENTRY_SIZE;
  let strOff = modsOff + modules.length * MODULE_SIZE;
  const cmdlineOff = strOff;
  strOff += cmdline.length;
  const nameOff = strOff;
  strOff += loaderName.length;
  const modStrOffs = moduleStrings.map((s) => {
    const o = strOff;
    strOff += s.length;
    return o;
  });
  const blockSize = BigInt(strOff);
  let info: bigint;
  if (infoAddress !== undefined) {
    if (infoAddress % 4n !== 0n) throw new InvalidArgumentError('infoAddress', `${hex(infoAddress)} is not 4-byte aligned`);
    if (infoAddress + blockSize > 0x1_0000_0000n) throw new InvalidArgumentError('infoAddress', 'the information block must lie below 4 GiB');
    allocator.claimArgument('infoAddress', infoAddress, blockSize);
    info = infoAddress;
  } else {
    info = allocator.allocate('multiboot info', blockSize, { min: kernelEnd });
  }
  const moduleRanges = modules.map((m, i) => {
    const size = BigInt(m.data.length);
    // Modules are always page-aligned (which satisfies flag bit 0); an empty one gets a range of 0.
    const start = size === 0n ? BigInt(allocator.allocate(`modules[${i}]`, 1n, { min: kernelEnd })) : allocator.allocate(`modules[${i}]`, size, { min: kernelEnd });
    return { start: start as GuestAddress, end: (start + size) as GuestAddress };
  });

  const w = new StructWriter(Number(blockSize));
  const { lower, upper } = memoryInfo(memoryMap);
  w.u32(0, INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MEM_MAP | INFO_BOOT_LOADER_NAME);
  w.u32(4, lower);
  w.u32(8, upper);
  w.u32(16, info + BigInt(cmdlineOff));
  w.u32(20, modules.length);
  w.u32(24, modules.length > 0 ? info + BigInt(modsOff) : 0n);
  w.u32(44, memoryMap.length * MMAP_ENTRY_SIZE);
  w.u32(48, info + BigInt(mmapOff));
  w.u32(64, info + BigInt(nameOff));
  memoryMap.forEach((e, i) => {
    const o = mmapOff + i * MMAP_ENTRY_SIZE;
    w.u32(o, MMAP_ENTRY_SIZE - 4); // `size` excludes itself
    w.u64(o + 4, e.start);
    w.u64(o + 12, e.size);
    w.u32(o + 20, e.type);
  });
  moduleRanges.forEach((m, i) => {
    const o = modsOff + i * MODULE_SIZE;
    w.u32(o, m.start);
    w.u32(o + 4, m.end);
    w.u32(o + 8, info + BigInt(modStrOffs[i] as number));
  });
  w.set(cmdlineOff, cmdline);
  w.set(nameOff, loaderName);
  moduleStrings.forEach((s, i) => w.set(modStrOffs[i] as number, s));

  plan.copy(info, w.bytes, 'multiboot info');
  modules.forEach((m, i) => plan.copy(BigInt((moduleRanges[i] as AddressRange).start), m.data, `modules[${i}]`));
  plan.commit(memory);

  const registers = { eax: BigInt(MULTIBOOT_BOOTLOADER_MAGIC), ebx: info };
  return {
    entry,
    infoAddress: info as GuestAddress,
    registers,
    format,
    kernel,
    modules: moduleRanges,
    memoryMap,
    entryState: { mode: 'protected32', rip: entry, registers: { rax: registers.eax, rbx: registers.ebx } },
  };
}
