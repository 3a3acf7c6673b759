/**
 * A pool of empty VMs (each with vCPU 0) created ahead of time, so `Machine.fork` does not pay
 * for `KVM_CREATE_VM` on its critical path: on PVM that ioctl alone costs ~0.5 ms, more than the
 * whole fork budget. The pool refills itself on the event loop after each take, one VM per
 * turn, so the cost moves off the fork's latency but not off the main thread. A snapshot's pool
 * also applies the snapshot's vCPU and VM state ahead (~8 vCPU ioctls at ~6 µs each on PVM).
 * @module
 */
import type { Backend, BackendVcpu, BackendVm } from '../backend.js';

/** @internal One ready VM. */
export interface PooledVm {
  /** The VM (irqchip as the snapshot needs). */
  readonly vm: BackendVm;
  /** Its vCPU 0. */
  readonly vcpu: BackendVcpu;
  /** Whether the snapshot's VM and vCPU state is already applied (only devices remain). */
  readonly prepared: boolean;
}

/** @internal Keeps `target` VMs ready. */
export class VmPool {
  readonly backend: Backend;
  readonly #irqchip: boolean;
  readonly #target: number;
  readonly #ready: PooledVm[] = [];
  #scheduled = false;
  #closed = false;

  readonly #prepare: ((vm: BackendVm, vcpu: BackendVcpu) => void) | undefined;

  /** @param prepare - applies state to a new VM ahead of use (a failure leaves it unprepared). */
  constructor(backend: Backend, irqchip: boolean, target: number, prepare?: (vm: BackendVm, vcpu: BackendVcpu) => void) {
    this.backend = backend;
    this.#prepare = prepare;
    this.#irqchip = irqchip;
    this.#target = target;
    while (this.#ready.length < target) this.#ready.push(this.#make());
  }

  /** VMs ready now. */
  get size(): number {
    return this.#ready.length;
  }

  #make(): PooledVm {
    const vm = this.backend.createVm({ irqchip: this.#irqchip });
    try {
      const vcpu = vm.createVcpu(0);
      let prepared = false;
      // Not fatal: an unprepared VM still forks (restore applies the state itself and reports).
      try { this.#prepare?.(vm, vcpu); prepared = this.#prepare !== undefined; } catch { /* see above */ }
      return { vm, vcpu, prepared };
    } catch (e) {
      vm.close();
      throw e;
    }
  }

  /** A ready VM, or undefined when the pool is empty; schedules a refill. */
  take(): PooledVm | undefined {
    const e = this.#ready.shift();
    this.#schedule();
    return e;
  }

  #schedule(): void {
    if (this.#scheduled || this.#closed) return;
    this.#scheduled = true;
    setImmediate(() => {
      this.#scheduled = false;
      if (this.#closed || this.#ready.length >= this.#target) return;
      try { this.#ready.push(this.#make()); } catch { return; /* the host is out of VMs: forks create their own */ }
      this.#schedule();
    }).unref();
  }

  /** Releases the VMs still waiting. Idempotent. */
  close(): void {
    this.#closed = true;
    for (const { vm, vcpu } of this.#ready.splice(0)) {
      try { vcpu.close(); } catch { /* keep going */ }
      try { vm.close(); } catch { /* keep going */ }
    }
  }
}
