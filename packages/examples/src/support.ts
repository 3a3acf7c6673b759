/**
 * Shared plumbing of the monitor examples: one-command entry points that exit 0 on success, 1 on
 * failure and 2 (with the reason) when `/dev/kvm` is unusable, and the host calibration the
 * examples price their hooks with.
 * @module
 */
import { pathToFileURL } from 'node:url';
import { KvmUnavailableError } from '@tsvm/core';
import type { CalibrationTable } from '@tsvm/monitor';
import { calibrate } from '@tsvm/monitor/calibrate';

/** Whether the module with `url` (`import.meta.url`) is the script node was started with. */
export function isMain(url: string): boolean {
  const script = process.argv[1];
  return script !== undefined && url === pathToFileURL(script).href;
}

/**
 * Runs an example's `main()` as a command: prints the KVM reason and exits 2 when KVM is
 * missing, prints the error and exits 1 when it throws, else exits with `main()`'s code.
 */
export async function runCli(name: string, main: () => Promise<number>): Promise<void> {
  try {
    process.exitCode = await main();
  } catch (e) {
    if (e instanceof KvmUnavailableError) {
      console.error(`${name}: KVM is not available here: ${e.reason}`);
      process.exitCode = 2;
      return;
    }
    console.error(`${name}: failed:`, e);
    process.exitCode = 1;
  }
}

/**
 * What works on this host and what it costs: `calibrate({ quick: true })`, cached per host in
 * `~/.cache/tsvm/calibration.json` (so only the first example run pays for it). Set
 * `TSVM_CALIBRATION=assumed` to skip measuring (the monitor then uses documented figures).
 */
export async function hostCalibration(): Promise<CalibrationTable | undefined> {
  if (process.env.TSVM_CALIBRATION === 'assumed') return undefined;
  return calibrate({ quick: true });
}

/** `0x1f` */
export const hex = (v: number | bigint): string => `0x${v.toString(16)}`;
