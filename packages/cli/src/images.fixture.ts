// Test images shared by the CLI's unit and KVM tests.

/** A fake bzImage (boot protocol 2.15, 64-bit entry): 4 setup sectors, then `code` at kernel offset 0x200. */
export function bzImage(code: Uint8Array): Uint8Array {
  const setup = 5 * 512, kernel = (0x200 + code.length + 15) & ~15; // syssize counts 16-byte units
  const f = new Uint8Array(setup + kernel);
  const v = new DataView(f.buffer);
  f[0x1f1] = 4; v.setUint32(0x1f4, Math.ceil(kernel / 16), true); v.setUint16(0x1fe, 0xaa55, true);
  f[0x200] = 0xeb; f[0x201] = 0x6a;
  v.setUint32(0x202, 0x53726448, true); v.setUint16(0x206, 0x020f, true); f[0x211] = 0x01;
  v.setUint32(0x22c, 0x7fffffff, true); v.setUint32(0x230, 0x200000, true); f[0x234] = 1;
  v.setUint16(0x236, 0x1, true); v.setUint32(0x238, 255, true);
  v.setBigUint64(0x258, 0x1000000n, true); v.setUint32(0x260, 0x400000, true);
  f.set(code, setup + 0x200);
  return f;
}
