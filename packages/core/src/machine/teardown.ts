/**
 * Releasing a machine in reverse order of creation: vCPUs (unmap `kvm_run`, close the fd), the
 * VM (which drops its memslots), guest RAM, then the attached devices.
 * @module
 */
import type { EventEmitter } from 'eventemitter3';
import { StateError } from '../errors.js';
import type { MachineEvents } from '../machine.js';
import type { MachineState } from './state.js';

/** @internal Releases the KVM side and guest RAM; keeps going past failures (also for a half-built machine). */
export function teardown(s: MachineState): void {
  for (const v of s.vcpus) { try { v.backend.close(); } catch { /* keep going */ } }
  s.vcpus.length = 0;
  // No memslot deletes (~150 µs each on PVM): destroying the VM drops its memslots, and the
  // vCPUs that could touch guest RAM are gone already. Guest RAM is unmapped after the VM.
  s.slots.clear();
  try { s.vm.close(); } catch { /* keep going */ }
  for (const h of s.memory.clear()) h.close();
}

/** @internal `Machine.close`: idempotent, refused while `run()` is in progress. */
export async function close(s: MachineState, events: EventEmitter<MachineEvents>): Promise<void> {
  if (s.closed) return;
  if (s.running) throw new StateError('cannot close a running machine; abort run() first');
  s.closed = true;
  teardown(s);
  for (const d of s.devices) await d.close?.();
  s.devices.clear();
  events.emit('closed');
  events.removeAllListeners();
}
