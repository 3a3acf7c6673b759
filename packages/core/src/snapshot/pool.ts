/**
 * A pool of empty VMs (each with vCPU 0) created ahead of time, so `Machine.fork` does not pay
 * for `KVM_CREATE_VM` on its critical path: on PVM that ioctl alone costs ~0.5 ms, more than the
 * whole fork budget. The pool refills itself on the event loop after each take, one VM per
 * turn, so the cost moves off the fork's latency but not off the main thread. A snapshot's pool
 * also applies the snapshot's vCPU and VM state ahead (~8 vCPU ioctls at ~6 µs each on PVM).
 * @module
 */
import type { Backend, BackendVcpu, BackendVm, BackendVmOptions } from '../backend.js';
import type { HostMemory } from '../memory.js';

/** @internal Guest RAM a pooled VM has mapped already (a memslot registration costs an SRCU grace period). */
export interface PremappedRegion {
  /** Memslot. */
  readonly slot: number;
  /** Guest-physical start. */
  readonly start: bigint;
  /** Bytes. */
  readonly size: number;
  /** Read-only memslot. */
  readonly readonly: boolean;
  /** The mapping (copy-on-write of the snapshot's image). */
  readonly host: HostMemory;
}

/** @internal One ready VM. */
export interface PooledVm {
  /** The VM (irqchip as the snapshot needs). */
  readonly vm: BackendVm;
  /** Its vCPU 0. */
  readonly vcpu: BackendVcpu;
  /** Whether the snapshot's VM and vCPU state is already applied (only devices remain). */
  readonly prepared: boolean;
  /** Guest RAM already mapped and registered, in the machine's region order. */
  readonly memory: readonly PremappedRegion[];
}

/** @internal Keeps `target` VMs ready. */
export class VmPool {
  readonly backend: Backend;
  readonly #options: BackendVmOptions;
  readonly #target: number;
  readonly #ready: PooledVm[] = [];
  #scheduled = false;
  #closed = false;

  readonly #prepare: ((vm: BackendVm, vcpu: BackendVcpu) => void) | undefined;
  readonly #premap: ((vm: BackendVm) => PremappedRegion[]) | undefined;
  readonly #inUse: () => number;
  readonly #onReady: (() => void) | undefined;

  /**
   * @param prepare - applies state to a new VM ahead of use (a failure leaves it unprepared).
   * @param premap - maps and registers guest RAM ahead of use (a failure leaves it to the fork).
   * @param hooks - `inUse`: VMs taken but still counted against `target` (machines built ahead
   *   from them); `onReady`: called after each refill.
   */
  constructor(backend: Backend, options: BackendVmOptions, target: number, prepare?: (vm: BackendVm, vcpu: BackendVcpu) => void, premap?: (vm: BackendVm) => PremappedRegion[], hooks: { inUse?: () => number; onReady?: () => void } = {}) {
    this.backend = backend;
    this.#prepare = prepare;
    this.#premap = premap;
    this.#options = options;
    this.#target = target;
    this.#inUse = hooks.inUse ?? (() => 0);
    this.#onReady = hooks.onReady;
    while (this.#wanted() > 0) this.#ready.push(this.#make());
  }

  /** VMs still to make: the target less those ready and those counted as in use. */
  #wanted(): number {
    return this.#target - this.#ready.length - this.#inUse();
  }

  /** VMs ready now. */
  get size(): number {
    return this.#ready.length;
  }

  #make(): PooledVm {
    const vm = this.backend.createVm(this.#options);
    try {
      const vcpu = vm.createVcpu(0);
      let prepared = false;
      // Not fatal: an unprepared VM still forks (restore applies the state itself and reports).
      try { this.#prepare?.(vm, vcpu); prepared = this.#prepare !== undefined; } catch { /* see above */ }
      let memory: PremappedRegion[] = [];
      try { memory = this.#premap?.(vm) ?? []; } catch { memory = []; /* the fork maps its own */ }
      return { vm, vcpu, prepared, memory };
    } catch (e) {
      vm.close();
      throw e;
    }
  }

  /** A ready VM, or undefined when the pool is empty; schedules a refill. */
  take(): PooledVm | undefined {
    const e = this.#ready.shift();
    this.refill();
    return e;
  }

  /** Makes VMs on the event loop, one per turn, until the target is met again. */
  refill(): void {
    if (this.#scheduled || this.#closed) return;
    this.#scheduled = true;
    setImmediate(() => {
      this.#scheduled = false;
      if (this.#closed || this.#wanted() <= 0) return;
      try { this.#ready.push(this.#make()); } catch { return; /* the host is out of VMs: forks create their own */ }
      this.#onReady?.();
      this.refill();
    }).unref();
  }

  /** Releases the VMs still waiting. Idempotent. */
  close(): void {
    this.#closed = true;
    for (const e of this.#ready.splice(0)) releasePooled(e);
  }
}

/** @internal Releases a ready VM that nothing took: its vCPU, the VM, its RAM. Never throws. */
export function releasePooled({ vm, vcpu, memory }: PooledVm): void {
  try { vcpu.close(); } catch { /* keep going */ }
  try { vm.close(); } catch { /* keep going */ }
  for (const r of memory) { try { r.host.close(); } catch { /* keep going */ } }
}
