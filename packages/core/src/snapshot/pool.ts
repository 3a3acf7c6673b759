/**
 * A pool of empty VMs (each with vCPU 0) created ahead of time, so `Machine.fork` does not pay
 * for `KVM_CREATE_VM` on its critical path: on PVM that ioctl alone costs ~0.5 ms, more than the
 * whole fork budget. The pool refills itself on the event loop after each take, one VM per
 * turn, so the cost moves off the fork's latency but not off the main thread.
 * @module
 */
import type { Backend, BackendVcpu, BackendVm } from '../backend.js';

/** @internal One ready VM. */
export interface PooledVm {
  /** The VM (irqchip as the snapshot needs). */
  readonly vm: BackendVm;
  /** Its vCPU 0. */
  readonly vcpu: BackendVcpu;
}

/** @internal Keeps `target` VMs ready. */
export class VmPool {
  readonly backend: Backend;
  readonly #irqchip: boolean;
  readonly #target: number;
  readonly #ready: PooledVm[] = [];
  #scheduled = false;
  #closed = false;

  constructor(backend: Backend, irqchip: boolean, target: number) {
    this.backend = backend;
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
      return { vm, vcpu: vm.createVcpu(0) };
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
