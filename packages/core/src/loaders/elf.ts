/**
 * ELF32/ELF64 static executables for x86: parse and validate the file header and every
 * program header, check that each `PT_LOAD` segment lies in guest RAM and overlaps no other,
 * and only then copy file data and zero the bss. Also iterates `PT_NOTE` notes (PVH needs the
 * Xen entry note).
 * @module
 */
import { ImageFormatError, InvalidArgumentError } from '../errors.js';
import { type GuestAddress, hex, MAX_GUEST_PHYS } from '../address.js';
import type { GuestMemory } from '../memory.js';
import { AddressAllocator, type AddressRange, LoadPlan } from './bootinfo.js';
import { ImageReader } from './bytes.js';

const PT_LOAD = 1;
const PT_NOTE = 4;
const ET_EXEC = 2;
/** `e_machine` values accepted: Intel 80386 and AMD x86-64. */
const EM_386 = 3;
const EM_X86_64 = 62;
/** `e_phnum` escape meaning "the real count is in section 0" — never used by kernels. */
const PN_XNUM = 0xffff;

/** Options for {@link loadElf}. */
export interface ElfLoadOptions {
  /**
   * Which program-header address places each segment: `'physical'` (`p_paddr`, the default,
   * what boot loaders use) or `'virtual'` (`p_vaddr`, for identity-linked images).
   */
  readonly addresses?: 'physical' | 'virtual';
}

/** One program header, as parsed. */
export interface ElfProgramHeader {
  /** Index in the program header table. */
  readonly index: number;
  /** `p_type`. */
  readonly type: number;
  /** `p_offset`. */
  readonly offset: bigint;
  /** `p_vaddr`. */
  readonly vaddr: bigint;
  /** `p_paddr`. */
  readonly paddr: bigint;
  /** `p_filesz`. */
  readonly filesz: bigint;
  /** `p_memsz`. */
  readonly memsz: bigint;
  /** `p_align`. */
  readonly align: bigint;
}

/** A structurally valid ELF executable (nothing about guest RAM checked yet). */
export interface ElfImage {
  /** ELFCLASS32 or ELFCLASS64. */
  readonly class: 32 | 64;
  /** `e_machine`. */
  readonly machine: number;
  /** `e_entry`. */
  readonly entry: bigint;
  /** Every program header; `PT_LOAD` and `PT_NOTE` ones are bounds-checked against the file. */
  readonly programHeaders: readonly ElfProgramHeader[];
}

/** Where {@link loadElf} put things. */
export interface ElfLoadResult {
  /** `e_entry`, unchanged. */
  readonly entry: bigint;
  /** Each non-empty `PT_LOAD` segment's guest range (file data plus bss), in header order. */
  readonly segments: readonly AddressRange[];
  /** One past the last byte of the highest segment: the first free address above the image. */
  readonly highestAddress: GuestAddress;
  /** ELF class. */
  readonly class: 32 | 64;
}

/** One ELF note. */
export interface ElfNote {
  /** Owner name without the terminating NUL (e.g. `Xen`, `GNU`). */
  readonly name: string;
  /** `n_type`. */
  readonly type: number;
  /** The descriptor bytes (a view into the image). */
  readonly desc: Uint8Array;
  /** Index of the `PT_NOTE` program header that holds the note. */
  readonly segment: number;
}

/**
 * Parses and validates the ELF header and program header table.
 * @throws ImageFormatError - naming the offending field (`e_ident[EI_MAG]`, `e_phoff`,
 * `phdr[2].p_filesz`, ...).
 */
export function parseElf(image: Uint8Array): ElfImage {
  const r = new ImageReader(image);
  r.check(0, 16, 'e_ident');
  if (r.u8(0, 'e_ident') !== 0x7f || r.u8(1, 'e_ident') !== 0x45 || r.u8(2, 'e_ident') !== 0x4c || r.u8(3, 'e_ident') !== 0x46) {
    throw new ImageFormatError('e_ident[EI_MAG]', 'not an ELF file (bad magic)');
  }
  const cls = r.u8(4, 'e_ident[EI_CLASS]');
  if (cls !== 1 && cls !== 2) throw new ImageFormatError('e_ident[EI_CLASS]', `unknown ELF class ${cls}`);
  const is64 = cls === 2;
  if (r.u8(5, 'e_ident[EI_DATA]') !== 1) throw new ImageFormatError('e_ident[EI_DATA]', 'not little-endian');
  if (r.u8(6, 'e_ident[EI_VERSION]') !== 1) throw new ImageFormatError('e_ident[EI_VERSION]', 'not ELF version 1');
  const ehsize = is64 ? 64 : 52;
  r.check(0, ehsize, 'e_ehsize');
  const type = r.u16(16, 'e_type');
  if (type !== ET_EXEC) throw new ImageFormatError('e_type', `${type} is not ET_EXEC (only static executables load)`);
  const machine = r.u16(18, 'e_machine');
  if (machine !== EM_386 && machine !== EM_X86_64) throw new ImageFormatError('e_machine', `${machine} is not x86 (3) or x86-64 (62)`);
  if (r.u32(20, 'e_version') !== 1) throw new ImageFormatError('e_version', 'not ELF version 1');
  const entry = is64 ? r.u64(24, 'e_entry') : BigInt(r.u32(24, 'e_entry'));
  const phoff = is64 ? r.u64(32, 'e_phoff') : BigInt(r.u32(28, 'e_phoff'));
  const phentsize = r.u16(is64 ? 54 : 42, 'e_phentsize');
  const phnum = r.u16(is64 ? 56 : 44, 'e_phnum');
  const wantPhent = is64 ? 56 : 32;
  if (phentsize !== wantPhent) throw new ImageFormatError('e_phentsize', `${phentsize}, expected ${wantPhent}`);
  if (phnum === 0) throw new ImageFormatError('e_phnum', 'no program headers');
  if (phnum === PN_XNUM) throw new ImageFormatError('e_phnum', 'extended numbering (PN_XNUM) is not supported');
  r.check(phoff, BigInt(phnum) * BigInt(phentsize), 'e_phoff');

  const headers: ElfProgramHeader[] = [];
  for (let i = 0; i < phnum; i++) {
    const b = phoff + BigInt(i * phentsize);
    const f = (name: string): string => `phdr[${i}].${name}`;
    const ph: ElfProgramHeader = is64
      ? {
          index: i,
          type: r.u32(b, f('p_type')),
          offset: r.u64(b + 8n, f('p_offset')),
          vaddr: r.u64(b + 16n, f('p_vaddr')),
          paddr: r.u64(b + 24n, f('p_paddr')),
          filesz: r.u64(b + 32n, f('p_filesz')),
          memsz: r.u64(b + 40n, f('p_memsz')),
          align: r.u64(b + 48n, f('p_align')),
        }
      : {
          index: i,
          type: r.u32(b, f('p_type')),
          offset: BigInt(r.u32(b + 4n, f('p_offset'))),
          vaddr: BigInt(r.u32(b + 8n, f('p_vaddr'))),
          paddr: BigInt(r.u32(b + 12n, f('p_paddr'))),
          filesz: BigInt(r.u32(b + 16n, f('p_filesz'))),
          memsz: BigInt(r.u32(b + 20n, f('p_memsz'))),
          align: BigInt(r.u32(b + 28n, f('p_align'))),
        };
    if (ph.type === PT_LOAD || ph.type === PT_NOTE) {
      if (ph.type === PT_LOAD && ph.filesz > ph.memsz) {
        throw new ImageFormatError(f('p_filesz'), `${hex(ph.filesz)} exceeds p_memsz ${hex(ph.memsz)}`);
      }
      r.check(ph.offset, ph.filesz, f('p_offset'));
    }
    headers.push(ph);
  }
  if (!headers.some((h) => h.type === PT_LOAD)) throw new ImageFormatError('e_phnum', 'no PT_LOAD segment');
  return { class: is64 ? 64 : 32, machine, entry, programHeaders: headers };
}

/**
 * Validates an ELF load against guest RAM and returns the writes it needs without performing
 * them; {@link loadElf} is this plus `plan.commit(memory)`. Other loaders use it to validate
 * the kernel together with their boot structures.
 * @param allocator - records the segments so later placements avoid them.
 */
export function planElf(
  image: Uint8Array,
  allocator: AddressAllocator,
  options: ElfLoadOptions = {},
): { readonly plan: LoadPlan; readonly result: ElfLoadResult } {
  const addresses = options.addresses ?? 'physical';
  if (addresses !== 'physical' && addresses !== 'virtual') {
    throw new InvalidArgumentError('addresses', `must be 'physical' or 'virtual', got ${String(addresses)}`);
  }
  const elf = parseElf(image);
  const plan = new LoadPlan();
  const segments: AddressRange[] = [];
  let highest = 0n;
  for (const ph of elf.programHeaders) {
    if (ph.type !== PT_LOAD || ph.memsz === 0n) continue;
    const addrField = `phdr[${ph.index}].${addresses === 'physical' ? 'p_paddr' : 'p_vaddr'}`;
    const start = addresses === 'physical' ? ph.paddr : ph.vaddr;
    const end = start + ph.memsz;
    if (end > MAX_GUEST_PHYS + 1n) throw new ImageFormatError(addrField, `segment [${hex(start)}, +${hex(ph.memsz)}) overflows the guest-physical address space`);
    allocator.claimImage(addrField, start, ph.memsz);
    const offset = Number(ph.offset);
    plan.copy(start, image.subarray(offset, offset + Number(ph.filesz)), addrField);
    plan.zero(start + ph.filesz, ph.memsz - ph.filesz, `phdr[${ph.index}].p_memsz`);
    segments.push({ start: start as GuestAddress, end: end as GuestAddress });
    if (end > highest) highest = end;
  }
  if (segments.length === 0) throw new ImageFormatError('e_phnum', 'every PT_LOAD segment is empty');
  return { plan, result: { entry: elf.entry, segments, highestAddress: highest as GuestAddress, class: elf.class } };
}

/**
 * Loads an ELF executable into guest RAM. Everything is validated first; on any error guest
 * memory is unchanged.
 * @throws ImageFormatError - malformed or truncated file, segment outside RAM or overlapping another.
 *
 * @example Load a static ELF and enter it at ring 0 (32-bit protected mode, or long mode for ELF64)
 * ```ts
 * import { readFileSync } from 'node:fs';
 * import { Machine, loadElf } from '@tsvm/core';
 *
 * await using vm = await Machine.create({ memory: 16 * 1024 * 1024 });
 * const r = loadElf(vm.memory, readFileSync('guest.elf'));          // validated first: memory untouched on error
 * vm.enter(r.class === 64
 *   ? { mode: 'long64', rip: r.entry, registers: {}, identityMap: r.segments }
 *   : { mode: 'protected32', rip: r.entry, registers: {} });
 * const stop = await vm.run({ timeout: 5000 });
 * ```
 */
export function loadElf(memory: GuestMemory, image: Uint8Array, options: ElfLoadOptions = {}): ElfLoadResult {
  const { plan, result } = planElf(image, new AddressAllocator(memory), options);
  plan.commit(memory);
  return result;
}

/**
 * Iterates the notes of every `PT_NOTE` segment. The header is validated before the first
 * note is produced; a malformed note throws when reached.
 */
export function* elfNotes(image: Uint8Array): Generator<ElfNote, void, undefined> {
  const elf = parseElf(image);
  const r = new ImageReader(image);
  for (const ph of elf.programHeaders) {
    if (ph.type !== PT_NOTE) continue;
    // gABI: 8-byte padding in segments aligned to 8 (GNU property notes); 4 elsewhere, which is
    // what Linux and Xen emit even in ELF64.
    const align = ph.align === 8n ? 8 : 4;
    const pad = (n: number): number => (n + align - 1) & ~(align - 1);
    const base = Number(ph.offset);
    const size = Number(ph.filesz);
    let pos = 0;
    while (pos < size) {
      const field = `phdr[${ph.index}].note@${hex(pos)}`;
      if (size - pos < 12) throw new ImageFormatError(field, 'truncated note header');
      const namesz = r.u32(base + pos, field);
      const descsz = r.u32(base + pos + 4, field);
      const type = r.u32(base + pos + 8, field);
      const nameOff = pos + 12;
      const descOff = nameOff + pad(namesz);
      const next = descOff + pad(descsz);
      if (descOff + descsz > size || namesz > size || descsz > size) throw new ImageFormatError(field, `note (namesz ${namesz}, descsz ${descsz}) runs past its segment`);
      let name = '';
      for (let i = 0; i < namesz; i++) {
        const c = image[base + nameOff + i] as number;
        if (c === 0) break;
        name += String.fromCharCode(c);
      }
      yield { name, type, desc: image.subarray(base + descOff, base + descOff + descsz), segment: ph.index };
      pos = next;
    }
  }
}
