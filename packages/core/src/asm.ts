/// <reference path="./keystone-wasm.d.ts" />
/**
 * Inline x86 assembly for tests and examples, through `keystone-wasm` (no native toolchain):
 * a test writes its guest next to its assertions.
 * @module
 */
import { InvalidArgumentError } from './errors.js';

type KeystoneModule = typeof import('keystone-wasm');
let ks: Promise<KeystoneModule> | undefined;
const engines = new Map<number, InstanceType<KeystoneModule['Keystone']>>();

async function load(): Promise<KeystoneModule> {
  ks ??= import('keystone-wasm').then(async (m) => { await m.loadKeystone(); return m; });
  return ks;
}

/** Options of {@link asm}. */
export interface AsmOptions {
  /** 16, 32 or 64. Default 64. */
  readonly bits?: 16 | 32 | 64;
  /** Address the code will run at (for labels and relative jumps). Default 0. */
  readonly address?: number;
}

/**
 * Assembles Intel-syntax source (statements separated by newlines or `;`).
 * @throws InvalidArgumentError naming the assembler's complaint.
 */
export async function asm(source: string, options: AsmOptions = {}): Promise<Uint8Array> {
  const m = await load();
  const bits = options.bits ?? 64;
  const mode = bits === 16 ? m.Const.KS_MODE_16 : bits === 32 ? m.Const.KS_MODE_32 : m.Const.KS_MODE_64;
  let k = engines.get(bits);
  if (!k) {
    k = new m.Keystone(m.Const.KS_ARCH_X86, mode);
    engines.set(bits, k);
  }
  // Keystone treats newlines inconsistently; join statements with ';' and drop comments.
  const text = source.split('\n').map((l) => l.replace(/(^|\s)[#;]\s.*$/, '').trim()).filter(Boolean).join('; ');
  try {
    return Uint8Array.from(k.asm(text, { address: options.address ?? 0 }));
  } catch (e) {
    throw new InvalidArgumentError('source', `cannot assemble: ${(e as Error).message}`);
  }
}
