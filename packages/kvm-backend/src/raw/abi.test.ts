import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import * as S from './structs.js';
import { KVM, KVM_CONST, KVM_EXIT } from './ioctls.js';

// The raw layer's layouts must match <linux/kvm.h> exactly. A C compiler is the referee:
// we print sizeof/offsetof/ioctl numbers from C and compare with koffi's view.
const cc = spawnSync('cc', ['--version']).status === 0;
const header = spawnSync('test', ['-f', '/usr/include/linux/kvm.h']).status === 0;
const reason = !cc ? 'no C compiler (cc) on PATH' : !header ? '/usr/include/linux/kvm.h is missing' : '';
if (reason) console.warn(`[tsvm] SKIPPING KVM ABI layout checks: ${reason}`);

const structs: Array<[string, Parameters<typeof S.sizeOf>[0], string[]]> = [
  ['kvm_userspace_memory_region', S.kvm_userspace_memory_region, ['slot', 'flags', 'guest_phys_addr', 'memory_size', 'userspace_addr']],
  ['kvm_regs', S.kvm_regs, ['rax', 'rsp', 'r15', 'rip', 'rflags']],
  ['kvm_segment', S.kvm_segment, ['base', 'limit', 'selector', 'type', 'present', 'dpl', 'db', 's', 'l', 'g', 'avl', 'unusable']],
  ['kvm_dtable', S.kvm_dtable, ['base', 'limit']],
  ['kvm_sregs', S.kvm_sregs, ['cs', 'ss', 'tr', 'ldt', 'gdt', 'idt', 'cr0', 'cr2', 'cr3', 'cr4', 'cr8', 'efer', 'apic_base', 'interrupt_bitmap']],
  ['kvm_fpu', S.kvm_fpu, ['fpr', 'fcw', 'fsw', 'ftwx', 'last_opcode', 'last_ip', 'last_dp', 'xmm', 'mxcsr']],
  ['kvm_msr_entry', S.kvm_msr_entry, ['index', 'data']],
  ['kvm_msrs', S.kvm_msrs, ['nmsrs']],
  ['kvm_cpuid_entry2', S.kvm_cpuid_entry2, ['function', 'index', 'flags', 'eax', 'ebx', 'ecx', 'edx']],
  ['kvm_cpuid2', S.kvm_cpuid2, ['nent']],
  ['kvm_irq_level', S.kvm_irq_level, ['irq', 'level']],
  ['kvm_pit_config', S.kvm_pit_config, ['flags']],
  ['kvm_irqchip', S.kvm_irqchip, ['chip_id', 'chip']],
  ['kvm_coalesced_mmio_zone', S.kvm_coalesced_mmio_zone, ['addr', 'size']],
  ['kvm_coalesced_mmio', S.kvm_coalesced_mmio, ['phys_addr', 'len', 'data']],
  ['kvm_coalesced_mmio_ring', S.kvm_coalesced_mmio_ring, ['first', 'last']],
  ['kvm_guest_debug', S.kvm_guest_debug, ['control', 'arch']],
  ['kvm_mp_state', S.kvm_mp_state, ['mp_state']],
  ['kvm_dirty_log', S.kvm_dirty_log, ['slot', 'dirty_bitmap']],
  ['kvm_enable_cap', S.kvm_enable_cap, ['cap', 'flags', 'args']],
  ['kvm_msr_filter_range', S.kvm_msr_filter_range, ['flags', 'nmsrs', 'base', 'bitmap']],
  ['kvm_msr_filter', S.kvm_msr_filter, ['flags', 'ranges']],
  ['kvm_ioeventfd', S.kvm_ioeventfd, ['datamatch', 'addr', 'len', 'fd', 'flags']],
  ['kvm_irqfd', S.kvm_irqfd, ['fd', 'gsi', 'flags', 'resamplefd']],
  ['kvm_vcpu_events', S.kvm_vcpu_events, []],
  ['kvm_debugregs', S.kvm_debugregs, ['db', 'dr6', 'dr7', 'flags']],
  ['kvm_lapic_state', S.kvm_lapic_state, ['regs']],
  ['kvm_xsave', S.kvm_xsave, ['region']],
  ['kvm_clock_data', S.kvm_clock_data, ['clock', 'flags', 'realtime', 'host_tsc']],
  ['kvm_irqchip', S.kvm_irqchip, ['chip_id', 'chip']],
  ['kvm_pit_channel_state', S.kvm_pit_channel_state, ['count', 'latched_count', 'status', 'gate', 'count_load_time']],
  ['kvm_pit_state2', S.kvm_pit_state2, ['channels', 'flags', 'reserved']],
  ['kvm_xcrs', S.kvm_xcrs, ['nr_xcrs', 'flags', 'xcrs', 'padding']],
  ['kvm_msr_list', S.kvm_msr_list, ['nmsrs']],
  ['kvm_translation', S.kvm_translation, ['linear_address', 'physical_address', 'valid', 'writeable', 'usermode']],
];

// Fields whose koffi name differs from the C member (koffi flattens `arch.debugreg`).
const cField: Record<string, string> = { 'kvm_guest_debug.arch': 'arch' };
const koffiField: Record<string, string> = { 'kvm_guest_debug.arch': 'debugreg' };

const runFields: Array<[keyof typeof S.KVM_RUN_OFFSETS, string]> = [
  ['immediate_exit', 'immediate_exit'], ['exit_reason', 'exit_reason'], ['if_flag', 'if_flag'],
  ['cr8', 'cr8'], ['apic_base', 'apic_base'], ['io_direction', 'io.direction'], ['io_size', 'io.size'],
  ['io_port', 'io.port'], ['io_count', 'io.count'], ['io_data_offset', 'io.data_offset'],
  ['mmio_phys_addr', 'mmio.phys_addr'], ['mmio_data', 'mmio.data'], ['mmio_len', 'mmio.len'],
  ['mmio_is_write', 'mmio.is_write'], ['fail_entry_reason', 'fail_entry.hardware_entry_failure_reason'],
  ['fail_entry_cpu', 'fail_entry.cpu'], ['internal_suberror', 'internal.suberror'], ['internal_ndata', 'internal.ndata'],
  ['internal_data', 'internal.data'], ['emulation_flags', 'emulation_failure.flags'],
  ['emulation_insn_size', 'emulation_failure.insn_size'], ['emulation_insn_bytes', 'emulation_failure.insn_bytes'], ['system_event_type', 'system_event.type'], ['system_event_ndata', 'system_event.ndata'],
  ['system_event_data', 'system_event.data'], ['msr_error', 'msr.error'], ['msr_reason', 'msr.reason'],
  ['msr_index', 'msr.index'], ['msr_data', 'msr.data'], ['debug_exception', 'debug.arch.exception'],
  ['debug_pc', 'debug.arch.pc'], ['debug_dr6', 'debug.arch.dr6'], ['debug_dr7', 'debug.arch.dr7'],
  ['ex_exception', 'ex.exception'], ['ex_error_code', 'ex.error_code'], ['hypercall_nr', 'hypercall.nr'],
  ['hypercall_args', 'hypercall.args'], ['hypercall_ret', 'hypercall.ret'],
  ['kvm_valid_regs', 'kvm_valid_regs'], ['kvm_dirty_regs', 'kvm_dirty_regs'], ['sync_regs', 's.regs.regs'], ['sync_sregs', 's.regs.sregs'], ['sync_events', 's.regs.events'],
];

function cReport(): Record<string, number> {
  const dir = mkdtempSync(join(tmpdir(), 'tsvm-abi-'));
  try {
    const lines: string[] = [];
    for (const [name, , fields] of structs) {
      lines.push(`P("${name}", sizeof(struct ${name}));`);
      for (const f of fields) {
        const cf = cField[`${name}.${f}`] ?? f;
        lines.push(`P("${name}.${f}", offsetof(struct ${name}, ${cf}));`);
      }
    }
    for (const [k, path] of runFields) lines.push(`P("run.${k}", offsetof(struct kvm_run, ${path}));`);
    for (const k of Object.keys(S.VCPU_EVENTS_OFFSETS)) lines.push(`P("events.${k}", offsetof(struct kvm_vcpu_events, ${k.replace('exception_', 'exception.').replace('nmi_', 'nmi.')}));`);
    for (const k of Object.keys(KVM)) lines.push(`P("ioctl.${k}", (unsigned long)${k});`);
    lines.push('P("const.COALESCED_MMIO_PAGE_OFFSET", KVM_COALESCED_MMIO_PAGE_OFFSET);', 'P("const.PIO_PAGE_OFFSET", KVM_PIO_PAGE_OFFSET);', 'P("const.PIT_SPEAKER_DUMMY", KVM_PIT_SPEAKER_DUMMY);',
      'P("const.INTERNAL_ERROR_EMULATION", KVM_INTERNAL_ERROR_EMULATION);', 'P("const.SYNC_X86_REGS", KVM_SYNC_X86_REGS);', 'P("const.SYNC_X86_EVENTS", KVM_SYNC_X86_EVENTS);',
      'P("const.DIRTY_LOG_PAGE_OFFSET", KVM_DIRTY_LOG_PAGE_OFFSET);', 'P("const.DIRTY_GFN_F_DIRTY", KVM_DIRTY_GFN_F_DIRTY);', 'P("const.DIRTY_GFN_F_RESET", KVM_DIRTY_GFN_F_RESET);',
      'P("const.EXIT_DIRTY_RING_FULL", KVM_EXIT_DIRTY_RING_FULL);', 'P("const.RESET_DIRTY_RINGS", KVM_RESET_DIRTY_RINGS);', 'P("const.dirty_gfn", sizeof(struct kvm_dirty_gfn));', 'P("const.dirty_gfn.offset", offsetof(struct kvm_dirty_gfn, offset));',
      'P("const.INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES", KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES);',
      'P("const.EXIT_IO_OUT", KVM_EXIT_IO_OUT);', 'P("const.IOAPIC_REDIRTBL_OFFSET", offsetof(struct kvm_ioapic_state, redirtbl));');
    const src = `#include <stdio.h>\n#include <stddef.h>\n#include <linux/kvm.h>\n#define P(n,v) printf("%s %lu\\n", n, (unsigned long)(v))\nint main(void){\n${lines.join('\n')}\nreturn 0;}\n`;
    writeFileSync(join(dir, 'abi.c'), src);
    execFileSync('cc', ['-o', join(dir, 'abi'), join(dir, 'abi.c')]);
    const out = execFileSync(join(dir, 'abi'), { encoding: 'utf8' });
    return Object.fromEntries(out.trim().split('\n').map((l) => { const [k, v] = l.split(' '); return [k as string, Number(v)]; }));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

describe.skipIf(reason !== '')('KVM ABI layouts match <linux/kvm.h>', () => {
  const c = reason ? {} : cReport();
  it.each(structs)('%s size and field offsets', (name, type, fields) => {
    expect(S.sizeOf(type), `sizeof(${name})`).toBe(c[name]);
    for (const f of fields) {
      const kf = koffiField[`${name}.${f}`] ?? f;
      expect(S.offsetOf(type, kf), `${name}.${f}`).toBe(c[`${name}.${f}`]);
    }
  });
  it('kvm_run offsets', () => {
    for (const [k] of runFields) expect(S.KVM_RUN_OFFSETS[k], k).toBe(c[`run.${k}`]);
  });
  it('kvm_vcpu_events offsets', () => {
    for (const [k, v] of Object.entries(S.VCPU_EVENTS_OFFSETS)) expect(v, k).toBe(c[`events.${k}`]);
  });
  it('page offsets inside the vCPU mapping', () => {
    expect(KVM_CONST.COALESCED_MMIO_PAGE_OFFSET).toBe(c['const.COALESCED_MMIO_PAGE_OFFSET']);
    expect(KVM_CONST.PIO_PAGE_OFFSET).toBe(c['const.PIO_PAGE_OFFSET']);
    expect(KVM_CONST.PIT_SPEAKER_DUMMY).toBe(c['const.PIT_SPEAKER_DUMMY']);
    expect(S.IOAPIC_REDIRTBL_OFFSET).toBe(c['const.IOAPIC_REDIRTBL_OFFSET']);
  });
  it('exit decoding constants', () => {
    expect(KVM_CONST.INTERNAL_ERROR_EMULATION).toBe(c['const.INTERNAL_ERROR_EMULATION']);
    expect(KVM_CONST.SYNC_X86_REGS).toBe(c['const.SYNC_X86_REGS']);
    expect(KVM_CONST.SYNC_X86_EVENTS).toBe(c['const.SYNC_X86_EVENTS']);
    expect(KVM_CONST.DIRTY_LOG_PAGE_OFFSET).toBe(c['const.DIRTY_LOG_PAGE_OFFSET']);
    expect(KVM_CONST.DIRTY_GFN_F_DIRTY).toBe(c['const.DIRTY_GFN_F_DIRTY']);
    expect(KVM_CONST.DIRTY_GFN_F_RESET).toBe(c['const.DIRTY_GFN_F_RESET']);
    expect(KVM_EXIT.DIRTY_RING_FULL).toBe(c['const.EXIT_DIRTY_RING_FULL']);
    expect(KVM.KVM_RESET_DIRTY_RINGS).toBe(c['const.RESET_DIRTY_RINGS']);
    expect([c['const.dirty_gfn'], c['const.dirty_gfn.offset']]).toEqual([16, 8]);
    expect(KVM_CONST.INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES).toBe(c['const.INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES']);
    expect(KVM_CONST.EXIT_IO_OUT).toBe(c['const.EXIT_IO_OUT']);
  });
  it('ioctl numbers', () => {
    for (const [k, v] of Object.entries(KVM)) expect(v, k).toBe(c[`ioctl.${k}`]);
  });
});
