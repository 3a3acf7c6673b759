// `pnpm tsvm <command>`: the CLI entry point.
import { program } from './program.js';

try {
  await program().parseAsync(process.argv);
} catch (e) {
  // commander's own exits (help, version, bad usage) carry an exit code; anything else is a bug.
  const code = (e as { exitCode?: number }).exitCode;
  if (typeof code !== 'number') throw e;
  process.exitCode = code;
}
