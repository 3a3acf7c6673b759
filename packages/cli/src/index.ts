/**
 * `@tsvm/cli` — the `tsvm` command-line tool (`pnpm tsvm doctor`). It depends on the other
 * packages and nothing depends on it.
 * @module
 */
export { doctor, renderDoctor, type DoctorReport, type DoctorOptions } from './doctor.js';
export { program } from './program.js';
