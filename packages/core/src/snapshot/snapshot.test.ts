import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { Machine } from '../machine.js';
import { MockBackend, MockVcpu, type MockVm } from '../testing/mock.js';
import { InvalidArgumentError, SnapshotFormatError, StateError } from '../errors.js';
import type { Device } from '../device.js';
import { Snapshot } from './snapshot.js';
import { encodeManifest, parseManifest } from './manifest.js';
import { DIRTY_RING_BYTES } from './dirty-tracking.js';
import type { BackendVmOptions } from '../backend.js';

const dir = mkdtempSync(join(tmpdir(), 'tsvm-snap-unit-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function counter(name = 'ctr'): Device & { n: number } {
  const d = {
    name, n: 0,
    write: () => { d.n++; },
    snapshot: () => ({ version: 1, n: d.n }),
    restore: (s: unknown) => {
      const o = s as { version?: unknown; n?: unknown };
      if (o?.version !== 1 || typeof o.n !== 'number') throw new SnapshotFormatError(`${name}: field 'n' must be a number`);
      d.n = o.n;
    },
  };
  return d;
}

async function source(backend = new MockBackend()): Promise<{ vm: Machine; dev: ReturnType<typeof counter> }> {
  const vm = await Machine.create({ memory: [{ start: 0, size: 64 * 1024 }, { start: 0x100000, size: 16 * 4096, name: 'hi' }], backend });
  const dev = counter();
  vm.attach({ port: 0x80, size: 1 }, dev);
  dev.n = 5;
  vm.memory.write(0x2000, Uint8Array.of(1, 2, 3));
  vm.memory.write(0x100000 + 3 * 4096, Uint8Array.of(9));
  vm.vcpu(0).setRegs({ rax: 0x1122n, rip: 0x4000n });
  const mv = backend.vms.at(-1) as MockVm;
  mv.state = { clock: Uint8Array.of(7, 7) };
  (mv.vcpus[0] as MockVcpu).state = { fpu: Uint8Array.of(1, 2, 3, 4) };
  return { vm, dev };
}

/** Writes a snapshot file around arbitrary manifest bytes, with a valid checksum. */
function writeRaw(path: string, json: Buffer, image: Uint8Array): void {
  const header = Buffer.alloc(48);
  header.write('TSVMSNP\0', 0, 'latin1');
  header.writeUInt32LE(1, 8);
  header.writeUInt32LE(json.length, 12);
  createHash('sha256').update(json).digest().copy(header, 16);
  const at = Math.ceil((48 + json.length) / 4096) * 4096;
  const out = Buffer.alloc(at + image.length);
  header.copy(out, 0);
  json.copy(out, 48);
  out.set(image, at);
  writeFileSync(path, out);
}

describe('snapshot (mock backend)', () => {
  it('round-trips registers, opaque blobs, VM state, devices by name and sparse memory', async () => {
    const backend = new MockBackend();
    const { vm } = await source(backend);
    using snap = await vm.snapshot();
    expect(snap.storedBytes).toBe(2 * 4096);
    vm.memory.write(0x2000, Uint8Array.of(0xff)); // later writes never reach the snapshot
    const dev = counter();
    await using b = await Machine.restore(snap, { backend, devices: [{ range: { port: 0x80, size: 1 }, device: dev }] });
    expect(b.memory.read(0x2000, 3)).toEqual(Uint8Array.of(1, 2, 3));
    expect(b.memory.readUint(0x100000 + 3 * 4096, 1)).toBe(9);
    expect(b.vcpu(0).getRegs()).toMatchObject({ rax: 0x1122n, rip: 0x4000n });
    expect(dev.n).toBe(5);
    const mv = backend.vms.at(-1) as MockVm;
    expect(mv.state).toEqual({ clock: Uint8Array.of(7, 7) });
    expect((mv.vcpus[0] as MockVcpu).state).toEqual({ fpu: Uint8Array.of(1, 2, 3, 4) });
    await vm.close();
  });

  it('saves and loads a file; the manifest it writes is what it reads', async () => {
    const backend = new MockBackend();
    const { vm } = await source(backend);
    using snap = await vm.snapshot(join(dir, 'a.tsvm'));
    using again = Snapshot.load(join(dir, 'a.tsvm'), backend);
    expect(encodeManifest(again.manifest)).toEqual(encodeManifest(snap.manifest));
    await vm.close();
  });

  it.each([
    ['another version', (m: Record<string, unknown>) => { m['version'] = 2; }, /version.*2/],
    ['another format', (m: Record<string, unknown>) => { m['format'] = 'qemu'; }, /format/],
    ['another tsvm version', (m: Record<string, unknown>) => { m['tsvm'] = '0.0.1'; }, /tsvm.*0\.0\.1/],
    ['a region outside the image', (m: any) => { m.memory[1].offset = 1 << 20; }, /memory\[1\]\.offset/],
    ['a system area outside RAM', (m: any) => { m.machine.systemArea = 0x200000; }, /machine\.systemArea/],
    ['overlapping regions', (m: any) => { m.memory[1].start = '0x1000'; }, /overlap/],
    ['a malformed register', (m: any) => { m.vcpus[0].regs.rip = 12; }, /vcpus\[0\]\.regs\.rip/],
    ['a segment field out of range', (m: any) => { m.vcpus[0].sregs.cs.dpl = 4; }, /vcpus\[0\]\.sregs\.cs\.dpl/],
    ['a missing field', (m: any) => { delete m.vcpus[0].sregs.gdt; }, /vcpus\[0\]\.sregs\.gdt/],
    ['a bad blob', (m: any) => { m.vm.clock = '*'; }, /vm\.clock/],
  ])('parseManifest rejects %s with a SnapshotFormatError naming the field', async (_what, mutate, re) => {
    const { vm } = await source();
    using snap = await vm.snapshot();
    const json = JSON.parse(JSON.stringify(encodeManifest(snap.manifest)));
    mutate(json);
    expect(() => parseManifest(json)).toThrow(SnapshotFormatError);
    expect(() => parseManifest(json)).toThrow(re);
    await vm.close();
  });

  it('refuses another flavour or CPU, and a device state of the wrong shape, leaving nothing open', async () => {
    const backend = new MockBackend();
    const { vm } = await source(backend);
    using snap = await vm.snapshot();
    await expect(Machine.restore(snap, { backend: new MockBackend({ flavour: 'pvm' }) })).rejects.toThrow(/host\.flavour/);
    const other = new MockBackend();
    other.nextVcpu = new MockVcpu(0);
    other.nextVcpu.setCpuid([{ function: 0, index: 0, flags: 0, eax: 1, ebx: 0x756e6547, ecx: 0x6c65746e, edx: 0x49656e69 }, { function: 1, index: 0, flags: 0, eax: 0x906ea, ebx: 0, ecx: 0, edx: 0 }]);
    await expect(Machine.restore(snap, { backend: other, devices: [{ range: { port: 0x80, size: 1 }, device: counter() }] })).rejects.toThrow(/host\.cpu/);
    const bad = counter();
    bad.restore = () => { throw new SnapshotFormatError("ctr: field 'n' must be a number"); };
    const third = new MockBackend();
    await expect(Machine.restore(snap, { backend: third, devices: [{ range: { port: 0x80, size: 1 }, device: bad }] })).rejects.toThrow(/devices\.ctr.*field 'n'/);
    for (const b of [other, third]) for (const v of b.vms) expect(v.openMemory).toBe(0);
    expect(other.vms.every((v) => v.closed)).toBe(true);
    await vm.close();
  });

  it('reset needs a machine made from a snapshot, and copies back only pages the guest or the host changed', async () => {
    const backend = new MockBackend();
    const { vm } = await source(backend);
    expect(() => vm.reset()).toThrow(StateError);
    using snap = await vm.snapshot();
    await using b = await Machine.fork(snap, { backend, devices: [{ range: { port: 0x80, size: 1 }, device: counter() }] });
    b.vcpu(0).setRegs({ rax: 0n });
    // The mock's dirty log is always clean: registers alone copy no page back.
    expect(b.reset().pagesCopied).toBe(0);
    expect(b.vcpu(0).getRegs().rax).toBe(0x1122n);
    // A host write (a monitor's write-through, a probe trap) is tracked by GuestMemory itself.
    const before = b.memory.readUint(0x3000, 1);
    b.memory.writeUint(0x3000, 1, before ^ 0xff);
    expect(b.reset().pagesCopied).toBe(1);
    expect(b.memory.readUint(0x3000, 1)).toBe(before);
    expect(b.reset().pagesCopied).toBe(0); // the reset's own copies are not counted as changes
    await vm.close();
  });

  it('prewarm keeps VMs ready for forks, refills between them, and close releases the rest', async () => {
    const backend = new MockBackend();
    const { vm } = await source(backend);
    const snap = await vm.snapshot();
    const before = backend.vms.length;
    snap.prewarm(2, backend);
    expect(backend.vms.length).toBe(before + 2);
    const pooled = backend.vms.slice(before);
    // The pool registered the snapshot's RAM too (both regions, in slot order): the fork does not again.
    const first = pooled[0] as (typeof pooled)[number];
    expect([...first.slots.entries()]).toEqual([[0, { start: 0n, size: 64 * 1024, readonly: false }], [1, { start: 0x100000n, size: 16 * 4096, readonly: false }]]);
    let registered = 0;
    const map = first.mapMemory.bind(first);
    first.mapMemory = (...a) => { registered++; map(...a); };
    // Turns of the event loop: two machines are built ahead from the pool's two VMs (together they make the 2).
    const settle = async (): Promise<void> => { for (let i = 0; i < 8; i++) await new Promise((r) => setImmediate(r)); };
    await settle();
    expect(registered).toBe(0); // built from the premapped VM: no memslot registered again
    const settled = backend.vms.length;
    expect(settled).toBe(before + 2); // no VM made beyond the pool's
    const child = await Machine.fork(snap, { backend, name: 'child', devices: [{ range: { port: 0x80, size: 1 }, device: counter() }] });
    expect(backend.vms.length).toBe(settled); // the fork took a machine built ahead, made no VM
    expect(child.name).toBe('child');
    expect(child.vcpu(0).getRegs().rip).toBe(snap.manifest.vcpus[0]?.regs.rip);
    expect(child.memory.read(0x2000, 3)).toEqual(Uint8Array.of(1, 2, 3));
    child.memory.write(0x2000, Uint8Array.of(7)); // copy-on-write: the next fork still sees the snapshot
    const sibling = await Machine.fork(snap, { backend, devices: [{ range: { port: 0x80, size: 1 }, device: counter() }] });
    expect(sibling.memory.read(0x2000, 3)).toEqual(Uint8Array.of(1, 2, 3));
    expect(sibling.name).toMatch(/~\d+$/);
    await sibling.close();
    await settle();
    expect(backend.vms.length).toBe(settled + 2); // two taken: built ahead again from the pool, which refilled
    await child.close();
    const waiting = backend.vms.slice(before).filter((v) => !v.closed);
    expect(waiting.length).toBe(2); // the two built ahead again
    snap.close();
    expect(pooled.every((v) => v.closed)).toBe(true);
    expect(waiting.every((v) => v.closed)).toBe(true); // pooled VMs and machines built ahead alike
    expect(() => snap.prewarm(1, backend)).toThrow(StateError);
    await vm.close();
  });

  it('a machine that cannot be built ahead ends building ahead (no churn of VMs); forks then report the failure themselves', async () => {
    const backend = new MockBackend();
    const { vm } = await source(backend);
    const snap = await vm.snapshot();
    // Every VM made from here on refuses registers: state cannot be applied, ahead or at a fork.
    const make = backend.createVm.bind(backend);
    backend.createVm = () => {
      const v = make();
      const createVcpu = v.createVcpu.bind(v);
      v.createVcpu = (id) => { const c = createVcpu(id); c.setRegs = () => { throw new Error('refused'); }; return c; };
      return v;
    };
    const before = backend.vms.length;
    snap.prewarm(2, backend);
    for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r));
    const made = backend.vms.length - before;
    expect(made).toBeGreaterThanOrEqual(2);
    expect(made).toBeLessThanOrEqual(3); // the pool's two and one to make up for the failed build, not one per turn
    await expect(Machine.fork(snap, { backend })).rejects.toThrow(SnapshotFormatError);
    snap.close();
    expect(backend.vms.slice(before).every((v) => v.closed)).toBe(true);
    await vm.close();
  });

  it('prewarm picks dirty tracking: by price on hosts with rings, the log without them, forced on request; bad options are typed errors', async () => {
    const backend = new MockBackend();
    const { vm } = await source(backend);
    using snap = await vm.snapshot();
    const asked: Array<Record<string, unknown>> = [];
    const create = backend.createVm.bind(backend);
    backend.createVm = ((o: BackendVmOptions) => { asked.push({ ...o }); return create(); }) as typeof backend.createVm;
    expect(backend.capabilities.dirtyLogRing).toBe(false);
    snap.prewarm(1, backend);
    expect(snap.dirtyTracking).toBe('log'); // no rings here: nothing measured
    expect(asked.at(-1)).toEqual({ irqchip: false });
    snap.prewarm(1, backend, { dirtyTracking: 'ring' });
    expect(snap.dirtyTracking).toBe('ring');
    expect(asked.at(-1)).toEqual({ irqchip: false, dirtyRing: DIRTY_RING_BYTES });
    snap.prewarm(0);
    expect(() => snap.prewarm(1, backend, { dirtyTracking: 'bitmap' as never })).toThrow(InvalidArgumentError);
    expect(() => snap.prewarm(1, backend, null as never)).toThrow(InvalidArgumentError);
    await vm.close();
  });

  it('refuses to snapshot or reset a running machine', async () => {
    const backend = new MockBackend();
    backend.script((v) => { v.whenEmpty = { kind: 'intr' }; return { kind: 'intr' }; });
    const vm = await Machine.create({ memory: 64 * 1024, backend });
    const ac = new AbortController();
    const running = vm.run({ signal: ac.signal });
    await expect(vm.snapshot()).rejects.toThrow(StateError);
    ac.abort();
    await running;
    await vm.close();
  });

  it('fuzz: random corruption of a snapshot file is a SnapshotFormatError or a valid load, never a crash', async () => {
    const backend = new MockBackend();
    const { vm } = await source(backend);
    const path = join(dir, 'fuzz-src.tsvm');
    (await vm.snapshot(path)).close();
    await vm.close();
    const good = readFileSync(path);
    const target = join(dir, 'fuzz.tsvm');
    fc.assert(fc.property(
      fc.oneof(
        fc.record({ kind: fc.constant('flip' as const), at: fc.nat(good.length - 1), value: fc.integer({ min: 0, max: 255 }) }),
        fc.record({ kind: fc.constant('truncate' as const), at: fc.nat(good.length - 1), value: fc.constant(0) }),
      ),
      ({ kind, at, value }) => {
        const bytes = Buffer.from(good);
        if (kind === 'flip') bytes[at] = value;
        writeFileSync(target, kind === 'truncate' ? bytes.subarray(0, at) : bytes);
        try {
          Snapshot.load(target, backend).close();
        } catch (e) {
          if (!(e instanceof SnapshotFormatError)) throw e;
        }
      },
    ), { numRuns: 300 });
  });

  it('fuzz: a checksummed but hostile manifest is rejected by the schema or restores cleanly', async () => {
    const backend = new MockBackend();
    const { vm } = await source(backend);
    const snap = await vm.snapshot();
    await vm.close();
    const base = JSON.stringify(encodeManifest(snap.manifest));
    const image = new Uint8Array(snap.manifest.imageSize);
    snap.close();
    const target = join(dir, 'hostile.tsvm');
    await fc.assert(fc.asyncProperty(
      fc.nat(base.length - 1), fc.string({ maxLength: 12 }), fc.nat(8), fc.jsonValue({ maxDepth: 2 }), fc.boolean(),
      async (at, insert, cut, value, textual) => {
        let text: string;
        if (textual) {
          text = base.slice(0, at) + insert + base.slice(at + cut);
        } else {
          // Replace one value somewhere in the tree with an arbitrary JSON value.
          const tree = JSON.parse(base) as Record<string, unknown>;
          const paths: Array<[Record<string, unknown> | unknown[], string | number]> = [];
          const walk = (o: unknown): void => {
            if (o && typeof o === 'object') for (const k of Object.keys(o)) { paths.push([o as Record<string, unknown>, k]); walk((o as Record<string, unknown>)[k]); }
          };
          walk(tree);
          const [obj, key] = paths[at % paths.length]!;
          (obj as Record<string, unknown>)[key as string] = value;
          text = JSON.stringify(tree);
        }
        writeRaw(target, Buffer.from(text, 'utf8'), image);
        let loaded: Snapshot;
        try {
          loaded = Snapshot.load(target, backend);
        } catch (e) {
          if (!(e instanceof SnapshotFormatError)) throw e;
          return;
        }
        try {
          const m = await Machine.restore(loaded, { backend, devices: [{ range: { port: 0x80, size: 1 }, device: counter() }] });
          await m.close();
        } catch (e) {
          if (!(e instanceof SnapshotFormatError)) throw e;
        } finally {
          loaded.close();
        }
      },
    ), { numRuns: 300 });
    for (const v of backend.vms) expect(v.openMemory).toBe(0);
  });
});
