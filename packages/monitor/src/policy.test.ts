import { describe, expect, it } from 'vitest';
import { Machine } from '@tsvm/core';
import { MockBackend, inExit, outExit } from '@tsvm/core/testing';
import { Monitor } from './monitor.js';
import { applyPolicy, compilePolicy, type Policy } from './policy.js';
import { PolicyConflictError, PolicyError } from './errors.js';
import { AuditLog, verifyAuditLog } from './audit.js';

const policy: Policy = {
  version: 1, default: 'deny', rules: [
    { id: 'uart-out', event: 'pio', ports: [0x3f8, 0x3ff], direction: 'out', action: 'allow' },
    { id: 'kbd-in', event: 'pio', ports: [0x60, 0x60], direction: 'in', action: 'emulate', value: '0x1c' },
    { id: 'no-pit', event: 'pio', ports: [0x40, 0x43], action: 'deny', effect: 'ignore', reason: 'no timer for you' },
    { id: 'msr-aux', event: 'msr', indices: [0xc0000103], direction: 'read', action: 'emulate', value: 7 },
  ],
};

describe('policy as data', () => {
  it('round-trips through JSON and compiles into one hook per rule', async () => {
    const backend = new MockBackend();
    const vcpu = backend.script(outExit(0x3f8, 0x41), inExit(0x60), outExit(0x40, 1), inExit(0x42), outExit(0x3f8, 0x42), outExit(0x80, 1));
    const vm = await Machine.create({ memory: 1024 * 1024, backend });
    const out: number[] = [];
    vm.io.register({ port: 0x3f8, size: 8 }, { name: 'uart', write: (_o, v) => { out.push(v); } });
    vm.io.register({ port: 0x80, size: 1 }, { name: 'post', write: () => {} });
    const lines: string[] = [];
    const mon = new Monitor(vm, { audit: new AuditLog(lines) });
    const handles = applyPolicy(mon, JSON.stringify(policy));
    expect(handles.map((h) => h.name)).toEqual(['policy:uart-out', 'policy:kbd-in', 'policy:no-pit', 'policy:msr-aux', 'policy:default-pio', 'policy:default-mmio']);
    const stop = await vm.run();
    expect(out).toEqual([0x41, 0x42]);
    expect(vcpu.reads.map((r) => r[0])).toEqual([0x1c, 0xff]);
    // Port 0x80 has a device, but no rule allows it: default deny.
    expect(stop.reason).toBe('violation');
    if (stop.reason === 'violation') expect(stop.violation.message).toMatch(/policy default: no rule allows this pio access/);
    expect(verifyAuditLog(lines)).toMatchObject({ ok: true });
    const decisions = lines.map((l) => JSON.parse(l) as { hook: string; decision: string });
    expect(decisions.map((d) => `${d.hook}:${d.decision}`)).toEqual([
      'policy:uart-out:allow', 'policy:default-pio:allow', 'policy:kbd-in:emulate', 'policy:no-pit:deny', 'policy:no-pit:deny',
      'policy:uart-out:allow', 'policy:default-pio:allow', 'policy:default-pio:deny',
    ]);
  });

  it.each([
    [{ version: 2, rules: [] }, 'version', /must be 1/],
    [{ version: 1, rules: {} }, 'rules', /must be an array/],
    [{ version: 1, rules: [{ id: 'a', event: 'pio', ports: [0x3f8], action: 'allow' }] }, 'rules[0].ports', /pair/],
    [{ version: 1, rules: [{ id: 'a', event: 'pio', ports: [1, 2], action: 'allow' }, { id: 'b', event: 'pio', ports: [4, 'x'], action: 'allow' }] }, 'rules[1].ports[1]', /integer/],
    [{ version: 1, rules: [{ id: 'a', event: 'pio', ports: [9, 2], action: 'allow' }] }, 'rules[0].ports', /below first/],
    [{ version: 1, rules: [{ id: 'a', event: 'pio', ports: [1, 2], action: 'emulate' }] }, 'rules[0].value', /needs a value/],
    [{ version: 1, rules: [{ id: 'a', event: 'pio', ports: [1, 2], action: 'allow', value: 1 }] }, 'rules[0].value', /only 'emulate'/],
    [{ version: 1, rules: [{ id: 'a', event: 'pio', ports: [1, 2], action: 'deny', effect: 'explode' }] }, 'rules[0].effect', /stop, ignore or gp/],
    [{ version: 1, rules: [{ id: 'a', event: 'cpuid', action: 'allow' }] }, 'rules[0].event', /must be one of/],
    [{ version: 1, rules: [{ id: 'a', event: 'pio', ports: [1, 2], action: 'allow', range: [1, 2] }] }, 'rules[0].range', /unknown field/],
    [{ version: 1, rules: [{ id: 'a', event: 'pio', ports: [1, 2], action: 'allow' }, { id: 'a', event: 'halt', action: 'allow' }] }, 'rules[1].id', /duplicate/],
    [{ version: 1, rules: [{ id: 'a', event: 'pio', ports: [1, 0x10000], action: 'allow' }] }, 'rules[0].ports', /0\.\.0xffff/],
  ])('rejects a malformed policy naming the path (%#)', (doc, path, msg) => {
    let err: unknown;
    try { compilePolicy(doc); } catch (e) { err = e; }
    expect(err).toBeInstanceOf(PolicyError);
    expect((err as PolicyError).path).toBe(path);
    expect((err as Error).message).toMatch(msg);
  });

  it('overlapping and contradictory rules are refused at load, naming both ids', () => {
    const contradict = { version: 1, rules: [
      { id: 'uart', event: 'pio', ports: [0x3f8, 0x3ff], action: 'allow' },
      { id: 'lsr', event: 'pio', ports: [0x3fd, 0x3fd], direction: 'in', action: 'deny' },
    ] };
    expect(() => compilePolicy(contradict)).toThrow(PolicyConflictError);
    expect(() => compilePolicy(contradict)).toThrow(/'uart' and 'lsr'.*contradict \(allow vs deny\)/);
    const overlap = { version: 1, rules: [{ id: 'x', event: 'msr', indices: [1, 2], action: 'allow' }, { id: 'y', event: 'msr', indices: [2, 3], action: 'allow' }] };
    expect(() => compilePolicy(overlap)).toThrow(/'x' and 'y' conflict: they overlap/);
    // Disjoint directions do not overlap.
    expect(() => compilePolicy({ version: 1, rules: [
      { id: 'i', event: 'pio', ports: [0x60, 0x60], direction: 'in', action: 'allow' },
      { id: 'o', event: 'pio', ports: [0x60, 0x60], direction: 'out', action: 'deny' },
    ] })).not.toThrow();
  });
});
