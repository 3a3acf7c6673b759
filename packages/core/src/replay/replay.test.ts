import { describe, expect, it } from 'vitest';
import { Machine } from '../machine.js';
import { MockBackend, inExit, outExit, type MockVcpu, type MockVm } from '../testing/mock.js';
import { DeviceMemory } from '../dma.js';
import { SnapshotFormatError, StateError } from '../errors.js';
import { PROBE_PORT } from '../reserved.js';
import type { Device } from '../device.js';
import type { VcpuExit } from '../exits.js';
import { tappable, record, replay, parseLog, encodeLog, rdtscTrapped, ReplayDivergence, type Recording } from './index.js';

const script = (): VcpuExit[] => [
  inExit(0x60), { kind: 'intr' }, outExit(0x64, 1), inExit(0x60, 2), outExit(0xf4, 7),
];

/** A machine whose devices answer differently on every run: a random port, a DMA + IRQ port, a debug-exit. */
async function recorded(seed = 0): Promise<{ rec: Recording & { stop: { reason: string } }; backend: MockBackend; reads: number[] }> {
  const backend = new MockBackend();
  const vm = await Machine.create({ memory: 64 * 1024, backend: tappable(backend), irqchip: true });
  (backend.vms[0]?.vcpus[0] as MockVcpu).script(...script());
  vm.memory.write(0x2000n, Uint8Array.of(seed));
  const reads: number[] = [];
  const dma = new DeviceMemory(vm.memory, 'dma');
  const irq = vm.irqLine(5);
  const random: Device = { name: 'random', read: (_o, size) => { const v = Math.floor(Math.random() * 2 ** (8 * size)); reads.push(v); return v; } };
  const dmaDev: Device = { name: 'dma', write: () => { dma.write(0x3000n, Uint8Array.from([Math.random() * 256, 1, 2, 3])); irq.pulse(); } };
  const exit: Device = { name: 'exit', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) };
  vm.attach({ port: 0x60, size: 2 }, random);
  vm.attach({ port: 0x64, size: 1 }, dmaDev);
  vm.attach({ port: 0xf4, size: 1 }, exit);
  const rec = await record(vm);
  await vm.close();
  return { rec, backend, reads };
}

describe('record / replay (mock backend)', () => {
  it('records reads, DMA and interrupts by exit number, not the slice-timer exit', async () => {
    const { rec, reads } = await recorded();
    expect(rec.stop).toMatchObject({ reason: 'debug-exit', code: 7 });
    const { log } = rec;
    expect(log.exits.map((e) => e.kind)).toEqual(['io', 'io', 'io', 'io']);
    expect(log.exits[0]?.read).toEqual(Uint8Array.of((reads[0] as number) & 0xff));
    expect(log.exits[2]?.read?.length).toBe(2);
    expect(log.dma).toHaveLength(1);
    expect(log.dma[0]).toMatchObject({ after: 2, device: 'dma', address: 0x3000n });
    // The pulse raised during exit 2 reached the irqchip at the boundary after it, in order.
    expect(log.irqs).toEqual([{ after: 2, irq: 5, level: true }, { after: 2, irq: 5, level: false }]);
    expect(log.stops).toEqual([expect.objectContaining({ after: 4, reason: 'debug-exit', code: 7 })]);
    rec.snapshot.close();
  });

  it('replays without devices: the guest gets the recorded bytes, DMA and interrupts', async () => {
    const { rec, backend } = await recorded();
    const v = backend.script(...script());
    const r = await replay(rec, { backend });
    expect(r.divergence).toBeUndefined();
    expect(r.exits).toBe(4);
    expect(v.reads).toEqual([rec.log.exits[0]?.read, rec.log.exits[2]?.read]);
    expect(r.machine.memory.read(0x3000n, 4)).toEqual(rec.log.dma[0]?.data);
    expect((backend.vms.at(-1) as MockVm).irqs).toEqual([{ irq: 5, level: true }, { irq: 5, level: false }]);
    await r.machine.close();
    rec.snapshot.close();
  });

  it("under a heavier monitor: its probe exits are not counted and its hooks see every exit", async () => {
    const { rec, backend } = await recorded();
    const s = script();
    s.splice(1, 0, outExit(PROBE_PORT, 0), outExit(PROBE_PORT, 0));
    backend.script(...s);
    const seen: string[] = [];
    const r = await replay(rec, {
      backend,
      monitor: (m) => {
        m.addHook({ name: 'probe', mode: 'mediate', matches: (e) => e.kind === 'io' && e.port === PROBE_PORT, handle: () => ({ verdict: 'emulate', value: 0 }) });
        m.addHook({ name: 'all', mode: 'observe', matches: () => true, handle: (e) => { seen.push(e.kind); } });
      },
    });
    expect(r.divergence).toBeUndefined();
    expect(r.exits).toBe(4);
    // 2 probes + 3 guest exits; the recorded stop at exit 4 ends the run before observers run.
    expect(seen.filter((k) => k === 'io')).toHaveLength(5);
    await r.machine.close();
    rec.snapshot.close();
  });

  it('a tampered log is a divergence naming the exit, the field, and both values', async () => {
    const { rec, backend } = await recorded();
    backend.script(...script());
    const json = encodeLog(rec.log) as { exits: Array<Record<string, unknown>> };
    (json.exits[1] as Record<string, unknown>).wrote = '02';
    const r = await replay({ snapshot: rec.snapshot, log: parseLog(json) }, { backend });
    expect(r.divergence).toBeInstanceOf(ReplayDivergence);
    expect(r.divergence).toMatchObject({ exit: 2, field: 'wrote', expected: '[02]', got: '[01]' });
    expect(r.divergence?.message).toMatch(/exit 2 \(rip 0x[0-9a-f]+\): wrote/);
    await r.machine.close();
    // A guest that ends differently.
    backend.script(...script().slice(0, 4), outExit(0xf4, 8));
    const r2 = await replay(rec, { backend });
    expect(r2.divergence).toMatchObject({ exit: 4, field: 'wrote' });
    await r2.machine.close();
    rec.snapshot.close();
  });

  it('a monitor that denies what the recording allowed is a divergence at that stop', async () => {
    const { rec, backend } = await recorded();
    backend.script(...script());
    const r = await replay(rec, {
      backend,
      monitor: (m) => { m.addHook({ name: 'strict', mode: 'mediate', matches: (e) => e.kind === 'io' && e.port === 0x64, handle: () => ({ verdict: 'deny' }) }); },
    });
    expect(r.divergence).toMatchObject({ exit: 2, field: 'stop' });
    expect(r.divergence?.got).toMatch(/violation.*strict/);
    await r.machine.close();
    rec.snapshot.close();
  });

  it('the log format round-trips and a hostile log is a SnapshotFormatError naming the field', async () => {
    const { rec } = await recorded();
    const json = JSON.parse(JSON.stringify(encodeLog(rec.log))) as Record<string, unknown>;
    expect(parseLog(json)).toEqual(rec.log);
    const bad = (patch: (j: Record<string, any>) => void): unknown => { const j = structuredClone(json) as Record<string, any>; patch(j); return j; };
    const cases: Array<[(j: Record<string, any>) => void, RegExp]> = [
      [(j) => { j.version = 1; }, /version: 1; this build reads version 2/],
      [(j) => { j.format = 'x'; }, /format/],
      [(j) => { j.exits[0].read = 'zz'; }, /exits\[0\]\.read: must be lower-case hex/],
      [(j) => { j.exits[0].read = 'abcd'; }, /exits\[0\]\.read: must hold 1 bytes/],
      [(j) => { j.exits[1].kind = 'intr'; }, /exits\[1\]\.kind/],
      [(j) => { j.exits[1].at = '0x10000'; }, /exits\[1\]\.at: a port is at most/],
      [(j) => { delete j.exits[1].wrote; }, /exits\[1\]\.wrote: a write must carry/],
      [(j) => { j.exits[0].evil = 1; }, /exits\[0\]\.evil: unknown field/],
      [(j) => { j.dma[0].after = 99; }, /dma\[0\]\.after: 99 is past the log's 4 exits/],
      [(j) => { j.irqs[0].irq = 40; }, /irqs\[0\]\.irq/],
      [(j) => { j.stops[0].regs.rip = 5; }, /stops\[0\]\.regs\.rip/],
      [(j) => { j.stops = []; }, /stops: a log records at least one run/],
      [(j) => { j.base = 'x'; }, /base/],
    ];
    for (const [patch, re] of cases) {
      expect(() => parseLog(bad(patch))).toThrow(SnapshotFormatError);
      expect(() => parseLog(bad(patch))).toThrow(re);
    }
    expect(() => parseLog('[]')).toThrow(SnapshotFormatError);
    // A log from another snapshot is refused before anything runs.
    const other = await recorded(1);
    await expect(replay({ snapshot: other.rec.snapshot, log: rec.log }, { backend: other.backend })).rejects.toThrow(/replay log: base: recorded from snapshot/);
    other.rec.snapshot.close();
    rec.snapshot.close();
  });

  it('the CR4.TSD probe runs once per backend, not once per tappable wrapper of it', async () => {
    const backend = new MockBackend();
    const made = backend.vms.length;
    const first = rdtscTrapped(tappable(backend));
    expect(rdtscTrapped(tappable(backend))).toBe(first);
    expect(rdtscTrapped(backend)).toBe(first);
    await first;
    expect(backend.vms.length).toBe(made + 1); // one probe machine, made on the backend itself
  });

  it('a machine not created on a tappable backend cannot be recorded, and says how', async () => {
    await using vm = await Machine.create({ memory: 4096, backend: new MockBackend() });
    await expect(record(vm)).rejects.toThrow(StateError);
    await expect(record(vm)).rejects.toThrow(/tappable/);
  });
});
