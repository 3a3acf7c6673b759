import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { defineConfig } from 'vitest/config';

// Every run gets its own calibration cache: a test must never see what a user's (or an
// earlier run's) calibrate() measured, since which mechanism the monitor picks depends on it.
process.env.TSVM_CACHE_DIR = mkdtempSync(join(tmpdir(), 'tsvm-test-cache-'));

// Two projects: `unit` needs nothing but Node; `kvm` needs /dev/kvm and says loudly
// (see packages/core/src/testing/kvm-gate.ts) when it skips because KVM is missing.
// A third, `linux` (`*.linux.test.ts`: boots a distribution kernel on tsvm and QEMU, minutes
// long), exists only when TSVM_TEST_LINUX=1, which `pnpm test:linux` sets.
const linux = process.env.TSVM_TEST_LINUX === '1';
export default defineConfig({
  test: {
    reporters: ['default', './scripts/summary-reporter.ts'],
    projects: [
      {
        test: {
          name: 'unit',
          include: ['packages/*/src/**/*.test.ts', 'packages/*/test/**/*.test.ts'],
          exclude: ['**/*.kvm.test.ts', '**/*.linux.test.ts', '**/node_modules/**'],
          testTimeout: 20_000,
        },
      },
      {
        test: {
          name: 'kvm',
          include: ['packages/*/src/**/*.kvm.test.ts', 'packages/*/test/**/*.kvm.test.ts'],
          testTimeout: 60_000,
          hookTimeout: 60_000,
          // KVM tests share a 2-core host; run files one at a time so timings stay sane.
          pool: 'forks',
          poolOptions: { forks: { singleFork: true } },
        },
      },
      ...(linux
        ? [{
            test: {
              name: 'linux',
              include: ['packages/*/src/**/*.linux.test.ts'],
              testTimeout: 1_800_000,
              hookTimeout: 1_800_000,
              pool: 'forks' as const,
              poolOptions: { forks: { singleFork: true } },
            },
          }]
        : []),
    ],
  },
});
