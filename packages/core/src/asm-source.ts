/**
 * Splitting assembly source into statements before keystone sees it. Keystone's own lexer
 * spins forever on an unterminated string, emits garbage for an unclosed `[`, and cannot say on
 * which line it failed; so the text is checked and split here, and every statement keeps where
 * it came from.
 * @module
 * @internal
 */
import { InvalidArgumentError } from './errors.js';

/** One statement of the source and where it starts (1-based line and column). */
export interface Statement {
  /** The statement's text, comments removed, trimmed. */
  readonly text: string;
  /** 1-based line of its first character. */
  readonly line: number;
  /** 1-based column of its first character. */
  readonly column: number;
  /** Labels defined at its start (`a: b: nop` defines `a` and `b`). */
  readonly labels: readonly string[];
  /** Whether anything but label definitions is left (an instruction or a directive). */
  readonly emits: boolean;
}

const LABEL = /^([A-Za-z_.$@?][\w.$@?]*)\s*:(?!:)\s*/;

/** The error for a statement, naming its line and column. */
export function at(where: { line: number; column: number }, message: string): InvalidArgumentError {
  return new InvalidArgumentError('source', `line ${where.line}, column ${where.column}: ${message}`);
}

/**
 * Splits `source` into statements. Newlines and `;` separate statements (keystone's Intel
 * syntax, like GNU as, treats `;` as a separator); `#` and `//` start a comment that runs to the
 * end of the line. Inside `"…"` and `'…'` none of these characters is special.
 * @throws InvalidArgumentError for a NUL character, an unterminated string or unbalanced brackets.
 */
export function splitStatements(source: string): Statement[] {
  const out: Statement[] = [];
  const lines = source.split(/\r?\n/);
  for (let l = 0; l < lines.length; l++) {
    const line = lines[l] ?? '';
    let start = 0;
    let quote: { char: string; column: number } | undefined;
    let depth = 0;
    let open = 0;
    const flush = (end: number): void => {
      const raw = line.slice(start, end);
      const lead = raw.length - raw.trimStart().length;
      const text = raw.trim();
      const where = { line: l + 1, column: start + lead + 1 };
      if (depth !== 0) throw at({ line: l + 1, column: open + 1 }, `'[' is never closed in "${text}"`);
      if (text) out.push(describe(text, where));
    };
    let i = 0;
    for (; i < line.length; i++) {
      const c = line[i];
      if (c === '\0') throw at({ line: l + 1, column: i + 1 }, 'NUL character in source');
      if (quote) {
        if (c === '\\') i++;
        else if (c === quote.char) {
          // keystone reads '…' as one character and spins forever on a longer one ('ab').
          const body = line.slice(quote.column + 1, i);
          if (c === "'" && !/^(\\?[^\\]|\\\\)$/.test(body)) throw at({ line: l + 1, column: quote.column + 1 }, `'${body}' is not one character; use "…" for a string`);
          quote = undefined;
        }
        continue;
      }
      if (c === '"' || c === "'") quote = { char: c, column: i };
      else if (c === '[') { if (depth++ === 0) open = i; }
      else if (c === ']') { if (--depth < 0) throw at({ line: l + 1, column: i + 1 }, "']' without a matching '['"); }
      else if (c === '#' || (c === '/' && line[i + 1] === '/')) break;
      else if (c === ';') { flush(i); start = i + 1; depth = 0; }
    }
    if (quote) throw at({ line: l + 1, column: quote.column + 1 }, `string opened with ${quote.char} is never closed`);
    flush(i);
  }
  return out;
}

function describe(text: string, where: { line: number; column: number }): Statement {
  const labels: string[] = [];
  let rest = text;
  for (let m = LABEL.exec(rest); m; m = LABEL.exec(rest)) {
    labels.push(m[1] ?? '');
    rest = rest.slice(m[0].length);
  }
  return { text, ...where, labels, emits: rest.length > 0 };
}
