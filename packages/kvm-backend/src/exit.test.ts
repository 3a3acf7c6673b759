import { describe, expect, it } from 'vitest';
import { Pending, decodeExit, type PendingAnswer } from './exit.js';
import { KVM_CONST, KVM_EXIT } from './raw/ioctls.js';
import { KVM_RUN_OFFSETS as O } from './raw/structs.js';

// decodeExit on a fabricated kvm_run page: the decode needs no /dev/kvm.
function page(): { v: DataView; b: Uint8Array } {
  const b = new Uint8Array(2 * 4096);
  return { v: new DataView(b.buffer), b };
}

const ans = (): PendingAnswer => ({ pending: Pending.None, ioOffset: 0, ioLength: 0 });

describe('decodeExit', () => {
  it('copies an out payload from io.data_offset and does not alias the mapping', () => {
    const { v, b } = page();
    v.setUint8(O.io_direction, KVM_CONST.EXIT_IO_OUT);
    v.setUint8(O.io_size, 2);
    v.setUint16(O.io_port, 0x3f8, true);
    v.setUint32(O.io_count, 2, true);
    v.setBigUint64(O.io_data_offset, 4096n, true);
    b.set([1, 2, 3, 4, 5], 4096);
    const e = decodeExit(KVM_EXIT.IO, v, b, ans());
    expect(e).toEqual({ kind: 'io', direction: 'out', port: 0x3f8, size: 2, count: 2, data: new Uint8Array([1, 2, 3, 4]) });
    b[4096] = 9;
    expect(e.kind === 'io' && e.data[0]).toBe(1);
  });

  it.each([[1, 1], [4, 1], [1, 8], [2, 5], [4, 300]])('copies a %i-byte x%i out exactly, whichever copy it takes (by hand up to 8 bytes, slice beyond)', (size, count) => {
    const { v, b } = page();
    v.setUint8(O.io_direction, KVM_CONST.EXIT_IO_OUT);
    v.setUint8(O.io_size, size);
    v.setUint32(O.io_count, count, true);
    v.setBigUint64(O.io_data_offset, 4096n, true);
    for (let i = 0; i < 4096; i++) b[4096 + i] = (i * 7 + 3) & 0xff;
    const e = decodeExit(KVM_EXIT.IO, v, b, ans());
    const want = b.slice(4096, 4096 + size * count);
    expect(e.kind === 'io' && e.data).toEqual(want);
    b.fill(0, 4096);
    expect(e.kind === 'io' && e.data).toEqual(want); // a copy, not a view of the mapping
  });

  it('an in and an MMIO read carry no data; an MMIO write copies at most 8 bytes', () => {
    const { v, b } = page();
    v.setUint8(O.io_direction, KVM_CONST.EXIT_IO_IN);
    v.setUint8(O.io_size, 2);
    v.setUint32(O.io_count, 3, true);
    v.setBigUint64(O.io_data_offset, 4096n, true);
    const a = ans();
    expect(decodeExit(KVM_EXIT.IO, v, b, a)).toMatchObject({ direction: 'in', data: new Uint8Array(0) });
    expect(a).toEqual({ pending: Pending.IoIn, ioOffset: 4096, ioLength: 6 });
    v.setBigUint64(O.mmio_phys_addr, 0xd0000000n, true);
    v.setUint32(O.mmio_len, 4, true);
    const m = ans();
    expect(decodeExit(KVM_EXIT.MMIO, v, b, m)).toEqual({ kind: 'mmio', address: 0xd0000000n, isWrite: false, size: 4, data: new Uint8Array(0) });
    expect(m.pending).toBe(Pending.MmioRead);
    v.setUint8(O.mmio_is_write, 1);
    b.set([0xaa, 0xbb, 0xcc, 0xdd], O.mmio_data);
    expect(decodeExit(KVM_EXIT.MMIO, v, b, ans())).toMatchObject({ isWrite: true, data: new Uint8Array([0xaa, 0xbb, 0xcc, 0xdd]) });
  });

  it('an internal error copies suberror, ndata, the data words and, for an emulation failure, the instruction bytes', () => {
    const { v, b } = page();
    v.setUint32(O.internal_suberror, KVM_CONST.INTERNAL_ERROR_EMULATION, true);
    v.setUint32(O.internal_ndata, 3, true);
    v.setBigUint64(O.emulation_flags, BigInt(KVM_CONST.INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES), true);
    v.setUint8(O.emulation_insn_size, 1);
    b[O.emulation_insn_bytes] = 0xcc; // int3
    const e = decodeExit(KVM_EXIT.INTERNAL_ERROR, v, b, ans());
    expect(e).toMatchObject({ kind: 'internal-error', suberror: 1, ndata: 3, instructionBytes: new Uint8Array([0xcc]) });
    expect(e.kind === 'internal-error' && e.data).toEqual([1n, 0xccn << 8n | 1n, 0n]);
    // Another suberror: no overlay, even if the bytes happen to look like flags.
    v.setUint32(O.internal_suberror, 3, true);
    v.setUint32(O.internal_ndata, 40, true);
    const d = decodeExit(KVM_EXIT.INTERNAL_ERROR, v, b, ans());
    expect(d).not.toHaveProperty('instructionBytes');
    expect(d).toMatchObject({ suberror: 3, ndata: 40 });
    expect(d.kind === 'internal-error' && d.data.length).toBe(16);
  });

  it('an unknown reason is unsupported with the raw number', () => {
    const { v, b } = page();
    expect(decodeExit(999, v, b, ans())).toEqual({ kind: 'unsupported', reason: 999 });
  });
});
