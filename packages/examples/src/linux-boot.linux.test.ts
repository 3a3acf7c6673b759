/**
 * `pnpm test:linux` (opt-in, minutes long): boots Debian's cloud kernel through PVH on tsvm and
 * on QEMU's microvm in one run and compares them. Set-up fetches what is missing with apt
 * (`apt-get download` of the kernel package, `apt-get install qemu-system-x86`).
 *
 * Acceptance: tsvm's console shows the kernel's banner and the line QEMU's run ended on, and
 * tsvm ends with a typed stop that is not a missing device (`unhandled-exit`), a backend
 * failure or a timeout, and the kernel reports the FADT's PM timer (`ACPI: PM-Timer IO Port`). On VMX/SVM hosts both runs end at the root-filesystem panic
 * (`panic=-1` reboots at once); on a PVM host both end at the kernel's `int3` self-test, which
 * tsvm reports as `internal-error`.
 */
import { spawnSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { ACPI_PM_DEFAULT_BASE, ACPI_PM_LAYOUT } from '@tsvm/core';
import { kvmAvailability } from '@tsvm/core/testing';
import { bootQemu, bootTsvm, findOrFetchKernel, lastLine, milestoneTimes, qemuAvailable, renderTimelines, vmlinuxFile } from './linux-boot.js';

const kvm = kvmAvailability();
const tsvmTextOf = (t: { lines: readonly { text: string }[] }): string[] => t.lines.map((l) => l.text);
const timeoutMs = Number(process.env.TSVM_LINUX_TIMEOUT_S ?? 600) * 1000;

function ensureQemu(): boolean {
  if (qemuAvailable()) return true;
  console.warn('[tsvm] qemu-system-x86_64 missing: installing qemu-system-x86 with apt-get');
  spawnSync('apt-get', ['update', '-qq'], { stdio: 'inherit' });
  spawnSync('apt-get', ['install', '-y', '-qq', '--no-install-recommends', 'qemu-system-x86'], { stdio: 'inherit', env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
  return qemuAvailable();
}

describe.skipIf(!kvm.available)('Linux via PVH: tsvm side by side with QEMU', () => {
  it('reaches the line QEMU ends on and stops with a typed reason', async () => {
    const { path, bytes } = vmlinuxFile(findOrFetchKernel());
    expect(ensureQemu(), 'qemu-system-x86 could not be installed').toBe(true);
    const t = await bootTsvm(bytes, { timeoutMs });
    const q = await bootQemu(path, { timeoutMs });
    console.log(`\n${renderTimelines(t, q)}\n`);

    expect(['unhandled-exit', 'backend-error', 'timeout', 'hook-error', 'device-error'], `tsvm stopped with ${t.outcome}`).not.toContain(t.stop.reason);
    const mt = milestoneTimes(t.lines);
    expect(mt.has('banner'), 'no "Linux version" banner on tsvm\'s UART').toBe(true);
    expect(mt.has('command line')).toBe(true);
    expect(t.lines.some((l) => l.text.includes('Command line: console=ttyS0'))).toBe(true);
    // The kernel parsed the FADT (ACPI power management is on by default) and found the PM timer
    // where the tables put it: setup_arch prints this long before the PVM-unreachable FPU line.
    const pmTimer = `0x${(ACPI_PM_DEFAULT_BASE + ACPI_PM_LAYOUT.timer).toString(16)}`;
    expect(tsvmTextOf(t), 'the kernel did not see the FADT\'s PM timer').toContain(`ACPI: PM-Timer IO Port: ${pmTimer}`);

    expect(q.outcome, 'QEMU did not finish in time: nothing to compare against').not.toBe('timeout');
    const qLast = lastLine(q.lines);
    expect(qLast, 'QEMU printed nothing').toBeDefined();
    const tsvmText = t.lines.map((l) => l.text);
    expect(tsvmText, `tsvm never printed QEMU's last line: ${qLast?.text}`).toContain(qLast?.text);
  });
});

describe.skipIf(kvm.available)('Linux via PVH (skipped)', () => {
  it.skip(`needs /dev/kvm: ${kvm.reason}`, () => {});
});
