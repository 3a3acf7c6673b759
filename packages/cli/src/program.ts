/**
 * The command tree (commander). `doctor` is the first command; `run`, `calibrate`, `policy check`
 * and `audit verify` are still to come (issue 12).
 * @module
 */
import { Command } from 'commander';
import { doctor, renderDoctor } from './doctor.js';

/** Builds the `tsvm` program; `out` receives what it prints (stdout by default). */
export function program(out: (text: string) => void = (t) => process.stdout.write(`${t}\n`)): Command {
  const p = new Command('tsvm').description('build and inspect monitored virtual machines on Linux KVM').exitOverride();
  p.command('doctor')
    .description("what this host's KVM offers, where RIP is at an I/O exit, and which monitor mechanisms work at which CPL")
    .option('--json', 'print the report as JSON')
    .option('--cache <file>', 'calibration cache to read')
    .action((opts: { json?: boolean; cache?: string }) => {
      const r = doctor(opts.cache ? { cachePath: opts.cache } : {});
      out(opts.json ? JSON.stringify(r, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v), 2) : renderDoctor(r));
    });
  return p;
}
