// keystone-wasm ships types but its `exports` map has no `types` condition, so NodeNext
// resolution cannot find them. The subset tsvm uses:
declare module 'keystone-wasm' {
  export class Keystone {
    constructor(arch: number, mode: number);
    asm(data: string, options?: { address?: number | bigint }): Uint8Array;
    close(): void;
  }
  export const Const: { KS_ARCH_X86: number; KS_MODE_16: number; KS_MODE_32: number; KS_MODE_64: number };
  export function loadKeystone(args?: Record<string, unknown>): Promise<void>;
}
