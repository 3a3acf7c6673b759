/**
 * Plain typed values exchanged with KVM. 64-bit registers are `bigint`s so no value ever
 * loses precision; small fields are numbers.
 * @module
 */

/** General-purpose registers (`struct kvm_regs`). */
export interface Regs {
  rax: bigint; rbx: bigint; rcx: bigint; rdx: bigint; rsi: bigint; rdi: bigint; rsp: bigint; rbp: bigint;
  r8: bigint; r9: bigint; r10: bigint; r11: bigint; r12: bigint; r13: bigint; r14: bigint; r15: bigint;
  rip: bigint; rflags: bigint;
}

/** Names of the general-purpose registers, in `struct kvm_regs` order. */
export const REG_NAMES = [
  'rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rsp', 'rbp',
  'r8', 'r9', 'r10', 'r11', 'r12', 'r13', 'r14', 'r15', 'rip', 'rflags',
] as const satisfies ReadonlyArray<keyof Regs>;

/** A segment register (`struct kvm_segment`). */
export interface Segment {
  base: bigint; limit: number; selector: number; type: number; present: number; dpl: number;
  db: number; s: number; l: number; g: number; avl: number; unusable: number;
}

/** A descriptor-table register (`struct kvm_dtable`). */
export interface DTable { base: bigint; limit: number }

/** Special registers (`struct kvm_sregs`). */
export interface Sregs {
  cs: Segment; ds: Segment; es: Segment; fs: Segment; gs: Segment; ss: Segment; tr: Segment; ldt: Segment;
  gdt: DTable; idt: DTable;
  cr0: bigint; cr2: bigint; cr3: bigint; cr4: bigint; cr8: bigint; efer: bigint; apic_base: bigint;
  interrupt_bitmap: [bigint, bigint, bigint, bigint];
}

/** One CPUID leaf (`struct kvm_cpuid_entry2`). */
export interface CpuidEntry { function: number; index: number; flags: number; eax: number; ebx: number; ecx: number; edx: number }

/** One MSR value. */
export interface MsrEntry { index: number; data: bigint }

/** One entry of the coalesced MMIO/PIO ring. */
export interface CoalescedEntry { address: bigint; length: number; pio: boolean; data: Uint8Array }
