// bootTsvm on MockBackend: the minimal PC it builds for a kernel includes ACPI power management
// (a FADT and the AcpiPm behind it) unless `acpi: false`, and a guest's S5 write ends the boot
// as a `poweroff`. Fabricated exits stand for the kernel; the ports come from the FADT in guest
// memory. The real kernel boot is linux-boot.linux.test.ts.
import { describe, expect, it } from 'vitest';
import { ACPI_DEFAULT_ADDRESS, ACPI_PM_DEFAULT_BASE, ACPI_PM_LAYOUT, ACPI_SLEEP_TYPE, type GuestMemory, type Machine } from '@tsvm/core';
import { MockBackend, inExit, outExit, type MockStep } from '@tsvm/core/testing';
import { bootTsvm } from './linux-boot.js';

const SLP_EN = 1 << 13;
const ENTRY = 0x1000000;

/** A minimal vmlinux: one PT_LOAD of `hlt` at 16 MiB and a PT_NOTE with the PVH entry (Xen, type 18). */
function pvhVmlinux(): Uint8Array {
  const f = new Uint8Array(0x1001);
  const v = new DataView(f.buffer);
  f.set([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1]);
  v.setUint16(16, 2, true); v.setUint16(18, 0x3e, true); v.setUint32(20, 1, true);
  v.setBigUint64(24, BigInt(ENTRY), true); v.setBigUint64(32, 64n, true);
  v.setUint16(52, 64, true); v.setUint16(54, 56, true); v.setUint16(56, 2, true);
  const ph = (i: number, type: number, offset: number, addr: number, size: number, align: number): void => {
    const o = 64 + 56 * i;
    v.setUint32(o, type, true); v.setUint32(o + 4, 5, true); v.setBigUint64(o + 8, BigInt(offset), true);
    v.setBigUint64(o + 16, BigInt(addr), true); v.setBigUint64(o + 24, BigInt(addr), true);
    v.setBigUint64(o + 32, BigInt(size), true); v.setBigUint64(o + 40, BigInt(size), true); v.setBigUint64(o + 48, BigInt(align), true);
  };
  ph(0, 1, 0x1000, ENTRY, 1, 0x1000); // PT_LOAD
  ph(1, 4, 0x100, 0, 20, 4); // PT_NOTE: header 12, name 4, descriptor 4
  v.setUint32(0x100, 4, true); v.setUint32(0x104, 4, true); v.setUint32(0x108, 18, true);
  f.set([0x58, 0x65, 0x6e, 0], 0x10c); // "Xen"
  v.setUint32(0x110, ENTRY, true);
  f[0x1000] = 0xf4; // hlt
  return f;
}

/** PM1a_CNT and the PM timer as the FADT names them (RSDP → XSDT → FACP), or undefined without one. */
function fadtPorts(m: GuestMemory): { pm1Control: number; pmTimer: number } | undefined {
  const text = (a: number, n: number): string => String.fromCharCode(...m.read(a, n));
  if (text(ACPI_DEFAULT_ADDRESS, 8) !== 'RSD PTR ') return undefined;
  const xsdt = m.readUint(ACPI_DEFAULT_ADDRESS + 24, 4);
  for (let i = 0; i < (m.readUint(xsdt + 4, 4) - 36) / 8; i++) {
    const t = m.readUint(xsdt + 36 + 8 * i, 4);
    if (text(t, 4) === 'FACP') return { pm1Control: m.readUint(t + 64, 4), pmTimer: m.readUint(t + 76, 4) };
  }
  return undefined;
}

async function boot(acpi: boolean | undefined, guest: (vm: Machine) => MockStep[]) {
  const backend = new MockBackend();
  const stop = await bootTsvm(pvhVmlinux(), {
    backend, memoryMiB: 64, timeoutMs: 5000, ...(acpi === undefined ? {} : { acpi }),
    onReady: (vm) => { backend.vms[0]?.vcpus[0]?.script(...guest(vm)); },
  });
  return stop;
}

describe('bootTsvm: ACPI power management on the minimal PC', () => {
  it('by default the FADT names a PM block that answers, and S5 | SLP_EN there ends the boot as poweroff', async () => {
    let ports: ReturnType<typeof fadtPorts>;
    const t = await boot(undefined, (vm) => {
      ports = fadtPorts(vm.memory);
      if (ports === undefined) return [];
      return [inExit(ports.pmTimer, 4), outExit(ports.pm1Control, (ACPI_SLEEP_TYPE.S5 << 10) | SLP_EN, 2), { kind: 'unsupported', reason: 999 }];
    });
    expect(ports, 'no FADT behind the RSDP').toEqual({ pm1Control: ACPI_PM_DEFAULT_BASE + ACPI_PM_LAYOUT.pm1Control, pmTimer: ACPI_PM_DEFAULT_BASE + ACPI_PM_LAYOUT.timer });
    expect(t.stop.reason).toBe('poweroff');
    expect(t.outcome).toMatch(/^poweroff at rip=/);
  });

  it('acpi: false means no ACPI at all: no RSDP, and the PM block is not there (an unhandled exit)', async () => {
    let hasTables: boolean | undefined;
    const t = await boot(false, (vm) => {
      hasTables = String.fromCharCode(...vm.memory.read(ACPI_DEFAULT_ADDRESS, 8)) === 'RSD PTR ';
      return [outExit(ACPI_PM_DEFAULT_BASE + ACPI_PM_LAYOUT.pm1Control, (ACPI_SLEEP_TYPE.S5 << 10) | SLP_EN, 2)];
    });
    expect(hasTables).toBe(false);
    expect(t.stop.reason).toBe('unhandled-exit');
  });
});
