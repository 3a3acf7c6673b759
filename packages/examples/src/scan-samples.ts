/**
 * The scan example's samples: tiny 64-bit ring-3 programs, each delivered to a sandbox child as
 * the contents of its virtio-blk disk and run from the code area. Ten are benign, the rest do
 * one thing the sandbox forbids (self-modifying code, forbidden ports, wild writes, driving the
 * disk again), spin, or crash. `expected` is what a correct monitor must conclude; the monitor
 * never reads it (the test compares the two).
 * @module
 */
import { InvalidArgumentError } from '@tsvm/core';
import { asm } from '@tsvm/core/asm';
import { CODE, CONSOLE_PORT, DATA, DISK_SIZE, EXIT_PORT, LOADER, STACK_TOP, VIRTIO_BASE } from './scan-sandbox.js';
import type { Verdict } from './scan-monitor.js';

/** One sample. */
export interface Sample {
  /** Short unique name. */
  readonly name: string;
  /** What it does. */
  readonly description: string;
  /** Its source (Intel syntax, assembled at the code area's address). */
  readonly source: string;
  /** The verdict a correct monitor reaches. */
  readonly expected: Verdict;
}

/** A sample with its machine code (at most `DISK_SIZE` bytes). */
export interface AssembledSample extends Sample {
  /** The payload written to the disk. */
  readonly code: Uint8Array;
}

/** Prints the NUL-terminated string at label `msg` (clobbers rsi, rdx, rax). */
const print = (id: string): string => `
    lea rsi, [rip + msg]
    mov dx, ${CONSOLE_PORT}
  ${id}_next:
    lodsb
    test al, al
    jz ${id}_done
    out dx, al
    jmp ${id}_next
  ${id}_done:`;
const exit = (code = 0): string => `
    mov dx, ${EXIT_PORT}
    mov al, ${code}
    out dx, al`;
const msg = (text: string): string => `
  msg:
    .asciz "${text}\\n"`;

/** Every sample, benign first. */
export const SAMPLES: readonly Sample[] = [
  // ── benign ───────────────────────────────────────────────────────────────
  { name: 'hello', description: 'prints a greeting and exits', expected: 'benign', source: `${print('p')}${exit()}${msg('hello')}` },
  {
    name: 'sum-loop', description: 'sums 1..10^6 in registers, stores the result in its data, exits', expected: 'benign',
    source: `
    xor eax, eax
    mov ecx, 1000000
  sum:
    add rax, rcx
    dec ecx
    jnz sum
    mov qword ptr [${DATA}], rax
    ${exit()}`,
  },
  {
    name: 'recursion', description: 'computes fib(18) recursively on its stack', expected: 'benign',
    source: `
    mov edi, 18
    call fib
    mov qword ptr [${DATA}], rax
    ${exit()}
  fib:
    cmp edi, 2
    jb fib_base
    push rdi
    dec edi
    call fib
    pop rdi
    push rax
    sub edi, 2
    call fib
    pop rcx
    add rax, rcx
    ret
  fib_base:
    mov eax, edi
    ret`,
  },
  {
    name: 'memset-data', description: 'fills 64 KiB of its data area', expected: 'benign',
    source: `
    mov rdi, ${DATA}
    mov ecx, 0x10000
    mov al, 0xa5
    rep stosb
    ${exit()}`,
  },
  {
    name: 'memcpy-code', description: 'copies its own code into its data area (reading code is fine)', expected: 'benign',
    source: `
    mov rsi, ${CODE.start}
    mov rdi, ${DATA}
    mov ecx, 0x1000
    rep movsb
    ${exit()}`,
  },
  {
    name: 'checksum-loader', description: 'reads the loader region and the stack top, exits with a checksum', expected: 'benign',
    source: `
    mov rsi, ${LOADER.start}
    mov ecx, ${LOADER.size / 8}
    xor edx, edx
  ck:
    add rdx, qword ptr [rsi]
    add rsi, 8
    dec ecx
    jnz ck
    mov rax, qword ptr [${STACK_TOP - 8}]
    ${exit()}`,
  },
  {
    name: 'sse', description: 'does packed arithmetic in xmm registers', expected: 'benign',
    source: `
    pxor xmm0, xmm0
    mov eax, 3
    movd xmm1, eax
    pshufd xmm1, xmm1, 0
    mov ecx, 1000
  v:
    paddd xmm0, xmm1
    dec ecx
    jnz v
    movdqu xmmword ptr [${DATA}], xmm0
    ${exit()}`,
  },
  {
    name: 'rep-outsb', description: 'prints a line with one string-I/O instruction', expected: 'benign',
    source: `
    lea rsi, [rip + msg]
    mov ecx, 6
    mov dx, ${CONSOLE_PORT}
    rep outsb
    ${exit()}${msg('bulk!')}`,
  },
  { name: 'exit-code', description: 'exits with code 3 (a failure of its own is not misbehaviour)', expected: 'benign', source: exit(3) },
  {
    name: 'stack-heavy', description: 'pushes 16 KiB onto its stack and pops it again', expected: 'benign',
    source: `
    mov ecx, 2048
  pu:
    push rcx
    dec ecx
    jnz pu
    mov ecx, 2048
  po:
    pop rax
    dec ecx
    jnz po
    ${exit()}`,
  },
  // ── self-modifying code ──────────────────────────────────────────────────
  {
    name: 'xor-unpacker', description: 'XOR-decodes a payload into its own code area and jumps there', expected: 'malicious:self-modifying-code',
    source: `
    lea rsi, [rip + packed]
    mov rdi, ${CODE.start + 0x1000}
    mov ecx, 16
  un:
    lodsb
    xor al, 0x5a
    stosb
    dec ecx
    jnz un
    mov rax, ${CODE.start + 0x1000}
    jmp rax
  packed:
    .byte 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0`,
  },
  {
    name: 'patch-next', description: 'overwrites the instruction after its own with a nop', expected: 'malicious:self-modifying-code',
    source: `
    lea rax, [rip + target]
    mov byte ptr [rax], 0x90
  target:
    ud2
    ${exit()}`,
  },
  // ── forbidden ports ──────────────────────────────────────────────────────
  { name: 'cmos-read', description: 'reads the CMOS clock', expected: 'malicious:forbidden-port', source: `mov al, 0\n out 0x70, al\n in al, 0x71\n${exit()}` },
  { name: 'pci-probe', description: 'probes PCI configuration space', expected: 'malicious:forbidden-port', source: `mov dx, 0xcf8\n mov eax, 0x80000000\n out dx, eax\n mov dx, 0xcfc\n in eax, dx\n${exit()}` },
  { name: 'console-read', description: 'reads from the console port (only writes are allowed)', expected: 'malicious:forbidden-port', source: `mov dx, ${CONSOLE_PORT + 5}\n in al, dx\n${exit()}` },
  { name: 'fake-crash', description: 'writes a #GP vector to core\u2019s exception port to pass for a crash', expected: 'malicious:forbidden-port', source: `mov dx, 0xee0\n mov al, 13\n out dx, al\n${exit()}` },
  { name: 'reboot', description: 'asks the keyboard controller for a reset', expected: 'malicious:forbidden-port', source: `mov al, 0xfe\n out 0x64, al\n${exit()}` },
  // ── wild writes and reads ────────────────────────────────────────────────
  { name: 'loader-overwrite', description: 'overwrites the loader stub', expected: 'malicious:wild-write', source: `mov rax, ${LOADER.start}\n mov dword ptr [rax], 0xcccccccc\n${exit()}` },
  { name: 'used-ring-forge', description: 'forges the disk\u2019s used ring', expected: 'malicious:wild-write', source: `mov rax, ${LOADER.start + 0x2002}\n mov word ptr [rax], 7\n${exit()}` },
  { name: 'beyond-ram', description: 'stores past the end of RAM', expected: 'malicious:wild-write', source: `mov rax, 0x100000\n mov qword ptr [rax], rax\n${exit()}` },
  { name: 'high-probe', description: 'reads an address where no RAM is', expected: 'malicious:wild-read', source: `mov rax, 0x80000000\n mov rbx, qword ptr [rax]\n${exit()}` },
  // ── the disk again ───────────────────────────────────────────────────────
  { name: 'disk-renotify', description: 'kicks the disk\u2019s queue to read more', expected: 'malicious:device-access', source: `mov rax, ${VIRTIO_BASE + 0x50n}\n mov dword ptr [rax], 0\n${exit()}` },
  { name: 'disk-config', description: 'reads the disk\u2019s capacity from its config space', expected: 'malicious:device-access', source: `mov rax, ${VIRTIO_BASE + 0x100n}\n mov ebx, dword ptr [rax]\n${exit()}` },
  {
    name: 'loader-reuse', description: 'jumps into the loader\u2019s own notify instruction to reuse it', expected: 'malicious:device-access',
    // rbx = the controller's base, as the loader had it; the loader's notify is `mov dword ptr [rbx + 0x50], 0`.
    source: `mov rbx, ${VIRTIO_BASE}\n mov rax, LOADER_NOTIFY\n jmp rax`,
  },
  // ── spinning ─────────────────────────────────────────────────────────────
  { name: 'spin', description: 'loops forever', expected: 'timeout', source: 'forever:\n jmp forever' },
  { name: 'print-then-spin', description: 'prints, then spins with pause', expected: 'timeout', source: `${print('p')}\n again:\n pause\n jmp again${msg('working...')}` },
  // ── crashes ──────────────────────────────────────────────────────────────
  { name: 'privileged', description: 'executes hlt at ring 3', expected: 'crashed:#GP', source: 'hlt' },
  { name: 'undefined', description: 'executes ud2', expected: 'crashed:#UD', source: 'ud2' },
  { name: 'divide', description: 'divides by zero', expected: 'crashed:#DE', source: 'xor ecx, ecx\n mov eax, 1\n xor edx, edx\n div ecx' },
];

/** Assembles `samples` for the code area. `loaderNotify` is the loader's notify instruction (for `loader-reuse`). */
export async function assembleSamples(samples: readonly Sample[], loaderNotify: number): Promise<AssembledSample[]> {
  const names = new Set<string>();
  const out: AssembledSample[] = [];
  for (const s of samples) {
    if (names.has(s.name)) throw new InvalidArgumentError('samples', `two samples are named '${s.name}'`);
    names.add(s.name);
    const code = await asm(s.source.replaceAll('LOADER_NOTIFY', String(loaderNotify)), { bits: 64, address: CODE.start });
    if (code.length > DISK_SIZE) throw new InvalidArgumentError('samples', `sample '${s.name}' has ${code.length} bytes; the disk holds ${DISK_SIZE}`);
    out.push({ ...s, code });
  }
  return out;
}
