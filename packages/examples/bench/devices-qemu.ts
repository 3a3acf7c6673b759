/**
 * QEMU as the device bench's comparison VMM: finds `qemu-system-x86_64`, picks `-accel kvm` when
 * /dev/kvm opens (else TCG, which is an emulator and no fair comparison; the bench says so), and
 * boots the bench guest with `-kernel` (multiboot) on `-M pc`, COM1 on a pipe to us, and
 * `isa-debug-exit` at 0xf4 so the guest ends the run with a status.
 * @module
 */
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import type { SerialCapture } from './devices-guest.js';

/** A usable QEMU, or why there is none. */
export type QemuInfo =
  | { readonly available: true; readonly bin: string; readonly version: string; readonly accel: 'kvm' | 'tcg'; readonly accelReason: string }
  | { readonly available: false; readonly reason: string };

/** Looks for QEMU (`$TSVM_BENCH_QEMU`, default `qemu-system-x86_64`; `0`/`off` disables it). */
export function detectQemu(): QemuInfo {
  const bin = process.env.TSVM_BENCH_QEMU ?? 'qemu-system-x86_64';
  if (bin === '0' || bin === 'off') return { available: false, reason: 'disabled by TSVM_BENCH_QEMU' };
  const r = spawnSync(bin, ['--version'], { encoding: 'utf8' });
  if (r.error || r.status !== 0) {
    return { available: false, reason: `'${bin}' not found or not runnable (${r.error?.message ?? r.stderr.trim()}); install it with 'apt-get install -y qemu-system-x86'` };
  }
  let accel: 'kvm' | 'tcg' = 'kvm';
  let accelReason = '/dev/kvm opens';
  try {
    closeSync(openSync('/dev/kvm', 'r+'));
  } catch (e) {
    accel = 'tcg';
    accelReason = `/dev/kvm does not open (${(e as Error).message}): QEMU emulates (TCG), NOT comparable with tsvm on KVM`;
  }
  return { available: true, bin, version: r.stdout.split('\n')[0] ?? '', accel, accelReason };
}

/** How a QEMU run went. */
export interface QemuRun {
  /** Wall time of the whole QEMU process (start-up, firmware, guest, exit). */
  readonly wallMs: number;
}

/**
 * Boots `elf` with `cmdline` in QEMU, feeding COM1 output into `capture`, and waits for the guest's
 * debug-exit. QEMU exits with `(v << 1) | 1` for a guest write of `v`, so a guest `main()` that
 * returned 0 gives status 1; anything else is an error.
 * @throws Error on a timeout, a start failure or any other exit status (with QEMU's stderr and
 * the guest's console).
 */
export function runQemu(q: QemuInfo & { available: true }, elf: string, cmdline: string, capture: SerialCapture, timeoutMs: number): Promise<QemuRun> {
  const args = [
    '-M', 'pc', '-accel', q.accel, '-m', '64',
    // -nodefaults drops the NIC, VGA and default serial; COM1 is then exactly our pipe.
    '-nodefaults', '-no-user-config', '-nographic', '-no-reboot', '-monitor', 'none', '-serial', 'stdio',
    '-device', 'isa-debug-exit,iobase=0xf4,iosize=4',
    '-kernel', elf, '-append', cmdline,
  ];
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const child = spawn(q.bin, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    let timedOut = false;
    const timer = setTimeout(() => { timedOut = true; child.kill('SIGKILL'); }, timeoutMs);
    child.stdout.on('data', (b: Buffer) => capture.push(b));
    child.stderr.on('data', (b: Buffer) => { stderr += b.toString('utf8'); });
    child.on('error', (e) => { clearTimeout(timer); reject(new Error(`starting ${q.bin} failed: ${e.message}`)); });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      const wallMs = performance.now() - t0;
      const why = timedOut ? `timed out after ${timeoutMs} ms` : code === 1 ? '' : `exited with ${code ?? signal} (guest failed at step ${code !== null && code % 2 === 1 ? (code - 1) / 2 : '?'})`;
      if (why) {
        reject(new Error(`QEMU ${why}\n${q.bin} ${args.map((a) => (/\s/.test(a) ? `'${a}'` : a)).join(' ')}\nstderr: ${stderr.trim()}\nguest console: ${capture.text().slice(-2000)}`));
        return;
      }
      resolve({ wallMs });
    });
  });
}
