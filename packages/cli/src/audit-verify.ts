/**
 * `tsvm audit verify FILE`: check a hash-chained audit log with the monitor's `verifyAuditLog`.
 * @module
 */
import { readFileSync } from 'node:fs';
import { verifyAuditLog } from '@tsvm/monitor';
import { CliError, EXIT } from './exit-codes.js';

/** Verifies the log at `path` (optionally against a known head hash). @returns the line to print and the status. */
export function verifyAuditFile(path: string, head?: string): { readonly status: number; readonly line: string } {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw new CliError(EXIT.noFile, `cannot read audit log ${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`, { cause: e });
  }
  const v = verifyAuditLog(text.split('\n'), head === undefined ? {} : { head });
  if (v.ok) return { status: EXIT.ok, line: `${path}: OK, ${v.count} lines, head ${v.head}` };
  return { status: EXIT.failed, line: `${path}: line ${v.line + 1} is bad: ${v.problem}` };
}
