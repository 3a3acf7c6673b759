/**
 * Every KVM ioctl number tsvm uses, derived from the kernel's `_IOC` encoding and the struct
 * sizes in `structs.ts` rather than pasted as magic numbers. `ioctls.test.ts` checks each one
 * against the C preprocessor's value from `<linux/kvm.h>`.
 * @module
 */
import * as S from './structs.js';

const KVMIO = 0xae;
const IOC_NONE = 0;
const IOC_WRITE = 1;
const IOC_READ = 2;

function ioc(dir: number, type: number, nr: number, size: number): number {
  // _IOC(dir,type,nr,size) = dir<<30 | size<<16 | type<<8 | nr; kept unsigned.
  return ((dir << 30) | (size << 16) | (type << 8) | nr) >>> 0;
}
const io = (nr: number): number => ioc(IOC_NONE, KVMIO, nr, 0);
const ior = (nr: number, size: number): number => ioc(IOC_READ, KVMIO, nr, size);
const iow = (nr: number, size: number): number => ioc(IOC_WRITE, KVMIO, nr, size);
const iowr = (nr: number, size: number): number => ioc(IOC_READ | IOC_WRITE, KVMIO, nr, size);
const sz = S.sizeOf;

/** ioctl request numbers, by their kernel names. */
export const KVM = {
  // /dev/kvm
  KVM_GET_API_VERSION: io(0x00),
  KVM_CREATE_VM: io(0x01),
  KVM_GET_MSR_INDEX_LIST: iowr(0x02, 4),
  KVM_CHECK_EXTENSION: io(0x03),
  KVM_GET_VCPU_MMAP_SIZE: io(0x04),
  KVM_GET_SUPPORTED_CPUID: iowr(0x05, sz(S.kvm_cpuid2)),
  // VM
  KVM_CREATE_VCPU: io(0x41),
  KVM_GET_DIRTY_LOG: iow(0x42, sz(S.kvm_dirty_log)),
  KVM_SET_USER_MEMORY_REGION: iow(0x46, sz(S.kvm_userspace_memory_region)),
  KVM_SET_TSS_ADDR: io(0x47),
  KVM_SET_IDENTITY_MAP_ADDR: iow(0x48, 8),
  KVM_CREATE_IRQCHIP: io(0x60),
  KVM_IRQ_LINE: iow(0x61, sz(S.kvm_irq_level)),
  KVM_GET_IRQCHIP: iowr(0x62, sz(S.kvm_irqchip)),
  // Declared `_IOR` in <linux/kvm.h> although it writes to the kernel: kept as the header has it.
  KVM_SET_IRQCHIP: ior(0x63, sz(S.kvm_irqchip)),
  KVM_REGISTER_COALESCED_MMIO: iow(0x67, sz(S.kvm_coalesced_mmio_zone)),
  KVM_UNREGISTER_COALESCED_MMIO: iow(0x68, sz(S.kvm_coalesced_mmio_zone)),
  KVM_IRQFD: iow(0x76, sz(S.kvm_irqfd)),
  KVM_CREATE_PIT2: iow(0x77, sz(S.kvm_pit_config)),
  KVM_GET_PIT2: ior(0x9f, sz(S.kvm_pit_state2)),
  KVM_SET_PIT2: iow(0xa0, sz(S.kvm_pit_state2)),
  KVM_IOEVENTFD: iow(0x79, sz(S.kvm_ioeventfd)),
  KVM_SET_CLOCK: iow(0x7b, sz(S.kvm_clock_data)),
  KVM_GET_CLOCK: ior(0x7c, sz(S.kvm_clock_data)),
  KVM_ENABLE_CAP: iow(0xa3, sz(S.kvm_enable_cap)),
  KVM_X86_SET_MSR_FILTER: iow(0xc6, sz(S.kvm_msr_filter)),
  KVM_RESET_DIRTY_RINGS: io(0xc7),
  // vCPU
  KVM_RUN: io(0x80),
  KVM_GET_REGS: ior(0x81, sz(S.kvm_regs)),
  KVM_SET_REGS: iow(0x82, sz(S.kvm_regs)),
  KVM_GET_SREGS: ior(0x83, sz(S.kvm_sregs)),
  KVM_SET_SREGS: iow(0x84, sz(S.kvm_sregs)),
  KVM_TRANSLATE: iowr(0x85, sz(S.kvm_translation)),
  KVM_GET_MSRS: iowr(0x88, sz(S.kvm_msrs)),
  KVM_SET_MSRS: iow(0x89, sz(S.kvm_msrs)),
  KVM_SET_SIGNAL_MASK: iow(0x8b, 4),
  KVM_GET_FPU: ior(0x8c, sz(S.kvm_fpu)),
  KVM_SET_FPU: iow(0x8d, sz(S.kvm_fpu)),
  KVM_GET_LAPIC: ior(0x8e, sz(S.kvm_lapic_state)),
  KVM_SET_LAPIC: iow(0x8f, sz(S.kvm_lapic_state)),
  KVM_SET_CPUID2: iow(0x90, sz(S.kvm_cpuid2)),
  KVM_GET_CPUID2: iowr(0x91, sz(S.kvm_cpuid2)),
  KVM_GET_MP_STATE: ior(0x98, sz(S.kvm_mp_state)),
  KVM_SET_MP_STATE: iow(0x99, sz(S.kvm_mp_state)),
  KVM_SET_GUEST_DEBUG: iow(0x9b, sz(S.kvm_guest_debug)),
  KVM_GET_VCPU_EVENTS: ior(0x9f, sz(S.kvm_vcpu_events)),
  KVM_SET_VCPU_EVENTS: iow(0xa0, sz(S.kvm_vcpu_events)),
  KVM_GET_DEBUGREGS: ior(0xa1, sz(S.kvm_debugregs)),
  KVM_SET_DEBUGREGS: iow(0xa2, sz(S.kvm_debugregs)),
  KVM_GET_XSAVE: ior(0xa4, sz(S.kvm_xsave)),
  KVM_SET_XSAVE: iow(0xa5, sz(S.kvm_xsave)),
  KVM_GET_XCRS: ior(0xa6, sz(S.kvm_xcrs)),
  KVM_SET_XCRS: iow(0xa7, sz(S.kvm_xcrs)),
} as const;

/** Name of an ioctl request. */
export type KvmIoctl = keyof typeof KVM;

/** `KVM_CAP_*` extension numbers tsvm checks. */
export const KVM_CAP = {
  IRQCHIP: 0,
  HLT: 1,
  USER_MEMORY: 3,
  SET_TSS_ADDR: 4,
  EXT_CPUID: 7,
  NR_VCPUS: 9,
  NR_MEMSLOTS: 10,
  SYNC_REGS: 74,
  PIT: 11,
  COALESCED_MMIO: 15,
  SET_GUEST_DEBUG: 23,
  IOEVENTFD: 36,
  PIT2: 33,
  IRQFD: 32,
  ADJUST_CLOCK: 39,
  XSAVE: 55,
  READONLY_MEM: 81,
  IMMEDIATE_EXIT: 136,
  COALESCED_PIO: 162,
  X86_USER_SPACE_MSR: 188,
  X86_MSR_FILTER: 189,
  DIRTY_LOG_RING: 192,
  DIRTY_LOG_RING_ACQ_REL: 223,
  MAX_VCPUS: 66,
} as const;

/** `KVM_EXIT_*` reasons. */
export const KVM_EXIT = {
  UNKNOWN: 0, EXCEPTION: 1, IO: 2, HYPERCALL: 3, DEBUG: 4, HLT: 5, MMIO: 6, IRQ_WINDOW_OPEN: 7,
  SHUTDOWN: 8, FAIL_ENTRY: 9, INTR: 10, SET_TPR: 11, TPR_ACCESS: 12, NMI: 16, INTERNAL_ERROR: 17,
  SYSTEM_EVENT: 24, X86_RDMSR: 29, X86_WRMSR: 30, DIRTY_RING_FULL: 31,
} as const;

/** Other KVM ABI constants. */
export const KVM_CONST = {
  API_VERSION: 12,
  /** `KVM_SYNC_X86_REGS`: the general-purpose registers travel in `kvm_run.s.regs`. */
  SYNC_X86_REGS: 1,
  /** `KVM_SYNC_X86_SREGS`: the special registers travel in `kvm_run.s.regs.sregs`. */
  SYNC_X86_SREGS: 2,
  /** `KVM_SYNC_X86_EVENTS`: the vCPU events (`struct kvm_vcpu_events`) travel in `kvm_run.s.regs.events`. */
  SYNC_X86_EVENTS: 4,
  MEM_LOG_DIRTY_PAGES: 1,
  MEM_READONLY: 2,
  EXIT_IO_IN: 0,
  EXIT_IO_OUT: 1,
  /** x86: page 1 of the vCPU mapping is the PIO data page; the coalesced ring is page 2. */
  COALESCED_MMIO_PAGE_OFFSET: 2,
  /** The dirty ring is mapped from the vCPU fd at this many pages (`KVM_DIRTY_LOG_PAGE_OFFSET`). */
  DIRTY_LOG_PAGE_OFFSET: 64,
  /** `struct kvm_dirty_gfn.flags`: the entry names a dirty page (`KVM_DIRTY_GFN_F_DIRTY`). */
  DIRTY_GFN_F_DIRTY: 1,
  /** `struct kvm_dirty_gfn.flags`: harvested, for `KVM_RESET_DIRTY_RINGS` (`KVM_DIRTY_GFN_F_RESET`). */
  DIRTY_GFN_F_RESET: 2,
  PIO_PAGE_OFFSET: 1,
  GUESTDBG_ENABLE: 0x1,
  GUESTDBG_SINGLESTEP: 0x2,
  GUESTDBG_USE_SW_BP: 0x10000,
  GUESTDBG_USE_HW_BP: 0x20000,
  /** `KVM_CREATE_PIT2` flag: emulate the port-0x61 speaker/gate register in the kernel too. */
  PIT_SPEAKER_DUMMY: 1,
  MP_STATE_RUNNABLE: 0,
  MP_STATE_UNINITIALIZED: 1,
  MP_STATE_INIT_RECEIVED: 2,
  MP_STATE_HALTED: 3,
  /** `kvm_irqchip.chip_id`: master PIC, slave PIC, IOAPIC. */
  IRQCHIP_PIC_MASTER: 0,
  IRQCHIP_PIC_SLAVE: 1,
  IRQCHIP_IOAPIC: 2,
  MSR_EXIT_REASON_INVAL: 1,
  MSR_EXIT_REASON_UNKNOWN: 2,
  MSR_EXIT_REASON_FILTER: 4,
  MSR_FILTER_READ: 1,
  MSR_FILTER_WRITE: 2,
  MSR_FILTER_DEFAULT_ALLOW: 0,
  MSR_FILTER_DEFAULT_DENY: 1,
  IOEVENTFD_FLAG_DATAMATCH: 1,
  IOEVENTFD_FLAG_PIO: 2,
  SYSTEM_EVENT_SHUTDOWN: 1,
  SYSTEM_EVENT_RESET: 2,
  SYSTEM_EVENT_CRASH: 3,
  /** `internal.suberror`: the instruction emulator gave up (`emulation_failure` overlay). */
  INTERNAL_ERROR_EMULATION: 1,
  /** `emulation_failure.flags` bit: `insn_size` / `insn_bytes` are valid. */
  INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: 1,
} as const;
