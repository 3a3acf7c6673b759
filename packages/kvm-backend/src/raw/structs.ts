/**
 * KVM ABI structures as C layouts. They are the single source of truth for sizes and field
 * offsets: the codecs in `codec.ts` read and write plain byte buffers at {@link offsetOf}
 * positions (fast, no marshalling per exit), and `abi.test.ts` compares every size and offset
 * with the values a C compiler reports from `<linux/kvm.h>`.
 *
 * The layouts are computed here with C's rules (each field at its natural alignment, the size
 * rounded up to the largest alignment) rather than declared through koffi: koffi is a native
 * addon, and describing structs with it would load it on `import` — every program importing
 * `@tsvm/core` would pay for it, even one that only uses a loader or the mock backend. koffi is
 * now loaded by the first libc call (`libc.ts`), and the C compiler stays the referee.
 * @module
 */
import { TsvmError } from '../errors.js';

/** A C type's layout: size, alignment and (for structs) the offset of each named field. */
export interface CType {
  /** The C name (`uint32_t`, `kvm_regs`, `uint8_t[8]`), for messages. */
  readonly name: string;
  /** `sizeof`. */
  readonly size: number;
  /** `_Alignof`. */
  readonly align: number;
  /** `offsetof` for each field of a struct (empty for scalars and arrays). */
  readonly fields: Readonly<Record<string, number>>;
}

const scalar = (name: string, size: number): CType => ({ name, size, align: size, fields: {} });

/** `T[n]`. */
function array(el: CType, n: number): CType {
  return { name: `${el.name}[${n}]`, size: el.size * n, align: el.align, fields: {} };
}

/** A C struct laid out by the SysV x86-64 rules (no packing attribute in these headers). */
function struct(name: string, def: Record<string, CType>): CType {
  const fields: Record<string, number> = {};
  let at = 0;
  let align = 1;
  for (const [f, t] of Object.entries(def)) {
    at = Math.ceil(at / t.align) * t.align;
    fields[f] = at;
    at += t.size;
    align = Math.max(align, t.align);
  }
  return { name, size: Math.ceil(at / align) * align, align, fields };
}

const u8 = scalar('uint8_t', 1);
const u16 = scalar('uint16_t', 2);
const u32 = scalar('uint32_t', 4);
const i32 = scalar('int32_t', 4);
const u64 = scalar('uint64_t', 8);

/** `struct kvm_userspace_memory_region`. */
export const kvm_userspace_memory_region = struct('kvm_userspace_memory_region', {
  slot: u32, flags: u32, guest_phys_addr: u64, memory_size: u64, userspace_addr: u64,
});

/** `struct kvm_regs` (x86). */
export const kvm_regs = struct('kvm_regs', {
  rax: u64, rbx: u64, rcx: u64, rdx: u64, rsi: u64, rdi: u64, rsp: u64, rbp: u64,
  r8: u64, r9: u64, r10: u64, r11: u64, r12: u64, r13: u64, r14: u64, r15: u64,
  rip: u64, rflags: u64,
});

/** `struct kvm_segment`. */
export const kvm_segment = struct('kvm_segment', {
  base: u64, limit: u32, selector: u16, type: u8, present: u8, dpl: u8, db: u8, s: u8, l: u8,
  g: u8, avl: u8, unusable: u8, padding: u8,
});

/** `struct kvm_dtable`. */
export const kvm_dtable = struct('kvm_dtable', { base: u64, limit: u16, padding: array(u16, 3) });

/** `struct kvm_sregs`. */
export const kvm_sregs = struct('kvm_sregs', {
  cs: kvm_segment, ds: kvm_segment, es: kvm_segment, fs: kvm_segment, gs: kvm_segment,
  ss: kvm_segment, tr: kvm_segment, ldt: kvm_segment, gdt: kvm_dtable, idt: kvm_dtable,
  cr0: u64, cr2: u64, cr3: u64, cr4: u64, cr8: u64, efer: u64, apic_base: u64,
  interrupt_bitmap: array(u64, 4),
});

/** `struct kvm_fpu`. */
export const kvm_fpu = struct('kvm_fpu', {
  fpr: array(u8, 128), fcw: u16, fsw: u16, ftwx: u8, pad1: u8, last_opcode: u16,
  last_ip: u64, last_dp: u64, xmm: array(u8, 256), mxcsr: u32, pad2: u32,
});

/** `struct kvm_msr_entry`. */
export const kvm_msr_entry = struct('kvm_msr_entry', { index: u32, reserved: u32, data: u64 });
/** `struct kvm_msrs` header (entries follow). */
export const kvm_msrs = struct('kvm_msrs', { nmsrs: u32, pad: u32 });

/** `struct kvm_cpuid_entry2`. */
export const kvm_cpuid_entry2 = struct('kvm_cpuid_entry2', {
  function: u32, index: u32, flags: u32, eax: u32, ebx: u32, ecx: u32, edx: u32, padding: array(u32, 3),
});
/** `struct kvm_cpuid2` header (entries follow). */
export const kvm_cpuid2 = struct('kvm_cpuid2', { nent: u32, padding: u32 });

/** `struct kvm_irq_level`. */
export const kvm_irq_level = struct('kvm_irq_level', { irq: u32, level: u32 });
/** `struct kvm_pit_config`. */
export const kvm_pit_config = struct('kvm_pit_config', { flags: u32, pad: array(u32, 15) });
/** `struct kvm_irqchip`: `chip` is the PIC or IOAPIC state union (opaque bytes; see {@link IOAPIC_REDIRTBL_OFFSET}). */
export const kvm_irqchip = struct('kvm_irqchip', { chip_id: u32, pad: u32, chip: array(u8, 512) });
/** Offset of `redirtbl[0]` inside `kvm_irqchip.chip` for the IOAPIC (`struct kvm_ioapic_state`: base u64, ioregsel, id, irr, pad u32); the chip union itself starts at byte 8 of `struct kvm_irqchip`. */
export const IOAPIC_REDIRTBL_OFFSET = 24;
/** `struct kvm_coalesced_mmio_zone` (`pad` is `pio` since Linux 5.0). */
export const kvm_coalesced_mmio_zone = struct('kvm_coalesced_mmio_zone', { addr: u64, size: u32, pio: u32 });
/** `struct kvm_coalesced_mmio` (one ring entry). */
export const kvm_coalesced_mmio = struct('kvm_coalesced_mmio', {
  phys_addr: u64, len: u32, pio: u32, data: array(u8, 8),
});
/** `struct kvm_coalesced_mmio_ring` header (entries follow). */
export const kvm_coalesced_mmio_ring = struct('kvm_coalesced_mmio_ring', { first: u32, last: u32 });
/** `struct kvm_guest_debug` (x86 arch part: 8 debug registers). */
export const kvm_guest_debug = struct('kvm_guest_debug', { control: u32, pad: u32, debugreg: array(u64, 8) });
/** `struct kvm_mp_state`. */
export const kvm_mp_state = struct('kvm_mp_state', { mp_state: u32 });
/** `struct kvm_dirty_log` (the bitmap pointer is a user address). */
export const kvm_dirty_log = struct('kvm_dirty_log', { slot: u32, padding1: u32, dirty_bitmap: u64 });
/** `struct kvm_enable_cap`. */
export const kvm_enable_cap = struct('kvm_enable_cap', {
  cap: u32, flags: u32, args: array(u64, 4), pad: array(u8, 64),
});
/** `struct kvm_msr_filter_range`. */
export const kvm_msr_filter_range = struct('kvm_msr_filter_range', { flags: u32, nmsrs: u32, base: u32, bitmap: u64 });
/** `struct kvm_msr_filter` (16 ranges). */
export const kvm_msr_filter = struct('kvm_msr_filter', { flags: u32, ranges: array(kvm_msr_filter_range, 16) });
/** `struct kvm_ioeventfd`. */
export const kvm_ioeventfd = struct('kvm_ioeventfd', {
  datamatch: u64, addr: u64, len: u32, fd: i32, flags: u32, pad: array(u8, 36),
});
/** `struct kvm_irqfd`. */
export const kvm_irqfd = struct('kvm_irqfd', { fd: u32, gsi: u32, flags: u32, resamplefd: u32, pad: array(u8, 16) });
/** `struct kvm_vcpu_events` (opaque bytes for snapshots; see {@link VCPU_EVENTS_OFFSETS}). */
export const kvm_vcpu_events = struct('kvm_vcpu_events', { raw: array(u8, 64) });
/** Offsets of the `kvm_vcpu_events` fields tsvm edits (checked against the header by the ABI test). */
export const VCPU_EVENTS_OFFSETS = {
  exception_injected: 0,
  exception_nr: 1,
  exception_has_error_code: 2,
  exception_pending: 3,
  exception_error_code: 4,
  nmi_injected: 12,
  nmi_pending: 13,
  nmi_masked: 14,
  flags: 20,
} as const;
/** `struct kvm_debugregs` (opaque bytes for snapshots). */
export const kvm_debugregs = struct('kvm_debugregs', { db: array(u64, 4), dr6: u64, dr7: u64, flags: u64, reserved: array(u64, 9) });
/** `struct kvm_lapic_state`. */
export const kvm_lapic_state = struct('kvm_lapic_state', { regs: array(u8, 1024) });
/** `struct kvm_xsave` (legacy 4 KiB form). */
export const kvm_xsave = struct('kvm_xsave', { region: array(u32, 1024) });
/** `struct kvm_clock_data`. */
export const kvm_clock_data = struct('kvm_clock_data', {
  clock: u64, flags: u32, pad0: u32, realtime: u64, host_tsc: u64, pad: array(u32, 4),
});
/** `struct kvm_pit_channel_state`. */
export const kvm_pit_channel_state = struct('kvm_pit_channel_state', {
  count: u32, latched_count: u16, count_latched: u8, status_latched: u8, status: u8, read_state: u8,
  write_state: u8, write_latch: u8, rw_mode: u8, mode: u8, bcd: u8, gate: u8, count_load_time: u64,
});
/** `struct kvm_pit_state2`. */
export const kvm_pit_state2 = struct('kvm_pit_state2', { channels: array(kvm_pit_channel_state, 3), flags: u32, reserved: array(u32, 9) });
/** `struct kvm_xcrs` (16 `{xcr, reserved, value}` entries). */
export const kvm_xcrs = struct('kvm_xcrs', { nr_xcrs: u32, flags: u32, xcrs: array(struct('kvm_xcr', { xcr: u32, reserved: u32, value: u64 }), 16), padding: array(u64, 16) });
/** `struct kvm_msr_list` header (`nmsrs`, then that many `u32` indices). */
export const kvm_msr_list = struct('kvm_msr_list', { nmsrs: u32 });
/** `struct kvm_translation`. */
export const kvm_translation = struct('kvm_translation', {
  linear_address: u64, physical_address: u64, valid: u8, writeable: u8, usermode: u8, pad: array(u8, 5),
});

/**
 * Offsets inside `struct kvm_run`. `kvm_run` is a union-heavy struct that a field list cannot
 * describe compactly, so its offsets are listed from `<linux/kvm.h>` and checked by the ABI
 * test against the C compiler. Only `vcpu.ts` and `exit.ts` read them: the mapping they
 * describe never leaves this package.
 */
export const KVM_RUN_OFFSETS = {
  request_interrupt_window: 0,
  immediate_exit: 1,
  exit_reason: 8,
  ready_for_interrupt_injection: 12,
  if_flag: 13,
  flags: 14,
  cr8: 16,
  apic_base: 24,
  /** Start of the exit-specific union. */
  union: 32,
  io_direction: 32,
  io_size: 33,
  io_port: 34,
  io_count: 36,
  io_data_offset: 40,
  mmio_phys_addr: 32,
  mmio_data: 40,
  mmio_len: 48,
  mmio_is_write: 52,
  fail_entry_reason: 32,
  fail_entry_cpu: 40,
  internal_suberror: 32,
  internal_ndata: 36,
  internal_data: 40,
  /** `emulation_failure` overlays `internal` for suberror `KVM_INTERNAL_ERROR_EMULATION`. */
  emulation_flags: 40,
  emulation_insn_size: 48,
  emulation_insn_bytes: 49,
  system_event_type: 32,
  system_event_ndata: 36,
  system_event_data: 40,
  msr_error: 32,
  msr_reason: 40,
  msr_index: 44,
  msr_data: 48,
  debug_exception: 32,
  debug_pc: 40,
  debug_dr6: 48,
  debug_dr7: 56,
  ex_exception: 32,
  ex_error_code: 36,
  hypercall_nr: 32,
  hypercall_args: 40,
  hypercall_ret: 88,
  /** Register sets KVM stores into `s.regs` at every exit (`KVM_SYNC_X86_*`; `KVM_CAP_SYNC_REGS`). */
  kvm_valid_regs: 288,
  /** Register sets userspace changed in `s.regs`: KVM loads them at the next `KVM_RUN`. */
  kvm_dirty_regs: 296,
  /** `s.regs.regs`: a `struct kvm_regs` (the x86 `struct kvm_sync_regs` starts with it). */
  sync_regs: 304,
  /** `s.regs.sregs`: the `struct kvm_sregs` after it. */
  sync_sregs: 448,
  /** `s.regs.events`: the `struct kvm_vcpu_events` after that. */
  sync_events: 760,
} as const;

/** Byte offset of a field of a struct layout. Throws for a field the struct does not have. */
export function offsetOf(type: CType, field: string): number {
  const at = type.fields[field];
  if (at === undefined) throw new TsvmError('TSVM_ABI', `struct ${type.name} has no field ${field}`);
  return at;
}

/** Size in bytes of a C type. */
export function sizeOf(type: CType): number {
  return type.size;
}
