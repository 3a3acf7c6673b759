/**
 * The record/replay test guest, shared by core's KVM test and the replay benchmark: ring 3,
 * long mode, `rounds` rounds of (read a random 32-bit value from port 0x60, ask the DMA device
 * on port 0x64 for 8 random bytes at 0x100000, fold both into r13, store r13 at
 * 0x101000 + 8·round), then a debug-exit with code 7. Every run of the real devices gives other
 * values, so two recordings differ and a replay must reproduce one exactly.
 * @module
 */
import { randomBytes } from 'node:crypto';
import type { Machine } from '../machine.js';
import type { Device } from '../device.js';
import { DeviceMemory } from '../dma.js';

/** Guest-virtual address of the loop head (`round:`) when the guest is assembled at 0x1000. */
export const REPLAY_GUEST_LOOP = 0x1005;

/** The guest's source for `asm(…, { bits: 64, address: 0x1000 })`. */
export function replayGuestSource(rounds: number): string {
  return `
  xor r13, r13
  xor ecx, ecx
round:
  mov dx, 0x60
  in eax, dx
  add r13, rax
  mov dx, 0x64
  out dx, al
  mov rax, [0x100000]
  xor r13, rax
  rol r13, 7
  mov [rcx*8 + 0x101000], r13
  inc ecx
  cmp ecx, ${rounds}
  jne round
  mov dx, 0xf4
  mov al, 7
  out dx, al`;
}

/** Attaches the guest's devices: a random port (0x60), a DMA engine through the DMA gate (0x64), a debug-exit (0xf4). */
export function attachReplayDevices(vm: Machine): void {
  const dma = new DeviceMemory(vm.memory, 'rng-dma');
  const random: Device = { name: 'random', read: () => randomBytes(4).readUInt32LE(0) };
  const engine: Device = { name: 'rng-dma', write: () => { dma.write(0x100000n, randomBytes(8)); } };
  const exit: Device = { name: 'exit', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v }) };
  vm.attach({ port: 0x60, size: 4 }, random);
  vm.attach({ port: 0x64, size: 1 }, engine);
  vm.attach({ port: 0xf4, size: 1 }, exit);
}
