/**
 * Inline x86 assembly for tests and examples, through `keystone-wasm` (no native toolchain):
 * a test writes its guest next to its assertions.
 *
 * Syntax: Intel, as keystone (and GNU as with `.intel_syntax noprefix`) reads it. Statements are
 * separated by newlines **or `;`**; comments start with `#` or `//`. A NASM-style `; comment`
 * is therefore *not* a comment: its words are assembled and fail with an error naming the
 * line and column, never silently dropped. Sizes need `ptr` (`dword ptr [rax]`).
 * For guests kept in files, with macros, sections or `;` comments, use Debian's `nasm`
 * (`nasm -f bin guest.asm`) and load the binary; `asm()` is for a few lines inside a test.
 *
 * Guarantees: every statement produces its bytes or the call fails (`InvalidArgumentError` with
 * line and column); the assembler runs in a worker thread with a time limit, so no input can
 * hang the caller.
 * @example
 * ```ts
 * import { asm } from '@tsvm/core/asm';
 * const code = await asm('mov al, 1 ; mov bl, 2', { bits: 64 }); // b0 01 b3 02
 * ```
 * @module
 */
import { createRequire } from 'node:module';
import { Worker } from 'node:worker_threads';
import { InvalidArgumentError } from './errors.js';
import { at, splitStatements, type Statement } from './asm-source.js';

/** Options of {@link asm}. */
export interface AsmOptions {
  /** 16, 32 or 64. Default 64. */
  readonly bits?: 16 | 32 | 64;
  /** Address the code will run at (for labels and relative jumps). Default 0. */
  readonly address?: number;
  /** Time limit for the assembler in milliseconds (its first start excluded). Default 5000. */
  readonly timeoutMs?: number;
}

type Result = { readonly bytes: Uint8Array } | { readonly error: string };

// The worker is CommonJS evaluated from a string, so it needs no file of its own next to the
// bundle; it loads keystone's CJS entry by absolute path (resolved here, where the package is).
const WORKER = `
const { parentPort, workerData } = require('node:worker_threads');
const ks = require(workerData.keystone);
const engines = new Map();
ks.loadKeystone().then(() => {
  parentPort.postMessage({ ready: true });
  parentPort.on('message', ({ id, bits, address, texts }) => {
    let k = engines.get(bits);
    if (!k) {
      k = new ks.Keystone(ks.Const.KS_ARCH_X86, bits === 16 ? ks.Const.KS_MODE_16 : bits === 32 ? ks.Const.KS_MODE_32 : ks.Const.KS_MODE_64);
      engines.set(bits, k);
    }
    const results = texts.map((t) => {
      try { return { bytes: k.asm(t, { address }) }; } catch (e) { return { error: String(e && e.message || e) }; }
    });
    parentPort.postMessage({ id, results });
  });
}, (e) => parentPort.postMessage({ failed: String(e && e.message || e) }));
`;

interface Pending { resolve(r: Result[]): void; reject(e: Error): void; timer?: NodeJS.Timeout }

/** One assembler worker per process, started on first use, unref'd while idle. */
class AsmWorker {
  readonly #worker: Worker;
  readonly #ready: Promise<void>;
  readonly #pending = new Map<number, Pending>();
  #next = 0;
  #dead: Error | undefined;

  constructor() {
    const keystone = createRequire(import.meta.url).resolve('keystone-wasm');
    this.#worker = new Worker(WORKER, { eval: true, workerData: { keystone } });
    this.#worker.unref();
    this.#ready = new Promise((resolve, reject) => {
      this.#worker.on('message', (m: { ready?: true; failed?: string; id?: number; results?: Result[] }) => {
        if (m.ready) return resolve();
        if (m.failed !== undefined) return reject(new Error(`keystone failed to load: ${m.failed}`));
        const p = this.#pending.get(m.id ?? -1);
        if (!p || !m.results) return;
        this.#settle(m.id ?? -1);
        p.resolve(m.results);
      });
      const die = (e: Error): void => {
        this.#dead ??= e;
        reject(e);
        for (const id of [...this.#pending.keys()]) { const p = this.#pending.get(id); this.#settle(id); p?.reject(e); }
      };
      this.#worker.on('error', die);
      this.#worker.on('exit', (code) => die(new Error(`assembler worker exited (code ${code})`)));
    });
    this.#ready.catch(() => undefined);
  }

  get dead(): boolean { return this.#dead !== undefined; }

  async run(bits: number, address: number, texts: string[], timeoutMs: number): Promise<Result[]> {
    this.#worker.ref(); // a pending request must keep the process alive (top-level await in a script)
    try {
      await this.#ready;
    } catch (e) {
      if (this.#pending.size === 0) this.#worker.unref();
      throw e;
    }
    const id = this.#next++;
    return new Promise<Result[]>((resolve, reject) => {
      const p: Pending = { resolve, reject };
      p.timer = setTimeout(() => {
        this.#dead ??= new Error('assembler worker stopped after a time-out');
        this.#settle(id);
        void this.#worker.terminate(); // the only way to stop a spinning wasm call
        reject(new InvalidArgumentError('source', `the assembler did not finish within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#pending.set(id, p);
      this.#worker.postMessage({ id, bits, address, texts });
    });
  }

  #settle(id: number): void {
    const p = this.#pending.get(id);
    if (p?.timer) clearTimeout(p.timer);
    this.#pending.delete(id);
    if (this.#pending.size === 0) this.#worker.unref();
  }
}

let worker: AsmWorker | undefined;

function assembler(): AsmWorker {
  if (!worker || worker.dead) worker = new AsmWorker();
  return worker;
}

/**
 * Assembles Intel-syntax source: statements separated by newlines or `;`, comments after `#`
 * or `//` (see the module documentation for why `;` is not a comment).
 * @param source - the assembly text.
 * @param options - mode, load address and time limit.
 * @returns the machine code, never empty for a source that has an instruction or directive.
 * @throws InvalidArgumentError naming the line and column of the first statement that does not
 *   assemble, that produced no bytes, or when the time limit passes.
 */
export async function asm(source: string, options: AsmOptions = {}): Promise<Uint8Array> {
  if (typeof source !== 'string') throw new InvalidArgumentError('source', 'must be a string');
  const bits = options.bits ?? 64;
  if (bits !== 16 && bits !== 32 && bits !== 64) throw new InvalidArgumentError('bits', `must be 16, 32 or 64, got ${String(bits)}`);
  const address = options.address ?? 0;
  if (!Number.isSafeInteger(address) || address < 0) throw new InvalidArgumentError('address', `must be a non-negative safe integer, got ${address}`);
  const timeoutMs = options.timeoutMs ?? 5000;
  if (!(timeoutMs > 0) || !Number.isFinite(timeoutMs)) throw new InvalidArgumentError('timeoutMs', `must be a positive number, got ${timeoutMs}`);

  const statements = splitStatements(source);
  if (statements.length === 0) return new Uint8Array(0);
  const w = assembler();
  const [whole] = await w.run(bits, address, [join(statements)], timeoutMs);
  const emits = statements.some((s) => s.emits);
  if (whole && 'bytes' in whole && (whole.bytes.length > 0 || !emits)) return Uint8Array.from(whole.bytes);
  // Something failed or vanished: find the first statement responsible by assembling growing
  // prefixes, with the labels defined later stubbed so forward jumps still resolve.
  const problem = whole && 'error' in whole ? whole.error : 'produced no bytes';
  const texts = statements.map((_s, i) => prefix(statements, i));
  const results = await w.run(bits, address, texts, timeoutMs);
  for (let i = 0; i < statements.length; i++) {
    const r = results[i];
    const s = statements[i];
    if (!r || !s) break;
    if ('error' in r) throw at(s, `cannot assemble "${s.text}": ${tidy(r.error)}`);
    if (s.emits && r.bytes.length === 0) throw at(s, `"${s.text}" produced no bytes (keystone drops the whole program for it; sizes need "ptr", e.g. "dword ptr [rax]")`);
  }
  const first = statements[0] ?? { line: 1, column: 1 };
  throw at(first, `cannot assemble the program: ${tidy(problem)}`);
}

function join(statements: readonly Statement[]): string {
  return statements.map((s) => s.text).join('\n');
}

function prefix(statements: readonly Statement[], i: number): string {
  const head = statements.slice(0, i + 1);
  const defined = new Set(head.flatMap((s) => s.labels));
  const later = statements.slice(i + 1).flatMap((s) => s.labels).filter((l) => !defined.has(l));
  return [join(head), ...[...new Set(later)].map((l) => `${l}:`)].join('\n');
}

function tidy(message: string): string {
  return message.replace(/^Failed to assemble, error: /, '');
}
