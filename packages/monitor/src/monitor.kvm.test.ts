import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Machine } from '@tsvm/core';
import { asm, kvmAvailability } from '@tsvm/core/testing';
import { PROBE_PORT } from './probe.js';
import { Monitor } from './monitor.js';
import { allow, deny } from './decisions.js';
import { calibrate } from './calibration/calibrate.js';
import { assumedTable, priceOf, resultOf, MECHANISMS } from './calibration/table.js';
import { hostIdentity } from './calibration/host.js';
import { predict, report } from './cost/model.js';
import { renderSvg, renderTable } from './cost/render.js';

const kvm = kvmAvailability();
const MiB = 1024 * 1024;
const END = 0xf4;

async function machine(source: string, ring: 0 | 3) {
  const vm = await Machine.create({ memory: 4 * MiB });
  vm.io.register({ port: END, size: 1 }, { name: 'end', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });
  vm.loadFlat(await asm(`${source}\n mov dx, ${END}\n out dx, al`, { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring });
  return vm;
}

// What works here, measured once for this file (guest debug does not work everywhere: nested TCG, PVM).
let measured: ReturnType<typeof calibrate> | undefined;
const tmpDirs: string[] = [];
const tmpDir = (prefix: string): string => { const d = mkdtempSync(join(tmpdir(), prefix)); tmpDirs.push(d); return d; };
afterAll(() => { for (const d of tmpDirs) rmSync(d, { recursive: true, force: true }); });
const hostTable = () => (measured ??= calibrate({ quick: true, cachePath: join(tmpDir('tsvm-cal-'), 'c.json') }));

describe.skipIf(!kvm.available)(`monitor on real KVM${kvm.available ? '' : ` (SKIPPED: ${kvm.reason})`}`, () => {
  it.each([0, 3] as const)('CPL%i: an exec hook in a loop fires once per iteration, whatever mechanism the host allows', async (ring) => {
    const vm = await machine('mov ecx, 50\n l: add eax, 1\n dec ecx\n jnz l', ring);
    const mon = new Monitor(vm, { calibration: await hostTable() });
    let hits = 0;
    // 0x1000: mov ecx, 50 (5 bytes) → the loop body starts at 0x1005.
    const h = mon.observe({ event: 'exec', address: 0x1005 }, () => { hits++; });
    const stop = await vm.run({ timeout: 10_000 });
    expect(stop.reason).toBe('debug-exit');
    process.stderr.write(`[tsvm] exec hook at CPL${ring}: ${h.mechanism}\n`);
    expect(hits).toBe(50);
    // The pick follows this run's own calibration: the cheapest breakpoint that works at this CPL.
    const table = await hostTable();
    const working = (['sw-breakpoint', 'hw-breakpoint', 'probe-breakpoint'] as const)
      .filter((id) => resultOf(table, id, ring).works && (id !== 'hw-breakpoint' || resultOf(table, 'single-step', ring).works))
      .sort((a, b) => (priceOf(table, a, ring) ?? Infinity) - (priceOf(table, b, ring) ?? Infinity));
    expect(h.mechanism).toBe(working[0]);
    if (vm.capabilities.flavour === 'pvm') {
      // HOST-FACTS: no guest-debug breakpoint works at CPL3 on PVM, and int3 never does.
      expect(h.mechanism).not.toBe('sw-breakpoint');
      if (ring === 3) expect(h.mechanism).toBe('probe-breakpoint');
    }
    await vm.close();
  });

  // Only the probe works: the other breakpoint mechanisms are marked broken, so CPL0 uses it too.
  const probeOnly = () => {
    const t = assumedTable(hostIdentity(kvm.available ? 'pvm' : 'unknown'));
    const off = { works: false as const, failure: 'forced' };
    return { ...t, results: { ...t.results, 'sw-breakpoint': { cpl0: off, cpl3: off }, 'hw-breakpoint': { cpl0: off, cpl3: off } } };
  };
  it.each([[3, true], [3, false], [0, true], [0, false]] as const)('CPL%i probe, outOfLine %s: every iteration is seen and the guest computes the same', async (ring, outOfLine) => {
    // 0x1000: xor eax, eax (2)  mov ecx, 50 (5)  0x1007: l: add eax, 3 (3)  dec ecx  jnz l — then al goes out.
    const vm = await machine('xor eax, eax\n mov ecx, 50\n l: add eax, 3\n dec ecx\n jnz l', ring);
    const mon = new Monitor(vm, { outOfLine, calibration: probeOnly() });
    let hits = 0;
    const h = mon.observe({ event: 'exec', address: 0x1007, cpl: ring }, () => { hits++; });
    expect(h.mechanism).toBe('probe-breakpoint');
    const stop = await vm.run({ timeout: 10_000 });
    expect(stop.reason).toBe('debug-exit');
    if (stop.reason === 'debug-exit') expect(stop.code).toBe(150);
    expect(hits).toBe(50);
    // One exit per hit out of line, two in place (the successor trap), plus the final out.
    const io = vm.stats().byKind.io.count;
    expect(io).toBe(outOfLine ? 51 : 101);
    await vm.close();
  });

  it.each([
    ['add eax, 3', 1], ['mov dword ptr [rdi], eax', 2], ['out dx, al', 3],
  ] as const)('the plan\'s exitsPerHit is what a probe hit on `%s` really costs in exits', async (body, expected) => {
    // 0x1000: mov dx, 0x3f8 (4)  mov rdi, 0x200000 (7)  mov ecx, 40 (5)  0x1010: l: body, nop, nop, dec ecx, jnz l
    const vm = await machine(`mov dx, 0x3f8\n mov rdi, 0x200000\n mov ecx, 40\n l: ${body}\n nop\n nop\n dec ecx\n jnz l`, 3);
    vm.io.register({ port: 0x3f8, size: 1 }, { name: 'sink', write: () => {} });
    const mon = new Monitor(vm, { calibration: probeOnly() });
    let hits = 0;
    mon.observe({ event: 'exec', address: 0x1010, cpl: 3 }, () => { hits++; });
    const plan = mon.plan()[0];
    expect(plan?.exitsPerHit).toBe(expected);
    const stop = await vm.run({ timeout: 10_000 });
    expect(stop.reason).toBe('debug-exit');
    expect(hits).toBe(40);
    // Probe exits = all PIO exits minus the guest's own (its `out`s to the sink, and the final one).
    const own = (body.startsWith('out') ? 40 : 0) + 1;
    expect(vm.stats().byKind.io.count - own).toBe(40 * expected);
    await vm.close();
  });

  it.each(['host', 'probe'] as const)('a fork with a CPL3 exec hook (%s mechanism) keeps seeing every hit across resets (the reset puts traps, slots and guest debug back)', async (which) => {
    const base = await machine('xor eax, eax\n mov ecx, 50\n l: add eax, 3\n dec ecx\n jnz l', 3);
    const snap = await base.snapshot();
    await base.close();
    const child = await Machine.fork(snap, { setup: (m) => { m.io.register({ port: END, size: 1 }, { name: 'end', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) }); } });
    try {
      const mon = new Monitor(child, which === 'probe' ? { calibration: probeOnly() } : {});
      let hits = 0;
      const h = mon.observe({ event: 'exec', address: 0x1007, cpl: 3 }, () => { hits++; });
      process.stderr.write(`[tsvm] exec across resets at CPL3 (${which}): ${h.mechanism}\n`);
      for (let round = 1; round <= 3; round++) {
        const stop = await child.run({ timeout: 10_000 });
        expect(stop.reason).toBe('debug-exit');
        if (stop.reason === 'debug-exit') expect(stop.code).toBe(150);
        expect(hits).toBe(50 * round);
        const r = child.reset();
        // The trap page (and the trampoline's) were written by the host: the reset re-copies them.
        expect(r.pagesCopied).toBeGreaterThan(0);
      }
    } finally {
      await child.close();
      snap.close();
    }
  });

  it('a snapshot of a monitored machine holds the guest\'s code, not the probe traps: forks run with or without a monitor', async () => {
    const vm = await machine('xor eax, eax\n mov ecx, 50\n l: add eax, 3\n dec ecx\n jnz l', 3);
    const mon = new Monitor(vm, { calibration: probeOnly() });
    let hits = 0;
    mon.observe({ event: 'exec', address: 0x1007, cpl: 3 }, () => { hits++; });
    expect(Array.from(vm.memory.read(0x1007, 2))).toEqual([0xe6, PROBE_PORT]); // armed in guest RAM
    const snap = await vm.snapshot();
    expect(Array.from(vm.memory.read(0x1007, 2))).toEqual([0xe6, PROBE_PORT]); // and armed again after the capture
    const end = (m: Machine): void => { m.io.register({ port: END, size: 1 }, { name: 'end', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) }); };
    try {
      // The original still works after the capture.
      const s0 = await vm.run({ timeout: 10_000 });
      expect(s0.reason === 'debug-exit' && s0.code).toBe(150);
      expect(hits).toBe(50);
      // A fork without a monitor runs the guest's own code.
      const bare = await Machine.fork(snap, { setup: end });
      try {
        expect(Array.from(bare.memory.read(0x1007, 3))).toEqual([0x83, 0xc0, 0x03]);
        const s1 = await bare.run({ timeout: 10_000 });
        expect(s1.reason === 'debug-exit' && s1.code).toBe(150);
      } finally { await bare.close(); }
      // A fork with a new monitor behaves like the original.
      const watched = await Machine.fork(snap, { setup: end });
      try {
        const mon2 = new Monitor(watched, { calibration: probeOnly() });
        let hits2 = 0;
        mon2.observe({ event: 'exec', address: 0x1007, cpl: 3 }, () => { hits2++; });
        const s2 = await watched.run({ timeout: 10_000 });
        expect(s2.reason === 'debug-exit' && s2.code).toBe(150);
        expect(hits2).toBe(50);
      } finally { await watched.close(); }
    } finally {
      snap.close();
      await vm.close();
    }
  });

  it('a forbidden port stops the guest with a violation naming the port and the instruction', async () => {
    const vm = await machine('mov dx, 0x3f8\n mov al, 0x41\n out dx, al\n mov dx, 0x70\n out dx, al', 3);
    vm.io.register({ port: 0x3f8, size: 8 }, { name: 'uart', write: () => {} });
    vm.io.register({ port: 0x70, size: 2 }, { name: 'rtc', write: () => {} });
    const lines: string[] = [];
    const mon = new Monitor(vm, { audit: lines });
    mon.mediate({ event: 'pio', ports: [0x3f8, 0x3ff] }, () => allow());
    mon.mediate({ event: 'pio', ports: [0x70, 0x71] }, () => deny({ reason: 'CMOS is off limits' }));
    mon.seal();
    const stop = await vm.run({ timeout: 5000 });
    expect(stop.reason).toBe('violation');
    if (stop.reason === 'violation') expect(stop.violation.message).toMatch(/CMOS is off limits.*out dx,al/);
    expect(lines).toHaveLength(2);
    await vm.close();
  });

  it('write-watch mediate on a code-adjacent page sees the guest write with its value', async () => {
    const vm = await machine('mov rax, 0x100000\n mov dword ptr [rax+8], 0xabcd', 3);
    const mon = new Monitor(vm);
    const seen: bigint[] = [];
    mon.mediate({ event: 'write-watch', range: [0x100000, 0x100fff] }, (ev) => { if (ev.event === 'write-watch' && ev.value !== undefined) seen.push(ev.value); return allow(); });
    expect((await vm.run({ timeout: 5000 })).reason).toBe('debug-exit');
    expect(seen).toEqual([0xabcdn]);
    expect(vm.memory.readUint(0x100008, 4)).toBe(0xabcd);
    await vm.close();
  });

  // How long calibrate() takes is a benchmark figure (`pnpm bench:cost` prints it), not a unit-test assertion.
  it('calibrate({ quick }) covers every mechanism at both CPLs and agrees with HOST-FACTS on what works (PVM)', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'tsvm-cal-'));
    const t0 = performance.now();
    const table = await calibrate({ quick: true, cachePath: join(dir, 'c.json'), force: true });
    const secs = (performance.now() - t0) / 1000;
    process.stderr.write(`[tsvm] calibrate({quick}) took ${secs.toFixed(1)} s\n${JSON.stringify(table.results, null, 1)}\n`);
    for (const m of MECHANISMS) expect(table.results[m]).toBeDefined();
    if (table.host.flavour === 'pvm') {
      const facts = assumedTable(hostIdentity('pvm'));
      for (const m of ['pio-exit', 'mmio-exit', 'coalesced-pio', 'ro-slot-write', 'msr-exit', 'single-step', 'sw-breakpoint', 'hw-breakpoint', 'probe-breakpoint'] as const) {
        for (const cpl of [0, 3] as const) expect(`${m}@${cpl}:${resultOf(table, m, cpl).works}`).toBe(`${m}@${cpl}:${resultOf(facts, m, cpl).works}`);
      }
    }
    // The cached table is reused.
    const again = await calibrate({ quick: true, cachePath: join(dir, 'c.json') });
    expect(again.createdAt).toBe(table.createdAt);
    rmSync(dir, { recursive: true, force: true });
  }, 300_000);

  it('predicted vs measured: a PIO-heavy guest with a mediate hook, rendered as an SVG', async () => {
    const vm = await machine('mov ecx, 2000\n mov dx, 0x3f8\n l: out dx, al\n dec ecx\n jnz l', 3);
    vm.io.register({ port: 0x3f8, size: 8 }, { name: 'uart', write: () => {} });
    const mon = new Monitor(vm);
    mon.mediate({ event: 'pio', ports: [0x3f8, 0x3f8] }, () => allow(), { name: 'uart-gate' });
    const prediction = predict(mon.plan(), { 'uart-gate': 2000 }, mon.calibration);
    const r = report(mon, { run: await vm.run({ timeout: 10_000 }) });
    process.stderr.write(`${renderTable(r)}\n`);
    writeFileSync(join(tmpDir('tsvm-svg-'), 'cost.svg'), renderSvg(r, prediction));
    expect(r.hooks[0]?.events).toBe(2000);
    await vm.close();
  });
});
