// The platform pieces a guest meets through port I/O, on real KVM: the ACPI PM timer and sleep
// states behind a FADT from writeAcpiTables({ power }), the CMOS RTC's update cycle, and CPU
// models (CPUID at ring 0: on PVM ring-3 CPUID never reaches KVM's table).
import { ACPI_PM_DEFAULT_BASE, ACPI_SLEEP_TYPE, CPU_FEATURES, CPU_MODELS, CpuModelError, cpuHasFeature, type CpuidEntry, Machine, writeAcpiTables } from '@tsvm/core';
import { asm, kvmAvailability } from '@tsvm/core/testing';
import { describe, expect, it } from 'vitest';
import { AcpiPm, CmosRtc, DebugExit, PM_TIMER_HZ, Pm1Event } from './index.js';

const kvm = kvmAvailability();
const MiB = 1024 * 1024;
const PM1_EVT = ACPI_PM_DEFAULT_BASE;
const PM1_CNT = ACPI_PM_DEFAULT_BASE + 4;
const PM_TMR = ACPI_PM_DEFAULT_BASE + 8;
const SLP_EN = 1 << 13;
const slp = (typ: number): number => (typ << 10) | SLP_EN;

async function machine(code: string, options: { cpu?: 'host' | 'qemu64' } = {}) {
  const vm = await Machine.create({ memory: 2 * MiB, ...(options.cpu ? { cpu: options.cpu } : {}) });
  const acpi = writeAcpiTables(vm.memory, { power: true });
  const facs = acpi.facsAddress as number;
  const pm = new AcpiPm({ wakingVector: () => BigInt(vm.memory.readUint(facs + 12, 4)) });
  vm.attachDevice(pm);
  vm.attachDevice(new DebugExit());
  const text = code.replaceAll('FACS', String(facs));
  const bytes = await asm(text, { bits: 64, address: 0x1000 });
  vm.loadFlat(bytes, { at: 0x1000, mode: 'long' });
  return { vm, pm, acpi, bytes };
}

describe.skipIf(!kvm.available)(`ACPI PM, RTC update cycle and CPU models on real KVM${kvm.available ? '' : ` (SKIPPED: ${kvm.reason})`}`, () => {
  it('the guest reads the PM timer twice, 150 ms apart, and it advanced at 3.579545 MHz', async () => {
    const t0 = performance.now();
    const { vm } = await machine(`
      mov dx, ${PM_TMR}
      in eax, dx
      mov r8d, eax
      mov dx, 0xf4
      out dx, al          // stop: the host waits
      mov dx, ${PM_TMR}
      in eax, dx
      mov r9d, eax
      mov dx, 0xf4
      out dx, al`);
    await using _ = vm;
    const first = await vm.run({ timeout: 5000 });
    expect(first.reason).toBe('debug-exit');
    await new Promise((r) => setTimeout(r, 150));
    const second = await vm.run({ timeout: 5000 });
    const wallMs = performance.now() - t0;
    expect(second.reason).toBe('debug-exit');
    const regs = vm.vcpu(0).getRegs();
    const ticks = (Number(regs.r9) - Number(regs.r8)) >>> 0; // 32-bit wrap-safe
    const ms = (ticks / PM_TIMER_HZ) * 1000;
    // At least the host's wait, at most the wall time around both runs (plus a tick).
    expect(ms).toBeGreaterThanOrEqual(150);
    expect(ms).toBeLessThanOrEqual(wallMs + 1);
  });

  it('SLP_TYP=S5 | SLP_EN is a poweroff stop at the out', async () => {
    const { vm, bytes } = await machine(`
      mov dx, ${PM1_CNT}
      mov ax, ${slp(ACPI_SLEEP_TYPE.S5)}
      out dx, ax
      ud2`);
    await using _ = vm;
    const stop = await vm.run({ timeout: 5000 });
    expect(stop.reason).toBe('poweroff');
    expect(stop.rip).toBe(0x1000n + BigInt(bytes.length - 4)); // the out (66 ef), before ud2 (0f 0b)
  });

  it('S3 is a suspend stop carrying the FACS waking vector; run() again resumes after the write with WAK_STS set', async () => {
    const { vm, pm } = await machine(`
      mov dword ptr [FACS + 12], 0x9a000   // what an OS would leave for the firmware
      mov dx, ${PM1_CNT}
      mov ax, ${slp(ACPI_SLEEP_TYPE.S3)}
      out dx, ax
      mov dx, ${PM1_EVT}
      in ax, dx
      movzx ebx, ax
      mov dx, 0xf4
      mov al, 7
      out dx, al`);
    await using _ = vm;
    const stop = await vm.run({ timeout: 5000 });
    expect(stop).toMatchObject({ reason: 'suspend', wakingVector: 0x9a000n });
    expect(pm.stats.suspends).toBe(1);
    const resumed = await vm.run({ timeout: 5000 });
    expect(resumed).toMatchObject({ reason: 'debug-exit', code: 15 });
    expect(Number(vm.vcpu(0).getRegs().rbx) & Pm1Event.WAK).toBe(Pm1Event.WAK);
  });

  it('a guest polling RTC status A sees UIP rise and fall, the seconds moving on at the fall', async () => {
    await using vm = await Machine.create({ memory: 2 * MiB });
    vm.attachDevice(new CmosRtc());
    vm.attachDevice(new DebugExit());
    // r12 counts polls (bounded: a guest that never sees the edge ends with code 5, not a hang).
    // r10: the seconds read after the last UIP=0 before the rise, so before the update (UIP=1
    // seen later means the update is still to come); r11: read after UIP fell, so after it.
    const code = `
      xor r12d, r12d
      rise:
        inc r12d
        cmp r12d, 2000000
        jae fail
        mov al, 0x0a
        out 0x70, al
        in al, 0x71
        test al, 0x80
        jnz risen
        mov al, 0
        out 0x70, al
        in al, 0x71
        movzx r10d, al
        jmp rise
      risen:
      fall:
        inc r12d
        cmp r12d, 2000000
        jae fail
        mov al, 0x0a
        out 0x70, al
        in al, 0x71
        test al, 0x80
        jnz fall
      mov al, 0
      out 0x70, al
      in al, 0x71
      movzx r11d, al
      mov dx, 0xf4
      mov al, 1
      out dx, al
      fail:
      mov dx, 0xf4
      mov al, 2
      out dx, al`;
    vm.loadFlat(await asm(code, { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long' });
    const stop = await vm.run({ timeout: 10_000 });
    expect(stop).toMatchObject({ reason: 'debug-exit', code: 3 });
    const regs = vm.vcpu(0).getRegs();
    const bcd = (v: bigint): number => (Number(v) >> 4) * 10 + (Number(v) & 0xf);
    expect(bcd(regs.r11)).toBe((bcd(regs.r10) + 1) % 60);
  });

  it("cpuid at ring 0 under 'qemu64' hides host features this host lets KVM control, and names the ones it cannot", async () => {
    const code = `
      mov eax, 1
      cpuid
      mov r8d, ecx
      mov r9d, edx
      mov dx, 0xf4
      out dx, al`;
    const seen: Record<string, { ecx: number; edx: number }> = {};
    let uncontrolled: readonly string[] = [];
    let host: CpuidEntry[] = [];
    for (const cpu of ['host', 'qemu64'] as const) {
      const { vm } = await machine(code, { cpu });
      await using _ = vm;
      const stop = await vm.run({ timeout: 5000 });
      expect(stop.reason).toBe('debug-exit');
      const r = vm.vcpu(0).getRegs();
      seen[cpu] = { ecx: Number(r.r8) >>> 0, edx: Number(r.r9) >>> 0 };
      if (cpu === 'qemu64') uncontrolled = vm.uncontrolledFeatures;
      else host = vm.vcpu(0).supportedCpuid();
    }
    const q = seen['qemu64'] as { ecx: number; edx: number };
    const h = seen['host'] as { ecx: number; edx: number };
    const named = (reg: '1.ecx' | '1.edx', b: number): string =>
      Object.entries(CPU_FEATURES).find(([, [r, x]]) => r === reg && x === b)?.[0] ?? `${reg}[${b}]`;
    // Bits the host shows under 'host' that qemu64 hides, split by whether the host can hide them.
    const hiddenByModel = { '1.ecx': (h.ecx & ~(CPU_MODELS.qemu64.features['1.ecx'] ?? 0)) >>> 0, '1.edx': (h.edx & ~(CPU_MODELS.qemu64.features['1.edx'] ?? 0)) >>> 0 };
    const controlled: string[] = [];
    for (const reg of ['1.ecx', '1.edx'] as const) {
      const got = reg === '1.ecx' ? q.ecx : q.edx;
      for (let b = 0; b < 32; b++) {
        if (!((hiddenByModel[reg] >>> b) & 1)) continue;
        const name = named(reg, b);
        if (name === 'osxsave') continue; // CR4's mirror: 0 at this point under both
        if (uncontrolled.includes(name)) {
          expect([name, (got >>> b) & 1]).toEqual([name, 1]); // what the machine says leaks, leaks
        } else {
          expect([name, (got >>> b) & 1]).toEqual([name, 0]); // the rest is hidden
          controlled.push(name);
        }
      }
    }
    // Something qemu64 lacks is hidden on any host (on PVM: TSC-deadline; on VMX/SVM: AVX, SSE4, ...).
    expect(controlled.length).toBeGreaterThan(0);
    if (cpuHasFeature(host, 'avx') && !uncontrolled.includes('avx')) expect(controlled).toContain('avx');
    // Nothing the host lacks appears.
    expect((q.ecx & ~h.ecx) >>> 0).toBe(0);
    expect((q.edx & ~h.edx) >>> 0).toBe(0);
    // strict refuses a host that cannot hide everything, and only such a host.
    const strict = Machine.create({ memory: 2 * MiB, cpu: { ...CPU_MODELS.qemu64, strict: true } });
    if (uncontrolled.length > 0) {
      await expect(strict).rejects.toBeInstanceOf(CpuModelError);
    } else {
      await (await strict).close();
    }
  });

  it('a snapshot of a qemu64 machine restores as qemu64: the guest sees the same CPUID after the restore', async () => {
    await using vm = await Machine.create({ memory: 2 * MiB, cpu: 'qemu64' });
    vm.attachDevice(new DebugExit());
    vm.loadFlat(await asm(`
      mov eax, 1
      cpuid
      mov r8d, ecx
      mov dx, 0xf4
      out dx, al
      mov eax, 1
      cpuid
      mov r9d, ecx
      mov dx, 0xf4
      out dx, al`, { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long' });
    expect((await vm.run({ timeout: 5000 })).reason).toBe('debug-exit');
    using snap = await vm.snapshot();
    expect(snap.manifest.machine.cpu?.name).toBe('qemu64');
    await using copy = await Machine.restore(snap, { devices: new DebugExit().mappings() });
    expect(copy.cpuModel).toEqual(vm.cpuModel);
    const again = await copy.run({ timeout: 5000 });
    expect(again.reason === 'unhandled-exit' ? again.message : again.reason).toBe('debug-exit');
    const r = copy.vcpu(0).getRegs();
    expect(Number(r.r9) >>> 0).toBe(Number(r.r8) >>> 0);
  });
});
