/**
 * Calibration guests, hand-encoded (no assembler at run time): a counted loop around a body,
 * then a write to an end port. Long mode, at CPL0 or CPL3.
 *
 * ```
 *   <setup>                ; e.g. mov dx, port / mov rax, addr / mov ecx, msr
 *   mov ebx, N
 * L: <body>                ; the event being priced
 *   dec ebx
 *   jnz L
 *   mov dx, END_PORT
 *   out dx, al
 * ```
 * @module
 */

/** Port the calibration guests write to when done. */
export const END_PORT = 0x0eef;
/** Port the PIO experiments write to. */
export const CAL_PORT = 0x0eee;
/** Where the guests are loaded. */
export const CODE_AT = 0x1000;
/** An MMIO address with no RAM behind it. */
export const MMIO_AT = 0xd000_0000n;

const u32 = (v: number): number[] => [v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, (v >>> 24) & 0xff];
const u16 = (v: number): number[] => [v & 0xff, (v >>> 8) & 0xff];
const u64 = (v: bigint): number[] => Array.from({ length: 8 }, (_, i) => Number((v >> BigInt(8 * i)) & 0xffn));

/** Instruction bytes the experiments use. */
export const BODY = {
  nop: [0x90],
  outDx: [0xee],
  mmioWrite: [0x88, 0x00], // mov [rax], al
  rdmsr: [0x0f, 0x32],
  int3: [0xcc],
} as const;

/** Setup snippets. */
export const SETUP = {
  dx: (port: number): number[] => [0x66, 0xba, ...u16(port)],
  rax: (v: bigint): number[] => [0x48, 0xb8, ...u64(v)],
  rdi: (v: bigint): number[] => [0x48, 0xbf, ...u64(v)],
  ecx: (v: number): number[] => [0xb9, ...u32(v)],
} as const;

/** Builds a loop guest. @returns the code and the offset of the loop body. */
export function loopGuest(body: readonly number[], iterations: number, setup: readonly number[] = []): { code: Uint8Array; bodyOffset: number } {
  if (body.length + 4 > 127) throw new RangeError('loop body too long for a short jump');
  const head = [...setup, 0xbb, ...u32(iterations)];
  const loop = [...body, 0xff, 0xcb, 0x75, (-(body.length + 4)) & 0xff];
  const tail = [...SETUP.dx(END_PORT), 0xee, 0xeb, 0xfe]; // then spin (jmp $) should the end port not stop us
  return { code: Uint8Array.from([...head, ...loop, ...tail]), bodyOffset: head.length };
}
