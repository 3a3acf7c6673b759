import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { Machine } from '../machine.js';
import { asm } from '../asm.js';
import { kvmAvailability } from '../testing/kvm-gate.js';
import { kvmBackend } from '../backend/kvm.js';
import { attachReplayDevices, replayGuestSource } from '../testing/replay-guest.js';
import { tappable, record, replay, parseLog, encodeLog, rdtscTrapped, snapshotDigest, ReplayDivergence } from './index.js';
import { Snapshot } from '../snapshot/snapshot.js';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const kvm = kvmAvailability();
const MiB = 1024 * 1024;

// The shared test guest (20 rounds of a random port read and a DMA'd random block, folded into memory).
const PROGRAM = replayGuestSource(20);
const devices = attachReplayDevices;

const hash = (vm: Machine): string => createHash('sha256').update(vm.memory.read(0, vm.memory.totalSize)).digest('hex');

async function recordOnce(): Promise<{ rec: Awaited<ReturnType<typeof record>>; regs: unknown; hash: string }> {
  const vm = await Machine.create({ memory: 2 * MiB, name: 'rec', backend: tappable(kvmBackend()) });
  devices(vm);
  vm.loadFlat(await asm(PROGRAM, { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 3 });
  const rec = await record(vm, { timeout: 10_000 });
  const out = { rec, regs: vm.vcpu(0).getRegs(), hash: hash(vm) };
  await vm.close();
  return out;
}

describe.skipIf(!kvm.available)(`record / replay on KVM${kvm.available ? '' : ` (SKIPPED: ${kvm.reason})`}`, () => {
  it('a snapshot\'s digest depends on its bytes only: the image in memory (read where its memfd holds data) and loaded from a file (read whole) agree; one byte in a zero page changes it', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'tsvm-digest-'));
    try {
      await using vm = await Machine.create({ memory: 2 * 1024 * 1024 });
      vm.loadFlat(await asm('hlt', { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 3 });
      vm.memory.write(0x80000, Uint8Array.of(0));
      using a = await vm.snapshot();
      const file = join(dir, 'a.tsvm');
      a.save(file);
      using loaded = Snapshot.load(file, kvmBackend());
      expect(snapshotDigest(loaded)).toBe(snapshotDigest(a));
      vm.memory.write(0x90000, Uint8Array.of(1));
      using b = await vm.snapshot();
      expect(snapshotDigest(b)).not.toBe(snapshotDigest(a));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('a ring-3 guest fed random device values and DMA replays without its devices: same registers, same memory', async () => {
    const a = await recordOnce();
    const b = await recordOnce();
    expect(a.rec.stop).toMatchObject({ reason: 'debug-exit', code: 7 });
    expect(a.rec.log.exits).toHaveLength(41); // 20 × (in + out) + the debug-exit
    expect(a.rec.log.dma).toHaveLength(20);
    expect(a.hash).not.toBe(b.hash); // the inputs really differ per run
    const r = await replay(a.rec);
    try {
      expect(r.divergence).toBeUndefined();
      expect(r.exits).toBe(41);
      expect(r.machine.vcpu(0).getRegs()).toEqual(a.regs);
      expect(hash(r.machine)).toBe(a.hash);
    } finally {
      await r.machine.close();
    }
    // The same through the JSON log format.
    const again = await replay({ snapshot: a.rec.snapshot, log: parseLog(JSON.parse(JSON.stringify(encodeLog(a.rec.log)))) });
    expect(again.divergence).toBeUndefined();
    expect(hash(again.machine)).toBe(a.hash);
    await again.machine.close();
    a.rec.snapshot.close();
    b.rec.snapshot.close();
  });

  it('a tampered read changes what the guest does: the divergence names the exit number and instruction', async () => {
    const { rec } = await recordOnce();
    const log = structuredClone(rec.log);
    // Round i makes exits 2i+1 (`in`) and 2i+2 (`out`, AL = the value read): exit 8 is
    // round 3's `out`, whose byte the replay checks at the exit itself.
    const e = log.exits[7];
    if (!e?.wrote) throw new Error('exit 8 should be the out to 0x64');
    (e as { wrote: Uint8Array }).wrote = Uint8Array.of((e.wrote[0] as number) ^ 1);
    const r = await replay({ snapshot: rec.snapshot, log });
    expect(r.divergence).toBeInstanceOf(ReplayDivergence);
    expect(r.divergence).toMatchObject({ exit: 8, field: 'wrote' });
    expect(r.divergence?.rip).toBeGreaterThan(0x1000n);
    await r.machine.close();
    // A tampered read value (exit 7's `in`): the guest writes what it read at the next exit.
    const log2 = structuredClone(rec.log);
    (log2.exits[6] as { read?: Uint8Array }).read = Uint8Array.of(1, 2, 3, 4);
    const r2 = await replay({ snapshot: rec.snapshot, log: log2 });
    expect(r2.divergence).toMatchObject({ exit: 8, field: 'wrote', expected: `[${Buffer.from(rec.log.exits[7]?.wrote ?? []).toString('hex')}]`, got: '[01]' });
    await r2.machine.close();
    rec.snapshot.close();
  });

  it('rdtsc at CPL3: CR4.TSD makes it fault where the host honours it (learned by a probe, not by flavour); where not (PVM) the replay reports the divergence', async () => {
    await using vm = await Machine.create({ memory: 2 * MiB, backend: tappable(kvmBackend()) });
    vm.attach({ port: 0xf4, size: 4 }, { name: 'exit', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) });
    // EAX (the TSC's low 32 bits) goes out at the first exit: a new TSC value shows there. (Not
    // AL alone: one replay in 256 read a TSC with the same low byte, and diverged only at the stop.)
    vm.loadFlat(await asm('rdtsc\n mov dx, 0xf4\n out dx, eax', { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long', ring: 3 });
    const rec = await record(vm, { timeout: 10_000 });
    // The probe and this guest agree: a trapped rdtsc faults, an untrapped one runs on.
    expect(rec.rdtscTrapped).toBe(rec.stop.reason === 'exception');
    expect(await rdtscTrapped(vm.backend)).toBe(rec.rdtscTrapped);
    if (vm.capabilities.flavour === 'pvm') expect(rec.rdtscTrapped).toBe(false); // measured: PVM runs CPL3 natively, ignores CR4.TSD
    if (!rec.rdtscTrapped) {
      // rdtsc read the host's TSC: the replay's differs and shows at the first exit.
      expect(rec.stop.reason).toBe('debug-exit');
      const r = await replay(rec);
      expect(r.divergence).toMatchObject({ exit: 1, field: 'wrote' });
      await r.machine.close();
    } else {
      expect(rec.stop).toMatchObject({ reason: 'exception', vector: 13, faultRip: 0x1000n });
      const r = await replay(rec);
      expect(r.divergence).toBeUndefined();
      await r.machine.close();
    }
    rec.snapshot.close();
  });
});
