/**
 * Host-built CPU state for the three start modes. In protected and long mode the host writes
 * a GDT, a TSS whose I/O bitmap allows every port (on PVM, ring-3 port I/O needs the bitmap;
 * IOPL=3 is not enough), an IDT whose exception stubs report to {@link EXCEPTION_PORT}, and
 * (long mode) identity page tables for the low 4 GiB with the user bit set. Ring 3 is entered
 * directly through the segment registers, without an emulated `iret`.
 *
 * Everything lives in the 64 KiB *system area* at the top of the first RAM region; the
 * default ring-3 stack grows down from just below it.
 *
 * In long mode a ring-3 guest cannot reach guest-written code at CPL0: the system area is
 * mapped supervisor-only (a 4 KiB page table for the 2 MiB page holding it; the stubs, the
 * probe trampoline page and reset's entry stub are user read-only), the LDT is an empty table inside it, and `syscall` lands
 * in a host stub (`Machine.loadFlat` points `IA32_LSTAR`/`IA32_CSTAR` at it) until the host
 * sets its own handler. Accessed and dirty bits are preset in every descriptor and page-table
 * entry, so the CPU never writes the tables it walks. Reset relies on this
 * ({@link controlPagesIntact}): while those pages hold what the host built, CPL3 code can have
 * changed nothing but what CPL3 code can change.
 * @module
 */
import type { Regs, Segment, Sregs } from '@tsvm/kvm-backend';

/** Start modes a flat image can be loaded in. */
export type CpuMode = 'real' | 'protected' | 'long';

/** Port the exception stubs write the vector to; the run loop turns it into an `exception` stop. */
export const EXCEPTION_PORT = 0x0ee0;
/** Bytes reserved at the top of RAM for host-built tables. */
export const SYSTEM_AREA_SIZE = 0x10000;

/** Selectors of the host GDT (laid out for `syscall`/`sysret`: STAR = 0x0018_0008 << 32). */
export const SEL = {
  KERNEL_CODE64: 0x08,
  KERNEL_DATA: 0x10,
  USER_CODE32: 0x18 | 3,
  USER_DATA: 0x20 | 3,
  USER_CODE64: 0x28 | 3,
  KERNEL_CODE32: 0x30,
  TSS: 0x38,
} as const;

/** Offsets inside the system area. */
export const SYS = {
  PML4: 0x0000,
  PDPT: 0x1000,
  PD: 0x2000, // 4 pages: 4 GiB in 2 MiB pages
  GDT: 0x6000,
  TSS: 0x6100,
  IDT: 0x9000,
  STUBS: 0xa000,
  /** The `syscall` stub (after the 32 exception stubs): what `IA32_LSTAR`/`IA32_CSTAR` point at by default. */
  SYSCALL_STUB: 0xa000 + 32 * 16,
  /** An empty LDT (one null descriptor): a selector with TI=1 faults instead of reading guest RAM. */
  LDT: 0x6080,
  /** One page for the monitor's probe trampolines (after the stubs, below the kernel stack). */
  PROBE_TRAMPOLINE: 0xc000,
  /** Long mode: the 4 KiB page table of the 2 MiB page that holds the system area. */
  PT: 0xd000,
  /** Reset's entry stub (user read-only): `fxrstor` of the snapshot's x87/SSE state, `jmp` to the guest. */
  RESET_STUB: 0xe000,
  KSTACK_TOP: 0x10000 - 0x10,
} as const;

/** Value the `syscall` stub writes to {@link EXCEPTION_PORT} (no exception vector is ≥ 32). */
export const SYSCALL_REPORT = 0x40;

/**
 * Offsets of the system-area pages whose contents decide where CPL0 execution can go (page
 * tables, GDT/LDT/TSS, IDT, stubs). The probe trampoline page (CPL3 code) and the kernel stack
 * (exception frames the CPU pushes) are not among them.
 */
export const CONTROL_PAGES: readonly number[] = [
  SYS.PML4, SYS.PDPT, SYS.PD, SYS.PD + 0x1000, SYS.PD + 0x2000, SYS.PD + 0x3000,
  SYS.GDT, SYS.GDT + 0x1000, SYS.GDT + 0x2000, // GDT, LDT and the TSS with its I/O bitmap (0x6100 + 8 KiB)
  SYS.IDT, SYS.STUBS, SYS.PT,
];

const TSS_IOMAP = 104;
const TSS_LIMIT = TSS_IOMAP + 8192; // bitmap (all zero = all allowed) + the mandatory 0xff byte
const STUB_SIZE = 16;
/** Vectors for which the CPU pushes an error code. */
export const VECTORS_WITH_ERROR_CODE = new Set([8, 10, 11, 12, 13, 14, 17, 21, 29, 30]);

const CR0_PE = 1n, CR0_MP = 2n, CR0_ET = 0x10n, CR0_NE = 0x20n, CR0_WP = 0x10000n, CR0_PG = 0x80000000n;
const CR4_PAE = 0x20n, CR4_OSFXSR = 0x200n, CR4_OSXMMEXCPT = 0x400n;
const EFER_SCE = 1n, EFER_LME = 0x100n, EFER_LMA = 0x400n;

function seg(selector: number, type: number, opts: Partial<Segment> = {}): Segment {
  return {
    base: 0n, limit: 0xffffffff, selector, type, present: 1, dpl: selector & 3, db: 1, s: 1, l: 0, g: 1, avl: 0, unusable: 0,
    ...opts,
  };
}

function descriptor(base: number, limit: number, access: number, flags: number): bigint {
  return BigInt(limit & 0xffff) | (BigInt(base & 0xffffff) << 16n) | (BigInt(access) << 40n)
    | (BigInt((limit >> 16) & 0xf) << 48n) | (BigInt(flags & 0xf) << 52n) | (BigInt((base >>> 24) & 0xff) << 56n);
}

/** What {@link setupCpu} writes the tables through: guest RAM, or a buffer (for {@link systemAreaImage}). */
export interface TableWriter {
  /** Writes a little-endian u64. */
  writeU64(address: number, value: bigint): void;
  /** Writes a little-endian unsigned integer of `size` bytes. */
  writeUint(address: number, size: number, value: number): void;
  /** Writes bytes. */
  write(address: number, bytes: Uint8Array): void;
  /** Fills `length` bytes with `value`. */
  fill(address: number, length: number, value: number): void;
}

/** Writes GDT, LDT, TSS, IDT and the stubs. */
function writeTables(mem: TableWriter, sys: number, long: boolean): void {
  const gdt = sys + SYS.GDT;
  const tss = sys + SYS.TSS;
  const entries: bigint[] = [
    0n,
    // Accessed bits preset (type 0xb code, 0x3 data, as the segment registers are loaded):
    // the CPU would otherwise set them with a write into the GDT page.
    descriptor(0, 0xfffff, 0x9b, 0xa), // 0x08 kernel code64 (L)
    descriptor(0, 0xfffff, 0x93, 0xc), // 0x10 kernel data
    descriptor(0, 0xfffff, 0xfb, 0xc), // 0x18 user code32
    descriptor(0, 0xfffff, 0xf3, 0xc), // 0x20 user data
    descriptor(0, 0xfffff, 0xfb, 0xa), // 0x28 user code64
    descriptor(0, 0xfffff, 0x9b, 0xc), // 0x30 kernel code32
    descriptor(tss, TSS_LIMIT, 0x8b, 0), // 0x38 TSS (busy: TR is loaded directly)
    BigInt(Math.floor(tss / 2 ** 32)), // upper half of the 64-bit TSS descriptor
  ];
  // The pages written here hold nothing else (so they can be compared with what the host built).
  mem.fill(gdt, 0x5000, 0); // GDT, LDT, TSS (to 0x8169), IDT, stubs
  entries.forEach((d, i) => mem.writeU64(gdt + i * 8, d));
  mem.fill(tss, TSS_LIMIT + 1, 0);
  mem.writeUint(tss + TSS_LIMIT, 1, 0xff);
  mem.writeUint(tss + 102, 2, TSS_IOMAP);
  const kstack = sys + SYS.KSTACK_TOP;
  if (long) {
    mem.writeU64(tss + 4, BigInt(kstack)); // RSP0
  } else {
    mem.writeUint(tss + 4, 4, kstack); // ESP0
    mem.writeUint(tss + 8, 4, SEL.KERNEL_DATA); // SS0
  }
  // Exception stubs: mov dx, EXCEPTION_PORT; mov al, vector; out dx, al; hlt; jmp $-1.
  for (let v = 0; v < 32; v++) {
    const at = sys + SYS.STUBS + v * STUB_SIZE;
    mem.write(at, Uint8Array.of(0x66, 0xba, EXCEPTION_PORT & 0xff, EXCEPTION_PORT >> 8, 0xb0, v, 0xee, 0xf4, 0xeb, 0xfd));
    // The first 8 bytes of a gate have the same layout in both modes; a 64-bit gate adds
    // the upper 32 bits of the offset and a reserved dword.
    const e = sys + SYS.IDT + v * (long ? 16 : 8);
    mem.writeUint(e, 2, at & 0xffff);
    mem.writeUint(e + 2, 2, long ? SEL.KERNEL_CODE64 : SEL.KERNEL_CODE32);
    mem.writeUint(e + 4, 1, 0);
    mem.writeUint(e + 5, 1, 0x8e); // present, DPL 0, interrupt gate
    mem.writeUint(e + 6, 2, (at >>> 16) & 0xffff);
    if (long) {
      mem.writeUint(e + 8, 4, Math.floor(at / 2 ** 32));
      mem.writeUint(e + 12, 4, 0);
    }
  }
  // `syscall` with no handler of the host's: report SYSCALL_REPORT (RCX holds the return RIP).
  mem.write(sys + SYS.SYSCALL_STUB, Uint8Array.of(0x66, 0xba, EXCEPTION_PORT & 0xff, EXCEPTION_PORT >> 8, 0xb0, SYSCALL_REPORT, 0xee, 0xf4, 0xeb, 0xfd));
}

/**
 * Identity map of the low 4 GiB, user read/write, in 2 MiB pages but for the one holding the
 * system area, mapped in 4 KiB pages: its system-area pages supervisor-only, the stubs, the
 * probe trampoline page and reset's entry stub user read-only. Accessed (and, on leaves, dirty) bits are preset.
 */
function writePageTables(mem: TableWriter, sys: number): void {
  const pml4 = sys + SYS.PML4, pdpt = sys + SYS.PDPT, pd = sys + SYS.PD, pt = sys + SYS.PT;
  mem.fill(pml4, 0x6000, 0);
  const P = 0x1n, RW = 0x2n, U = 0x4n, A = 0x20n, D = 0x40n, PS = 0x80n;
  const TABLE = P | RW | U | A;
  const LEAF = P | RW | U | A | D;
  const sysPage = Math.floor(sys / 0x200000);
  mem.writeU64(pml4, BigInt(pdpt) | TABLE);
  for (let i = 0; i < 4; i++) {
    mem.writeU64(pdpt + i * 8, BigInt(pd + i * 0x1000) | TABLE);
    for (let j = 0; j < 512; j++) {
      const phys = (BigInt(i) << 30n) | (BigInt(j) << 21n);
      mem.writeU64(pd + i * 0x1000 + j * 8, i * 512 + j === sysPage ? BigInt(pt) | TABLE : phys | PS | LEAF);
    }
  }
  const base = sysPage * 0x200000;
  for (let k = 0; k < 512; k++) {
    const a = base + k * 0x1000;
    const inSys = a >= sys && a < sys + SYSTEM_AREA_SIZE;
    // The stubs are user read-only too: on PVM the `syscall` handler runs at CPL3 (and a ring-3
    // guest can write the exception port itself anyway).
    const userReadOnly = a === sys + SYS.PROBE_TRAMPOLINE || a === sys + SYS.STUBS || a === sys + SYS.RESET_STUB;
    const flags = !inSys ? LEAF : userReadOnly ? P | U | A | D : P | RW | A | D;
    mem.writeU64(pt + k * 8, BigInt(a) | flags);
  }
}

/** A 64 KiB buffer as a {@link TableWriter} for addresses `[base, base + 64 KiB)`. */
class AreaBuffer implements TableWriter {
  readonly bytes = new Uint8Array(SYSTEM_AREA_SIZE);
  readonly #view = new DataView(this.bytes.buffer);
  constructor(private readonly base: number) {}
  writeU64(a: number, v: bigint): void { this.#view.setBigUint64(a - this.base, v, true); }
  writeUint(a: number, size: number, v: number): void {
    for (let i = 0; i < size; i++) this.bytes[a - this.base + i] = Math.floor(v / 2 ** (8 * i)) & 0xff;
  }
  write(a: number, b: Uint8Array): void { this.bytes.set(b, a - this.base); }
  fill(a: number, n: number, v: number): void { this.bytes.fill(v, a - this.base, a - this.base + n); }
}

/** The system area (64 KiB) `setupCpu` writes for a long-mode guest with its area at `sys`. */
export function systemAreaImage(sys: number): Uint8Array {
  const b = new AreaBuffer(sys);
  writeTables(b, sys, true);
  writePageTables(b, sys);
  return b.bytes;
}

/**
 * Whether the {@link CONTROL_PAGES} of a long-mode system area at `sys` hold exactly what the
 * host writes; `area` is those 64 KiB as they are (e.g. in a snapshot's image).
 */
export function controlPagesIntact(area: Uint8Array, sys: number): boolean {
  if (area.length !== SYSTEM_AREA_SIZE) return false;
  const want = systemAreaImage(sys);
  for (const off of CONTROL_PAGES) {
    const a = area.subarray(off, off + 0x1000), b = want.subarray(off, off + 0x1000);
    if (!Buffer.from(a.buffer, a.byteOffset, a.length).equals(Buffer.from(b.buffer, b.byteOffset, b.length))) return false;
  }
  return true;
}

/** Inputs of {@link setupCpu}. */
export interface CpuSetup {
  /** Start mode. */
  readonly mode: CpuMode;
  /** Privilege level of the first instruction (real mode is always 0). */
  readonly ring: 0 | 3;
  /** First instruction. */
  readonly entry: number;
  /** Initial stack pointer. */
  readonly stack: number;
  /** Base of the 64 KiB system area (unused in real mode). */
  readonly systemArea: number;
}

/**
 * Writes the tables for `setup.mode` into `mem` and returns the register state that starts
 * executing at `setup.entry`. `base` is the vCPU's current state (from KVM), modified.
 */
export function setupCpu(mem: TableWriter, base: { regs: Regs; sregs: Sregs }, setup: CpuSetup): { regs: Regs; sregs: Sregs } {
  const regs: Regs = { ...base.regs };
  for (const k of Object.keys(regs) as Array<keyof Regs>) regs[k] = 0n;
  regs.rflags = 0x2n;
  regs.rip = BigInt(setup.entry);
  regs.rsp = BigInt(setup.stack);
  const s: Sregs = structuredClone(base.sregs);

  if (setup.mode === 'real') {
    // CS base 0 with IP = entry when it fits; otherwise CS = entry >> 4.
    const csBase = setup.entry > 0xffff ? (setup.entry >>> 4) << 4 : 0;
    const real = (sel: number, type: number): Segment => ({ base: BigInt(sel << 4), limit: 0xffff, selector: sel, type, present: 1, dpl: 0, db: 0, s: 1, l: 0, g: 0, avl: 0, unusable: 0 });
    s.cs = real(csBase >>> 4, 0xb);
    for (const r of ['ds', 'es', 'fs', 'gs', 'ss'] as const) s[r] = real(0, 3);
    regs.rip = BigInt(setup.entry - csBase);
    s.cr0 = (s.cr0 & ~(CR0_PE | CR0_PG)) | CR0_ET;
    s.cr4 = 0n;
    s.efer = 0n;
    return { regs, sregs: s };
  }

  const long = setup.mode === 'long';
  const sys = setup.systemArea;
  writeTables(mem, sys, long);
  s.gdt = { base: BigInt(sys + SYS.GDT), limit: 9 * 8 - 1 };
  s.idt = { base: BigInt(sys + SYS.IDT), limit: (long ? 16 : 8) * 32 - 1 };
  // Busy (11), as VMX requires at entry; on SVM the KVM backend loads it available (9), see its setSregs.
  s.tr = { base: BigInt(sys + SYS.TSS), limit: TSS_LIMIT, selector: SEL.TSS, type: 11, present: 1, dpl: 0, db: 0, s: 0, l: 0, g: 0, avl: 0, unusable: 0 };
  s.ldt = { base: BigInt(sys + SYS.LDT), limit: 7, selector: 0, type: 2, present: 1, dpl: 0, db: 0, s: 0, l: 0, g: 0, avl: 0, unusable: 0 };
  const user = setup.ring === 3;
  const dataSel = user ? SEL.USER_DATA : SEL.KERNEL_DATA;
  for (const r of ['ds', 'es', 'fs', 'gs', 'ss'] as const) s[r] = seg(dataSel, 3);
  if (long) {
    writePageTables(mem, sys);
    s.cs = seg(user ? SEL.USER_CODE64 : SEL.KERNEL_CODE64, 0xb, { l: 1, db: 0 });
    s.cr3 = BigInt(sys + SYS.PML4);
    s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    s.efer = EFER_LME | EFER_LMA | EFER_SCE;
  } else {
    s.cs = seg(user ? SEL.USER_CODE32 : SEL.KERNEL_CODE32, 0xb);
    s.cr0 = CR0_PE | CR0_ET | CR0_NE;
    s.cr3 = 0n;
    s.cr4 = CR4_OSFXSR | CR4_OSXMMEXCPT;
    s.efer = 0n;
  }
  return { regs, sregs: s };
}

/** Offset of the exception frame's fields relative to RSP at the stub's `out`. */
export function exceptionFrame(vector: number, long: boolean): { errorCode: number | undefined; rip: number } {
  const w = long ? 8 : 4;
  return VECTORS_WITH_ERROR_CODE.has(vector) ? { errorCode: 0, rip: w } : { errorCode: undefined, rip: 0 };
}

/**
 * Layout of the reset entry stub page ({@link SYS.RESET_STUB}): code, jump cell, FXSAVE image;
 * `END`: the bytes from 0 that a stub uses (the rest of the page is never written).
 */
export const RESET_STUB = { CELL: 0x100, IMAGE: 0x200, LENGTH: 14, END: 0x400 } as const;

/**
 * The reset entry stub page for a vCPU at `rip` with x87/SSE state `fxsave` (the 512-byte legacy
 * region of its XSAVE image): `fxrstor64 [rip → IMAGE]` (8 bytes) and `jmp qword ptr [rip →
 * CELL]` (6) at the start — neither touches a general-purpose register or RFLAGS — the jump
 * cell holding `rip`, the image at {@link RESET_STUB}.IMAGE. A snapshot stores it in its image.
 */
export function resetStubPage(rip: bigint, fxsave: Uint8Array): Uint8Array {
  const page = new Uint8Array(0x1000);
  const v = new DataView(page.buffer);
  page.set([0x48, 0x0f, 0xae, 0x0d], 0);
  v.setInt32(4, RESET_STUB.IMAGE - 8, true);
  page.set([0xff, 0x25], 8);
  v.setInt32(10, RESET_STUB.CELL - 14, true);
  v.setBigUint64(RESET_STUB.CELL, rip, true);
  page.set(fxsave.subarray(0, 512), RESET_STUB.IMAGE);
  return page;
}
