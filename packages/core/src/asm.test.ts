import { describe, expect, it } from 'vitest';
import { asm } from './asm.js';
import { splitStatements } from './asm-source.js';
import { InvalidArgumentError } from './errors.js';

const hex = (b: Uint8Array): string => Buffer.from(b).toString('hex');

async function rejection(p: Promise<unknown>): Promise<InvalidArgumentError> {
  const e: unknown = await p.then(() => undefined, (x: unknown) => x);
  expect(e).toBeInstanceOf(InvalidArgumentError);
  return e as InvalidArgumentError;
}

describe('asm', () => {
  it('never drops a statement: ";" separates, like a newline', async () => {
    expect(hex(await asm('mov al, 1 ; mov bl, 2'))).toBe('b001b302');
    expect(hex(await asm('mov al, 1;mov bl, 2'))).toBe('b001b302');
    expect(hex(await asm('mov al, 1\n  mov bl, 2\r\n'))).toBe('b001b302');
  });

  it('treats "#" and "//" as comments, and ";" "#" inside strings as text', async () => {
    expect(hex(await asm('mov al, 1 # set al ; still a comment\nmov bl, 2 // and this'))).toBe('b001b302');
    expect(hex(await asm('.ascii "a ; b # c"'))).toBe(Buffer.from('a ; b # c').toString('hex'));
    expect(hex(await asm(".ascii \"x;y\" ; mov al, ';'"))).toBe('783b79b03b');
  });

  it('resolves labels, forward and backward, at the given address', async () => {
    expect(hex(await asm('l: jmp l2\nl2: nop'))).toBe('eb0090');
    expect(hex(await asm('a: b: nop ; jmp a', { address: 0x1000 }))).toBe('90ebfd');
    expect(hex(await asm('mov ax, 1', { bits: 16 }))).toBe('b80100');
  });

  it('returns nothing for a source of only comments and blanks', async () => {
    expect((await asm('  # nothing\n\n ; ')).length).toBe(0);
  });

  it('names line and column of a statement keystone rejects', async () => {
    const e = await rejection(asm('nop\n  mov al, 1\n    frob eax\nnop'));
    expect(e.message).toMatch(/line 3, column 5: cannot assemble "frob eax"/);
    expect(e.argument).toBe('source');
  });

  it('finds the failing statement behind a forward label', async () => {
    const e = await rejection(asm('jmp done\nmov eax, nosuch\ndone: hlt'));
    expect(e.message).toMatch(/line 2, column 1: .*nosuch/);
  });

  it('a NASM-style "; comment" fails naming where, instead of vanishing', async () => {
    const e = await rejection(asm('mov al, 1 ; set the flag'));
    expect(e.message).toMatch(/line 1, column 13: cannot assemble "set the flag"/);
  });

  it('an empty result for a non-empty source is an error naming the statement', async () => {
    const e = await rejection(asm('nop\nmov eax, dword [rbx]\nnop'));
    expect(e.message).toMatch(/line 2, column 1: "mov eax, dword \[rbx\]" produced no bytes.*ptr/);
  });

  it('rejects input that would hang or mis-assemble keystone before it runs', async () => {
    const started = performance.now();
    expect((await rejection(asm('nop\n.ascii "a'))).message).toMatch(/line 2, column 8: string opened with " is never closed/);
    expect((await rejection(asm('mov eax, [rbx'))).message).toMatch(/line 1, column 10: '\[' is never closed/);
    expect((await rejection(asm('mov eax, rbx]'))).message).toMatch(/line 1, column 13: '\]' without/);
    expect((await rejection(asm('nop\0nop'))).message).toMatch(/NUL/);
    // keystone spins forever on a multi-character '…' literal (found by this test's first draft)
    expect((await rejection(asm(".ascii 'x;y'"))).message).toMatch(/line 1, column 8: 'x;y' is not one character/);
    expect(performance.now() - started).toBeLessThan(5000);
  });

  it('stops a run that passes its time limit, and the next call works', async () => {
    const big = Array.from({ length: 20_000 }, (_v, i) => `l${i}: mov eax, ${i}`).join('\n');
    expect((await rejection(asm(big, { timeoutMs: 1 }))).message).toMatch(/did not finish within 1 ms/);
    expect(hex(await asm('nop'))).toBe('90');
  });

  it('validates its options', async () => {
    await rejection(asm('nop', { bits: 8 as 16 }));
    await rejection(asm('nop', { address: -1 }));
    await rejection(asm('nop', { timeoutMs: 0 }));
    await rejection(asm(42 as unknown as string));
  });

  it('keeps working after many calls and in parallel', async () => {
    const all = await Promise.all(Array.from({ length: 20 }, (_v, i) => asm(`mov eax, ${i}`)));
    expect(all.map((b) => b[1])).toEqual(Array.from({ length: 20 }, (_v, i) => i));
  });
});

describe('splitStatements', () => {
  it('records labels, lines and columns', () => {
    expect(splitStatements('  a: nop ; b:\n# c\n  c: d: .byte 1')).toEqual([
      { text: 'a: nop', line: 1, column: 3, labels: ['a'], emits: true },
      { text: 'b:', line: 1, column: 12, labels: ['b'], emits: false },
      { text: 'c: d: .byte 1', line: 3, column: 3, labels: ['c', 'd'], emits: true },
    ]);
  });
  it('does not take a string escape for the closing quote', () => {
    expect(splitStatements('.ascii "a\\";b"').map((s) => s.text)).toEqual(['.ascii "a\\";b"']);
  });
});
