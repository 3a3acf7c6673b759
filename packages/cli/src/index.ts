/**
 * `@tsvm/cli` — the `tsvm` command-line tool: `doctor`, `run`, `calibrate`, `policy check`,
 * `audit verify` (`pnpm tsvm <command>`). It depends on the other packages and nothing depends
 * on it. The exit statuses are {@link EXIT}.
 * @module
 */
export { doctor, renderDoctor, type DoctorReport, type DoctorOptions } from './doctor.js';
export { program, runOptions, intArg, gdbArg, type ProgramIo } from './program.js';
export { EXIT, CliError, stopStatus, describeStop, errorStatus } from './exit-codes.js';
export { detectFormat, checkImage, parseSize, loadImage, IMAGE_FORMATS, type ImageFormat, type LoadOptions, type LoadedImage } from './image.js';
export { runImage, attachAcpiPm, checkPortFree, gdbStubAvailable, type RunCommandOptions } from './run.js';
export { runCalibrate, type CalibrateCommandOptions } from './calibrate.js';
export { checkPolicy, readPolicyFile, policyKind, type PolicyFile, type PolicyCheck } from './policy-check.js';
export { verifyAuditFile } from './audit-verify.js';
