// `pnpm tsvm <command>`: the CLI entry point. One line on stderr for any failure, a distinct
// exit status per class (exit-codes.ts), and nothing left running.
import { errorStatus } from './exit-codes.js';
import { program } from './program.js';

try {
  await program().parseAsync(process.argv);
} catch (e) {
  const { status, message } = errorStatus(e);
  if (message) process.stderr.write(`tsvm: ${message}\n`);
  process.exitCode = status;
}
