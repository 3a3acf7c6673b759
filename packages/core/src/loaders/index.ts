/**
 * Image loaders: pure functions from (guest memory, image bytes, options) to a typed result
 * saying where everything went and which CPU state the `Machine` must establish
 * ({@link EntryState}). They never touch vCPU registers, and they validate everything —
 * headers, segments, that every piece fits in RAM without colliding — before writing the
 * first byte, so a rejected image leaves guest memory untouched. Every rejection is an
 * `ImageFormatError` naming the offending field, or an `InvalidArgumentError` naming the option.
 *
 * - {@link loadElf}: ELF32/ELF64 static executables, by `p_paddr` (or `p_vaddr`).
 * - {@link loadMultiboot}: multiboot v1 (a.out kludge or ELF) with the multiboot info structure.
 * - {@link loadLinux}: bzImage via the Linux x86 boot protocol (64-bit or 32-bit entry).
 * - {@link loadPvh}: PVH direct boot of an ELF `vmlinux` with `hvm_start_info`;
 * {@link extractVmlinux} unpacks that ELF from a bzImage on the host.
 * - {@link writeMpTable}: an Intel MP table (CPUs, I/O APIC, ISA IRQ routing) for guests without ACPI;
 *   {@link writeAcpiTables}: the same facts as ACPI tables (RSDP, XSDT, MADT; with `power` a FADT,
 *   DSDT and FACS for the PM timer and S3/S5).
 * @module
 */
export {
  type AddressRange,
  AddressAllocator,
  type AllocateOptions,
  buildMemoryMap,
  E820Type,
  type EntryState,
  LEGACY_BIOS_HOLE,
  LoadPlan,
  type Long64Entry,
  type MemoryMapEntry,
  type PlannedWrite,
  type Protected32Entry,
  type ReservedRange,
} from './bootinfo.js';
export {
  type ElfImage,
  type ElfLoadOptions,
  type ElfLoadResult,
  type ElfNote,
  type ElfProgramHeader,
  elfNotes,
  loadElf,
  parseElf,
  planElf,
} from './elf.js';
export {
  findMultibootHeader,
  loadMultiboot,
  MULTIBOOT_BOOTLOADER_MAGIC,
  MULTIBOOT_HEADER_MAGIC,
  MULTIBOOT_SEARCH_LIMIT,
  type MultibootHeader,
  type MultibootLoadResult,
  type MultibootModule,
  type MultibootOptions,
} from './multiboot.js';
export {
  BOOT_PROTOCOL_64BIT,
  type BzImage,
  type LinuxBootOptions,
  type LinuxLoadResult,
  type LinuxSetupHeader,
  loadLinux,
  MIN_BOOT_PROTOCOL,
  parseBzImage,
} from './linux.js';
export {
  findPvhEntry,
  HVM_START_MAGIC_VALUE,
  loadPvh,
  type PvhLoadResult,
  type PvhModule,
  type PvhOptions,
  XEN_ELFNOTE_PHYS32_ENTRY,
} from './pvh.js';
export { type ExtractedVmlinux, extractVmlinux, type KernelCompression, lz4Legacy } from './vmlinux.js';
export {
  IOAPIC_DEFAULT_ADDRESS,
  LAPIC_DEFAULT_ADDRESS,
  MPTABLE_DEFAULT_ADDRESS,
  type MpTableOptions,
  type MpTableResult,
  mpTableSize,
  writeMpTable,
} from './mptable.js';
export {
  ACPI_DEFAULT_ADDRESS,
  ACPI_DEFAULT_SCI_IRQ,
  ACPI_PM_DEFAULT_BASE,
  ACPI_PM_LAYOUT,
  ACPI_SLEEP_TYPE,
  type AcpiOptions,
  type AcpiPowerOptions,
  type AcpiResult,
  sleepStatesAml,
  writeAcpiTables,
} from './acpi.js';
