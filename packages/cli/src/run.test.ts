// `tsvm run` on MockBackend: the Linux path's platform (ACPI fixed hardware behind the FADT it
// writes) and how a guest's ACPI sleep request becomes the exit status. Fabricated exits stand
// for the guest; the ports come from the tables in guest memory, not from constants.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { ACPI_DEFAULT_ADDRESS, ACPI_SLEEP_TYPE, Machine, writeAcpiTables, type GuestMemory } from '@tsvm/core';
import { MockBackend, inExit, outExit } from '@tsvm/core/testing';
import { PM_TIMER_HZ, Pm1Event } from '@tsvm/devices';
import { EXIT } from './exit-codes.js';
import { bzImage } from './images.fixture.js';
import { attachAcpiPm, runImage } from './run.js';

const MiB = 1024 * 1024;
const SLP_EN = 1 << 13;
const sleep = (typ: number): number => (typ << 10) | SLP_EN;

const dirs: string[] = [];
afterEach(() => { for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true }); });
function file(name: string, bytes: Uint8Array): string {
  const d = mkdtempSync(join(tmpdir(), 'tsvm-run-'));
  dirs.push(d);
  writeFileSync(join(d, name), bytes);
  return join(d, name);
}

/** What a kernel reads from the FADT: found through RSDP → XSDT, as the kernel finds it. */
interface Fadt { pm1Event: number; pm1Control: number; pmTimer: number; sciIrq: number; facs: number }
function readFadt(m: GuestMemory): Fadt | undefined {
  const text = (a: number, n: number): string => String.fromCharCode(...m.read(a, n));
  if (text(ACPI_DEFAULT_ADDRESS, 8) !== 'RSD PTR ') return undefined;
  const xsdt = m.readUint(ACPI_DEFAULT_ADDRESS + 24, 4);
  const entries = (m.readUint(xsdt + 4, 4) - 36) / 8;
  for (let i = 0; i < entries; i++) {
    const t = m.readUint(xsdt + 36 + 8 * i, 4);
    if (text(t, 4) !== 'FACP') continue;
    return { sciIrq: m.readUint(t + 46, 2), pm1Event: m.readUint(t + 56, 4), pm1Control: m.readUint(t + 64, 4), pmTimer: m.readUint(t + 76, 4), facs: m.readUint(t + 36, 4) };
  }
  return undefined;
}

/**
 * Runs a fake bzImage under `tsvm run` on a MockBackend; `guest` scripts vCPU 0 once the tables
 * are in memory. @returns the exit status and the stderr lines.
 */
async function runLinux(guest: (vm: Machine, fadt: Fadt) => Parameters<MockBackend['script']>): Promise<{ status: number; err: string[]; fadt: Fadt | undefined }> {
  const backend = new MockBackend();
  const err: string[] = [];
  let fadt: Fadt | undefined;
  const status = await runImage({
    image: file('fake.bz', bzImage(new Uint8Array([0xf4]))), memory: 64 * MiB, backend, stderr: (l) => err.push(l),
    onReady: (vm) => {
      fadt = readFadt(vm.memory);
      if (fadt === undefined) return; // the run then halts: the test's expectations fail
      backend.vms[0]?.vcpus[0]?.script(...guest(vm, fadt));
    },
  });
  return { status, err, fadt };
}

describe('tsvm run, Linux image: ACPI power management', () => {
  it('writes a FADT and attaches the PM block where it says: a PM-timer read is answered, S5 | SLP_EN is poweroff, exit 0', async () => {
    let timerRead: number | undefined;
    const r = await runLinux((_vm, fadt) => [
      inExit(fadt.pmTimer, 4),
      (vcpu) => { timerRead = new DataView(vcpu.reads[0]?.slice().buffer ?? new ArrayBuffer(0)).getUint32(0, true); return inExit(fadt.pm1Control, 2); },
      outExit(fadt.pm1Control, sleep(ACPI_SLEEP_TYPE.S5), 2),
      { kind: 'unsupported', reason: 999 }, // never reached: the poweroff stops the run first
    ]);
    expect(r.fadt, 'no FADT behind the RSDP').toBeDefined();
    expect(r.fadt?.sciIrq).toBe(9);
    expect(r.fadt?.pm1Control).toBe((r.fadt?.pm1Event ?? -1) + 4);
    // The PM timer counts from 0 at attach time: far below an all-ones "nothing there" value.
    expect(timerRead, 'the PM-timer read was not answered by the PM timer').toBeLessThan(PM_TIMER_HZ * 60);
    expect(r.err[0]).toMatch(/Linux bzImage, boot protocol 2\.15, 64-bit entry, ACPI PM at 0x[0-9a-f]+; 64 MiB/);
    expect(r.err[1]).toMatch(/guest powered off \(ACPI S5\) .*; exit 0$/);
    expect(r.status).toBe(EXIT.ok);
  });

  it('S3 | SLP_EN ends the run as suspended (exit 15), naming the waking vector the guest left in the FACS', async () => {
    const r = await runLinux((vm, fadt) => {
      vm.memory.writeUint(fadt.facs + 12, 4, 0x9a000); // what an OS leaves for the firmware
      return [outExit(fadt.pm1Control, sleep(ACPI_SLEEP_TYPE.S3), 2)];
    });
    expect(r.status).toBe(EXIT.suspended);
    expect(r.err[1]).toMatch(/suspended to RAM \(ACPI S3\) .*waking vector 0x9a000; .*exit 15$/);
  });

  it('a sleep type the DSDT does not declare is ignored: the run goes on to its halt', async () => {
    const r = await runLinux((_vm, fadt) => [outExit(fadt.pm1Control, sleep(7), 2), { kind: 'hlt' }]);
    expect(r.err[1]).toMatch(/guest halted/);
    expect(r.status).toBe(EXIT.ok);
  });

  it('a flat image gets no ACPI tables and no PM block: the same write is an unhandled exit', async () => {
    const backend = new MockBackend();
    backend.script(outExit(0x604, sleep(ACPI_SLEEP_TYPE.S5), 2));
    const err: string[] = [];
    const status = await runImage({ image: file('flat.bin', new Uint8Array([0xf4])), backend, stderr: (l) => err.push(l) });
    expect(err[1]).toMatch(/unhandled exit: .*0x604/);
    expect(status).toBe(EXIT.guestCrash);
  });
});

describe('attachAcpiPm', () => {
  it('wires the SCI to the irq line the tables name, and attaches nothing for tables without a FADT', async () => {
    const backend = new MockBackend();
    await using vm = await Machine.create({ memory: 2 * MiB, backend, irqchip: true });
    expect(attachAcpiPm(vm, writeAcpiTables(vm.memory))).toBeUndefined();
    const acpi = writeAcpiTables(vm.memory, { power: { pmBase: 0xb000, sciIrq: 11 } });
    const pm = attachAcpiPm(vm, acpi);
    expect(pm).toBeDefined();
    // The guest enables the power-button event at the PM base the tables name; the button then raises IRQ 11.
    backend.vms[0]?.vcpus[0]?.script(outExit(0xb002, Pm1Event.PWRBTN, 2));
    expect((await vm.run({ timeout: 1000 })).reason).toBe('halt');
    pm?.pressPowerButton();
    expect(backend.vms[0]?.irqs).toContainEqual({ irq: 11, level: true });
  });
});
