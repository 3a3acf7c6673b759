/**
 * Checks the loaders against the distribution kernel installed on this host, if any
 * (`/boot/vmlinuz-*`, or the file named by `TSVM_TEST_BZIMAGE`). The bzImage header is parsed
 * and loaded; the compressed payload is unpacked with `extractVmlinux` (gzip, LZ4) to get
 * `vmlinux`, whose PVH note is then found and loaded.
 */
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { findPvhEntry, loadPvh } from './pvh.js';
import { loadLinux, parseBzImage } from './linux.js';
import { LEGACY_BIOS_HOLE } from './bootinfo.js';
import { ImageFormatError } from '../errors.js';
import { extractVmlinux } from './vmlinux.js';
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
    let vmlinux: Uint8Array;
    try {
      vmlinux = extractVmlinux(image).vmlinux;
    } catch (e) {
      // Only an unsupported compression (xz, zstd...) is a reason to skip; corruption fails.
      if (!(e instanceof ImageFormatError) || !/not supported/.test(e.message)) throw e;
      console.warn(`\n*** SKIPPING PVH check on ${kernelPath}: ${e.message}\n`);
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
