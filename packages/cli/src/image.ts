/**
 * Images for `tsvm run`: which format the bytes are in, and loading them into a machine with the
 * loaders of `@tsvm/core`. Every rejection is an `ImageFormatError` (exit 4) or a {@link CliError}.
 * @module
 */
import { ImageFormatError, LEGACY_BIOS_HOLE, MULTIBOOT_HEADER_MAGIC, writeAcpiTables, writeMpTable, MULTIBOOT_SEARCH_LIMIT, findMultibootHeader, loadElf, loadLinux, loadMultiboot, parseBzImage, parseElf, type AcpiResult, type CpuMode, type Machine } from '@tsvm/core';
import { CliError, EXIT } from './exit-codes.js';

/** Image formats `tsvm run` loads. */
export const IMAGE_FORMATS = ['flat', 'elf', 'multiboot', 'linux'] as const;

/** One of {@link IMAGE_FORMATS}. */
export type ImageFormat = (typeof IMAGE_FORMATS)[number];

const u16 = (b: Uint8Array, o: number): number => (b[o] ?? 0) | ((b[o + 1] ?? 0) << 8);
const u32 = (b: Uint8Array, o: number): number => (u16(b, o) | (u16(b, o + 2) << 16)) >>> 0;

/**
 * The format of `bytes`, from their content: a bzImage (0xAA55 at 0x1fe and "HdrS" at 0x202),
 * a multiboot v1 kernel (the header magic, 4-aligned, in the first 8 KiB — checked before ELF
 * because a multiboot kernel is often an ELF file too), an ELF file (`\x7fELF`), else flat.
 */
export function detectFormat(bytes: Uint8Array): ImageFormat {
  if (bytes.length >= 0x206 && u16(bytes, 0x1fe) === 0xaa55 && u32(bytes, 0x202) === 0x53726448) return 'linux';
  const limit = Math.min(MULTIBOOT_SEARCH_LIMIT, bytes.length);
  for (let off = 0; off + 4 <= limit; off += 4) if (u32(bytes, off) === MULTIBOOT_HEADER_MAGIC) return 'multiboot';
  if (bytes.length >= 4 && bytes[0] === 0x7f && bytes[1] === 0x45 && bytes[2] === 0x4c && bytes[3] === 0x46) return 'elf';
  return 'flat';
}

/**
 * A size such as `16M`, `512K`, `1G` or `65536` (bytes), as a number of bytes.
 * @throws CliError (usage) for anything else, or a size that is not a whole number of 4 KiB pages.
 */
export function parseSize(text: string): number {
  const m = /^(\d+)\s*([KMG]?)(i?B)?$/i.exec(text.trim());
  if (!m) throw new CliError(EXIT.usage, `--memory: '${text}' is not a size (e.g. 16M, 512K, 1G)`);
  const unit = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3 }[(m[2] ?? '').toUpperCase() as '' | 'K' | 'M' | 'G'];
  const n = Number(m[1]) * unit;
  if (!Number.isSafeInteger(n) || n <= 0 || n % 4096 !== 0) throw new CliError(EXIT.usage, `--memory: ${text} must be a positive multiple of 4 KiB`);
  return n;
}

/** How to load an image. */
export interface LoadOptions {
  /** The format (detected when absent). */
  readonly format: ImageFormat;
  /** Flat images: CPU mode. */
  readonly mode: CpuMode;
  /** Flat images: privilege level. */
  readonly ring: 0 | 3;
  /** Flat images: load address (and entry point). */
  readonly at: number;
  /** Linux and multiboot: the kernel command line. */
  readonly cmdline?: string;
}

/**
 * Checks the headers of `bytes` as `format` without a machine, so a bad image is reported as one
 * (exit 4) on any host, before `/dev/kvm` is opened.
 * @throws ImageFormatError naming the field.
 */
export function checkImage(bytes: Uint8Array, format: ImageFormat): void {
  if (bytes.length === 0) throw new ImageFormatError('file', 'the image is empty');
  if (format === 'elf') parseElf(bytes);
  else if (format === 'multiboot') findMultibootHeader(bytes);
  else if (format === 'linux') parseBzImage(bytes);
}

/** What {@link loadImage} did. */
export interface LoadedImage {
  /** One line for people: format, entry, mode. */
  readonly description: string;
  /**
   * The ACPI tables written (Linux images only). Their FADT promises ACPI fixed hardware at
   * `acpi.power.pmBase`: the caller attaches an `AcpiPm` there before the guest runs, or the
   * kernel's first PM-timer read is an `unhandled-exit`.
   */
  readonly acpi: AcpiResult | undefined;
}

/** Loads `bytes` into `vm` and sets up the CPU to enter it. */
export function loadImage(vm: Machine, bytes: Uint8Array, o: LoadOptions): LoadedImage {
  const description = (s: string): LoadedImage => ({ description: s, acpi: undefined });
  checkImage(bytes, o.format);
  if (o.format !== 'flat' && o.ring !== 0) throw new CliError(EXIT.usage, `--ring 3 applies to flat images only; a ${o.format} image starts at ring 0`);
  switch (o.format) {
    case 'flat':
      vm.loadFlat(bytes, { at: o.at, mode: o.mode, ring: o.ring });
      return description(`flat image, ${bytes.length} bytes at 0x${o.at.toString(16)}, ${o.mode} mode, ring ${o.ring}`);
    case 'elf': {
      const cls = parseElf(bytes).class;
      const r = loadElf(vm.memory, bytes);
      vm.enter(cls === 64 ? { mode: 'long64', rip: r.entry, registers: {}, identityMap: r.segments } : { mode: 'protected32', rip: r.entry, registers: {} });
      return description(`ELF${cls}, ${r.segments.length} segments, entry 0x${r.entry.toString(16)}`);
    }
    case 'multiboot': {
      const r = loadMultiboot(vm.memory, bytes, o.cmdline === undefined ? {} : { cmdline: o.cmdline });
      vm.enter(r.entryState);
      return description(`multiboot (${r.format}), entry 0x${r.entry.toString(16)}`);
    }
    case 'linux': {
      // As the Linux example does: tell the kernel about the CPU and the in-kernel I/O APIC (MP
      // table and MADT), and keep the loader off the host's GDT, page tables and stack. The FADT
      // (`power`) gives the kernel a PM timer and the S5 sleep state, so a guest `poweroff` ends
      // the run as a `poweroff` stop instead of the kernel halting forever.
      const reserved = vm.hostReserved();
      writeMpTable(vm.memory);
      const acpi = writeAcpiTables(vm.memory, { power: true });
      const r = loadLinux(vm.memory, bytes, {
        reserved: [LEGACY_BIOS_HOLE, ...reserved], avoid: reserved, rsdpAddress: acpi.rsdpAddress,
        ...(o.cmdline === undefined ? {} : { cmdline: o.cmdline }),
      });
      vm.enter(r.entryState);
      const version = `${r.protocolVersion >> 8}.${(r.protocolVersion & 0xff).toString().padStart(2, '0')}`;
      return { description: `Linux bzImage, boot protocol ${version}, ${r.mode}-bit entry, ACPI PM at 0x${acpi.power?.pmBase.toString(16)}`, acpi };
    }
  }
}
