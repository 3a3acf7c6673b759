/**
 * Checks the loaders against the distribution kernel installed on this host, if any
 * (`/boot/vmlinuz-*`, or the file named by `TSVM_TEST_BZIMAGE`). The bzImage header is parsed
 * and loaded; the compressed payload is unpacked (gzip via zlib, LZ4 legacy frames via the
 * small decoder below) to get `vmlinux`, whose PVH note is then found and loaded.
 */
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { gunzipSync } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { findPvhEntry, loadPvh } from './pvh.js';
import { loadLinux, parseBzImage } from './linux.js';
import { LEGACY_BIOS_HOLE } from './bootinfo.js';
import { makeMemory } from './fixtures.test-util.js';

function findKernel(): string | undefined {
  const env = process.env.TSVM_TEST_BZIMAGE;
  if (env !== undefined && env !== '') return env;
  if (!existsSync('/boot')) return undefined;
  const names = readdirSync('/boot').filter((n) => n.startsWith('vmlinuz-')).sort();
  const last = names[names.length - 1];
  return last === undefined ? undefined : `/boot/${last}`;
}

const kernelPath = findKernel();
if (kernelPath === undefined) {
  console.warn(
    '\n*** SKIPPING real-kernel loader tests: no /boot/vmlinuz-* and TSVM_TEST_BZIMAGE is unset.\n' +
      '*** Install one (apt-get install linux-image-cloud-amd64) or point TSVM_TEST_BZIMAGE at a bzImage.\n',
  );
}

/** Decodes one LZ4 block into `out` at `op`; returns the new output position. */
function lz4Block(src: Uint8Array, ip: number, end: number, out: Uint8Array, op: number): number {
  while (ip < end) {
    const token = src[ip++] as number;
    let lit = token >> 4;
    if (lit === 15) {
      let b: number;
      do {
        b = src[ip++] as number;
        lit += b;
      } while (b === 255);
    }
    out.set(src.subarray(ip, ip + lit), op);
    ip += lit;
    op += lit;
    if (ip >= end) break; // the last sequence carries literals only
    const offset = (src[ip] as number) | ((src[ip + 1] as number) << 8);
    ip += 2;
    let len = token & 15;
    if (len === 15) {
      let b: number;
      do {
        b = src[ip++] as number;
        len += b;
      } while (b === 255);
    }
    len += 4;
    let from = op - offset;
    if (offset >= len) {
      out.copyWithin(op, from, from + len);
      op += len;
    } else {
      for (let i = 0; i < len; i++) out[op++] = out[from++] as number;
    }
  }
  return op;
}

/**
 * LZ4 legacy frame (what `lz4 -l` writes, and the kernel's LZ4 payload): magic 0x184C2102,
 * then blocks of `u32 compressed size` + data. The kernel build appends the uncompressed size
 * as the last 4 bytes.
 */
function lz4Legacy(src: Uint8Array): Uint8Array {
  const dv = new DataView(src.buffer, src.byteOffset, src.byteLength);
  const total = dv.getUint32(src.length - 4, true);
  const out = new Uint8Array(total + 8 * 1024 * 1024);
  let ip = 4;
  let op = 0;
  while (ip + 4 <= src.length - 4 && op < total) {
    const size = dv.getUint32(ip, true);
    ip += 4;
    if (size === 0x184c2102) continue; // concatenated frame
    op = lz4Block(src, ip, ip + size, out, op);
    ip += size;
  }
  return out.subarray(0, op);
}

/** Unpacks the bzImage payload, or says why it cannot. */
function extractVmlinux(image: Uint8Array): Uint8Array | string {
  const bz = parseBzImage(image);
  const dv = new DataView(image.buffer, image.byteOffset, image.byteLength);
  const offset = dv.getUint32(0x248, true);
  const length = dv.getUint32(0x24c, true);
  const payload = bz.kernel.subarray(offset, offset + length);
  const magic = Buffer.from(payload.subarray(0, 6)).toString('hex');
  if (magic.startsWith('1f8b')) return gunzipSync(payload);
  if (magic.startsWith('02214c18')) return lz4Legacy(payload);
  return `payload compression with magic ${magic} has no decoder here (gzip and LZ4 legacy only)`;
}

const MiB = 1024 * 1024;

describe.skipIf(kernelPath === undefined)(`real kernel ${kernelPath ?? '(none)'}`, () => {
  const image = kernelPath === undefined ? new Uint8Array() : new Uint8Array(readFileSync(kernelPath));

  it('parses the bzImage setup header and loads it with the 64-bit protocol', () => {
    const bz = parseBzImage(image);
    expect(bz.header.version).toBeGreaterThanOrEqual(0x020c);
    expect(bz.supports64).toBe(true);
    expect(bz.header.initSize).toBeGreaterThan(bz.kernel.length);
    const initrdPath = kernelPath?.replace('vmlinuz-', 'initrd.img-');
    const initrd = initrdPath !== undefined && existsSync(initrdPath) ? new Uint8Array(readFileSync(initrdPath)) : new Uint8Array(4096);
    const m = makeMemory(256 * MiB, 0);
    const r = loadLinux(m.memory, image, { cmdline: 'console=ttyS0 reboot=k panic=1', initrd, reserved: [LEGACY_BIOS_HOLE] });
    expect(r.mode).toBe(64);
    expect(r.entryState.rip).toBe(0x100200n);
    expect(m.memory.readCString(r.cmdlineAddress)).toBe('console=ttyS0 reboot=k panic=1');
    expect(m.memory.readUint(r.bootParamsAddress + 0x202n, 4)).toBe(0x53726448);
    expect(BigInt(r.initrd?.end ?? 0n)).toBeLessThanOrEqual(BigInt(bz.header.initrdAddrMax) + 1n);
    for (const f of r.kernelFootprint) expect(f.end <= BigInt(r.initrd?.start ?? 0n) || f.start >= BigInt(r.initrd?.end ?? 0n)).toBe(true);
  });

  it('unpacks vmlinux, finds its PVH note and loads it', (ctx) => {
    const vmlinux = extractVmlinux(image);
    if (typeof vmlinux === 'string') {
      console.warn(`\n*** SKIPPING PVH check on ${kernelPath}: ${vmlinux}\n`);
      ctx.skip();
      return;
    }
    const entry = findPvhEntry(vmlinux);
    if (entry === undefined) {
      console.warn(`\n*** ${kernelPath} has no PVH note (built without CONFIG_PVH); nothing to check\n`);
      ctx.skip();
      return;
    }
    const m = makeMemory(256 * MiB, 0);
    const r = loadPvh(m.memory, vmlinux, { cmdline: 'console=ttyS0' });
    expect(r.elf.class).toBe(64);
    expect(r.elf.segments[0]?.start).toBe(0x1000000n);
    expect(r.entry).toBe(entry);
    expect(r.elf.segments.some((s) => entry >= s.start && entry < s.end)).toBe(true);
    expect(m.memory.readUint(r.startInfoAddress, 4)).toBe(0x336ec578);
  });
});
