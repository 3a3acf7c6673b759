/**
 * Releasing a machine in reverse order of creation: the vCPUs' runner threads (parallel mode),
 * vCPUs (unmap `kvm_run`, close the fd), the
 * VM (which drops its memslots), guest RAM, then the attached devices.
 * @module
 */
import type { EventEmitter } from 'eventemitter3';
import { StateError } from '../errors.js';
import type { MachineEvents } from '../machine.js';
import type { MachineState } from './state.js';
import { recycleVm, sharedBackendSettled } from '../backend/kvm.js';

/**
 * VM releases still running on a thread-pool thread (see {@link close}). Bounded: a close that
 * would make more than {@link MAX_BACKGROUND_RELEASES} waits for the oldest, so a loop of
 * create/close cannot pile up unreleased VMs.
 */
const releasing = new Set<Promise<void>>();
const MAX_BACKGROUND_RELEASES = 4;

/** @internal Resolves when every VM handed to a background release so far has been released. */
export async function released(): Promise<void> {
  while (releasing.size > 0) await Promise.all([...releasing]);
  await sharedBackendSettled(); // and the spare VM the backend may be making (fds in flight)
}

/**
 * @internal Releases the KVM side and guest RAM; keeps going past failures (also for a
 * half-built machine). With `background`, a VM whose backend can do so is destroyed on a
 * thread-pool thread; the returned promise (if any) resolves when the kernel has released it.
 * With `keep`, a plain machine's VM may instead go back to its backend, wiped, for the next
 * plain machine (see `KvmBackend.createVm`): every handle of this machine is closed all the same.
 */
export function teardown(s: MachineState, background = false, keep = false): Promise<void> | undefined {
  // Runner threads first: none may be inside KVM_RUN on a vCPU fd that is being closed.
  const hadRunners = s.runners !== undefined;
  try { s.runners?.close(); } catch { /* keep going */ }
  s.runners = undefined;
  const hosts = s.memory.clear();
  // Taken: the VM's fds moved to new owners, and what follows closes this machine's (now empty) handles.
  if (keep && !hadRunners) {
    try {
      const vcpus = s.vcpus.map((v) => v.backend);
      if (!recycleVm(s.vm, vcpus, hosts)) s.recycle?.(vcpus, hosts);
    } catch { /* destroyed below */ }
  }
  for (const v of s.vcpus) { try { v.backend.close(); } catch { /* keep going */ } }
  s.vcpus.length = 0;
  // No memslot deletes (~150 µs each on PVM): destroying the VM drops its memslots, and the
  // vCPUs that could touch guest RAM are gone already. Guest RAM is unmapped after the VM is
  // closed here (the kernel's MMU notifiers cope with an unmap while a background release of
  // the VM is still running: no vCPU can touch the memory any more).
  s.slots.clear();
  let pending: Promise<void> | undefined;
  try {
    if (background && s.vm.closeInBackground) pending = s.vm.closeInBackground().catch(() => { /* keep going */ });
    else s.vm.close();
  } catch { /* keep going */ }
  for (const h of hosts) { try { h.close(); } catch { /* keep going */ } }
  return pending;
}

/** @internal `Machine.close`: idempotent, refused while `run()` is in progress. */
export async function close(s: MachineState, events: EventEmitter<MachineEvents>): Promise<void> {
  if (s.closed) return;
  if (s.running) throw new StateError('cannot close a running machine; abort run() first');
  s.closed = true;
  // The kernel's VM teardown (~0.1–1 ms on PVM: SRCU grace periods, MMU) runs on libuv's thread
  // pool instead of the event loop; `released()` waits for it. A plain machine's VM is rather
  // kept, wiped, for the next plain machine (no kernel teardown, no creation next time).
  const pending = teardown(s, true, true);
  if (pending) {
    releasing.add(pending);
    void pending.finally(() => releasing.delete(pending));
    if (releasing.size > MAX_BACKGROUND_RELEASES) await Promise.race(releasing);
  }
  for (const d of s.devices) await d.close?.();
  s.devices.clear();
  events.emit('closed');
  events.removeAllListeners();
}
