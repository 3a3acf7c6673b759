/**
 * A guest for SMP tests and `bench:smp`: the bootstrap processor (64-bit, ring 0)
 * starts every application processor with INIT + SIPI + SIPI and halts for good (`cli; hlt`) —
 * or, with `ipiStorm`, sends fixed IPIs (vector 0x40) to all the others without pause;
 * each AP runs a real-mode trampoline into 64-bit mode on the BSP's GDT and page tables, takes a
 * ticket `k` (0, 1, ... in the order the APs arrive), drops to ring 3 and, as the host set the
 * parameter words:
 * 1. posts `k << 16 | j` for j < `posts` to the post MMIO register (one exit each);
 * 2. plays `pingPong` rounds with the other AP through one shared counter (AP k increments it
 *    when its parity is k: only truly concurrent vCPUs get through many rounds quickly);
 * 3. computes `k + n(n+1)/2 mod 2^64` with a loop of `n` iterations (`n = iterations`),
 *    stores it at `result(k)` and reports done by writing `k` to the done MMIO register;
 * 4. spins forever (ring 3 cannot `hlt`).
 * Ring 3 needs no TSS here: the APs end through MMIO, not port I/O.
 * @module
 */
import { asm } from '../asm.js';
import type { Machine } from '../machine.js';

/** Guest-physical addresses of the guest's data. */
export const SMP_GUEST = {
  /** The BSP stores its GDTR here, its CR3 at +0x10; AP tickets at +0x100. */
  BOOT: 0x7000,
  /** Parameter words (u64): iterations, ping-pong rounds, posts. */
  ITERATIONS: 0x7208,
  PING_PONG: 0x7210,
  POSTS: 0x7218,
  /** The ping-pong counter (u64). */
  COUNTER: 0x7500,
  /** MMIO register the APs post to (k << 16 | j, 4 bytes). */
  POST_MMIO: 0xd000_1000,
  /** MMIO register an AP writes its ticket to when done (4 bytes). */
  DONE_MMIO: 0xd000_0000,
  /** Where AP k's result (u64) goes. */
  result: (k: number): number => 0x7300 + k * 8,
} as const;

const SIPI_PAGE = 0x8; // the AP starts at CS=0x0800, IP=0: physical 0x8000
const LONG = 0x8100;
const USER = 0x8400;

/** Loads the guest into `vm` (vCPU 0 entered at 0x1000, long mode, ring 0) with its parameters. */
export async function loadSmpGuest(vm: Machine, params: { iterations: bigint; pingPong?: bigint; posts?: number; ipiStorm?: boolean }): Promise<void> {
  const G = SMP_GUEST;
  // ICR high (0x310) = 0; low (0x300): all excluding self (0b11 << 18), assert (1 << 14), INIT (0b101 << 8) / start-up (0b110 << 8).
  // 64-bit code addresses data through r15 = 0: keystone assembles a bare [imm] as RIP-relative.
  const bsp = await asm(`
    xor r15d, r15d
    sgdt [r15 + ${G.BOOT}]
    mov rax, cr3
    mov [r15 + ${G.BOOT + 0x10}], rax
    mov eax, 0xfee00000
    mov dword ptr [rax + 0xf0], 0x1ff
    mov dword ptr [rax + 0x310], 0
    mov dword ptr [rax + 0x300], 0x000c4500
    mov dword ptr [rax + 0x300], ${0x000c4600 | SIPI_PAGE}
    mov dword ptr [rax + 0x300], ${0x000c4600 | SIPI_PAGE}
    cli
  ${params.ipiStorm === true ? `storm:
    mov dword ptr [rax + 0x300], 0x000c4040
    jmp storm` : `idle:
    hlt
    jmp idle`}`, { bits: 64, address: 0x1000 });
  // Real mode, DS = 0 after INIT. The far jump (EA ptr16:16) enters the 64-bit kernel code segment.
  const real = await asm(`
    cli
    xor ax, ax
    mov ds, ax
    lgdt [${G.BOOT}]
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov eax, dword ptr [${G.BOOT + 0x10}]
    mov cr3, eax
    mov ecx, 0xc0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    or eax, 0x80000001
    mov cr0, eax
    .byte 0xea
    .short ${LONG}
    .short 0x08`, { bits: 16, address: 0 });
  const long = await asm(`
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor r15d, r15d
    mov eax, 1
    lock xadd dword ptr [r15 + ${G.BOOT + 0x100}], eax
    mov r12, rax
    shl rax, 12
    lea rsp, [rax + 0x50ff0]
    lea rbx, [rax + 0x60ff0]
    push 0x23
    push rbx
    push 0x2
    push 0x2b
    push ${USER}
    iretq`, { bits: 64, address: LONG });
  const user = await asm(`
    mov rcx, [r15 + ${G.POSTS}]
    test rcx, rcx
    jz pingpong
    mov rbx, ${G.POST_MMIO}
    mov rax, r12
    shl eax, 16
  post:
    mov dword ptr [rbx], eax
    inc eax
    dec rcx
    jnz post
  pingpong:
    mov rcx, [r15 + ${G.PING_PONG}]
    test rcx, rcx
    jz compute
  turn:
    mov rax, [r15 + ${G.COUNTER}]
    and rax, 1
    cmp rax, r12
    jne turn
    lock inc qword ptr [r15 + ${G.COUNTER}]
    dec rcx
    jnz turn
  compute:
    mov rcx, [r15 + ${G.ITERATIONS}]
    mov rax, r12
    test rcx, rcx
    jz store
  sum:
    add rax, rcx
    dec rcx
    jnz sum
  store:
    mov [r15 + r12 * 8 + ${G.result(0)}], rax
    mov rbx, ${G.DONE_MMIO}
    mov dword ptr [rbx], r12d
  spin:
    pause
    jmp spin`, { bits: 64, address: USER });
  vm.loadFlat(bsp, { at: 0x1000, mode: 'long', ring: 0 });
  vm.memory.write(SIPI_PAGE << 12, real);
  vm.memory.write(LONG, long);
  vm.memory.write(USER, user);
  vm.memory.writeU64(G.ITERATIONS, params.iterations);
  vm.memory.writeU64(G.PING_PONG, params.pingPong ?? 0n);
  vm.memory.writeU64(G.POSTS, BigInt(params.posts ?? 0));
}

/** What AP `k` computes for `n` iterations: `k + n(n+1)/2 mod 2^64`. */
export function expectedSum(k: number, n: bigint): bigint {
  return BigInt.asUintN(64, BigInt(k) + (n * (n + 1n)) / 2n);
}
