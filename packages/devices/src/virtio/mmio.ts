/**
 * The virtio-mmio transport, modern flavour (virtio 1.x, 4.2.2, `Version` = 2). Everything
 * the guest controls is hostile: registers, ring layout and ring contents. Nothing a guest does
 * throws out of `read`/`write`; a protocol violation sets DEVICE_NEEDS_RESET and raises the
 * configuration-change interrupt (QEMU's `virtio_error`), after which the device ignores
 * notifications until the driver resets it by writing 0 to `Status`.
 *
 * Defined responses: an invalid queue (size 0, not a power of two, above `QueueNumMax`,
 * rings outside RAM or misaligned) fails when the driver sets `QueueReady` → NEEDS_RESET;
 * a malformed chain → NEEDS_RESET; DRIVER_OK without FEATURES_OK → NEEDS_RESET; notifications
 * before DRIVER_OK or to a queue that is not ready are ignored (counted in `stats`);
 * FEATURES_OK with unknown features or without VERSION_1 is refused (the bit stays clear,
 * as the spec asks); register accesses that are not 32 bits wide read 0 and are ignored.
 *
 * Bounded work: one notify spends at most one {@link VirtioBudget}; chains left over are handled
 * from `setImmediate` (one budget per queue per event-loop turn, between the run loop's slices),
 * and kicks that arrive meanwhile are absorbed by that continuation. Device models reach guest
 * RAM only through a `DeviceMemory` named after the device, so their writes are mediated DMA.
 * @module
 */
import { type Access, type AccessSize, type Device, DeviceMemory, type DeviceStopRequest, type GuestMemory, type IrqLine, SnapshotFormatError, TsvmError } from '@tsvm/core';
import type { DeviceMapping } from '../mapping.js';
import { encodeU64, SnapshotReader } from '../snapshot-fields.js';
import { Feature, Interrupt, MmioReg, Status, VIRTIO_MMIO_MAGIC, VIRTIO_MMIO_VERSION, VIRTIO_VENDOR_ID } from './constants.js';
import { resolveBudget, type VirtioBudget } from './budget.js';
import type { ChainHandler, VirtioContext, VirtioDevice } from './device.js';
import { type QueuePosition, SplitVirtqueue, VirtqueueError } from './virtqueue.js';

/** Options of a {@link VirtioMmio} transport. */
export interface VirtioMmioOptions {
  /** The device model behind the transport. */
  readonly device: VirtioDevice;
  /** Guest RAM, used for ring and buffer accesses. */
  readonly memory: GuestMemory;
  /** Interrupt line: asserted while `InterruptStatus` is not 0. */
  readonly irq?: IrqLine;
  /** Offer VIRTIO_RING_F_INDIRECT_DESC. Default true. */
  readonly indirect?: boolean;
  /** Offer VIRTIO_RING_F_EVENT_IDX. Default true. */
  readonly eventIdx?: boolean;
  /** Called with the reason each time the device enters DEVICE_NEEDS_RESET (diagnostics). */
  readonly onError?: (error: Error) => void;
  /** Work one notify may cause before the rest is deferred (defaults: `DEFAULT_VIRTIO_BUDGET`). */
  readonly budget?: VirtioBudget;
}

/** Counters of guest misbehaviour the transport absorbed. */
export interface VirtioMmioStats {
  /** Times the device entered DEVICE_NEEDS_RESET. */
  needsReset: number;
  /** Notifications ignored (before DRIVER_OK, unknown or unready queue, broken device). */
  ignoredNotifies: number;
  /** Register accesses ignored (wrong width, unknown offset, read-only register). */
  ignoredAccesses: number;
  /** Times a queue's work hit the budget and the rest was deferred to a later turn. */
  deferrals: number;
}

interface Deferred {
  handler: ChainHandler;
  hasWork: (() => boolean) | undefined;
  readonly timer: ReturnType<typeof setImmediate>;
}

interface QueueRegs extends QueuePosition {
  num: number;
  ready: boolean;
  desc: bigint;
  driver: bigint;
  device: bigint;
  vq: SplitVirtqueue | undefined;
  deferred?: Deferred | undefined;
}

function newQueue(max: number): QueueRegs {
  return { num: max, ready: false, desc: 0n, driver: 0n, device: 0n, lastAvail: 0, usedIdx: 0, vq: undefined };
}

function setHalf(v: bigint, half: 0 | 1, value: number): bigint {
  const shift = half === 0 ? 0n : 32n;
  return (v & ~(0xffffffffn << shift)) | (BigInt(value >>> 0) << shift);
}

/**
 * A virtio-mmio register window in front of one {@link VirtioDevice}.
 *
 * @example A read-only disk at the default window, announced on the kernel command line
 * ```ts
 * import { VirtioBlock, VirtioMmio } from '@tsvm/devices';
 *
 * const disk = new VirtioMmio({
 *   device: new VirtioBlock({ path: 'rootfs.img', readonly: true }),
 *   memory: vm.memory,                                 // rings and buffers, through the checked accessor
 *   irq: vm.irqLine(5),                                // needs Machine.create({ irqchip: true })
 * });
 * vm.attachDevice(disk.mappings(0xd000_0000n));        // one 0x200-byte window per device
 * const cmdline = `console=ttyS0 ${VirtioMmio.kernelParameter(0xd000_0000n, 5)}`;   // virtio_mmio.device=512@0xd0000000:5
 * ```
 */
export class VirtioMmio implements Device {
  /** Bytes of MMIO space one device occupies (registers + config space), as in QEMU. */
  static readonly windowSize = 0x200;

  /** Device name (the model's). */
  readonly name: string;
  /** Counters of absorbed guest faults. */
  readonly stats: VirtioMmioStats = { needsReset: 0, ignoredNotifies: 0, ignoredAccesses: 0, deferrals: 0 };
  /** Most recent guest fault that put the device into NEEDS_RESET, for diagnostics. */
  lastError: Error | undefined;

  readonly #dev: VirtioDevice;
  readonly #mem: DeviceMemory;
  readonly #budget: Required<VirtioBudget>;
  readonly #irq: IrqLine | undefined;
  readonly #offered: bigint;
  readonly #onError: ((error: Error) => void) | undefined;
  #status = 0;
  #deviceFeaturesSel = 0;
  #driverFeaturesSel = 0;
  #driverFeatures = 0n;
  #queueSel = 0;
  #interruptStatus = 0;
  #configGeneration = 0;
  #queues: QueueRegs[];
  #irqLevel = false;
  /** A host bug met outside an exit (deferred work): reported at the next register access. */
  #pendingStop: DeviceStopRequest | undefined;
  #restoreKick: ReturnType<typeof setImmediate> | undefined;

  /** @param options - device model, guest RAM, IRQ line and offered ring features. */
  constructor(options: VirtioMmioOptions) {
    this.#dev = options.device;
    this.name = options.device.name;
    this.#budget = resolveBudget(options.budget, 'options.budget');
    this.#mem = new DeviceMemory(options.memory, options.device.name);
    this.#irq = options.irq;
    this.#onError = options.onError;
    this.#offered = options.device.deviceFeatures | Feature.Version1
      | (options.indirect === false ? 0n : Feature.RingIndirectDesc)
      | (options.eventIdx === false ? 0n : Feature.RingEventIdx);
    this.#queues = options.device.queueMaxSizes.map(newQueue);
    this.#dev.attach(this.#context());
  }

  /**
   * The mapping at `base` (default {@link VirtioMmio.defaultBase}); announce it to Linux with
   * {@link VirtioMmio.kernelParameter}, e.g. `virtio_mmio.device=512@0xd0000000:5`. Several
   * devices need distinct bases (one window of {@link VirtioMmio.windowSize} bytes each).
   */
  mappings(base: bigint = VirtioMmio.defaultBase): DeviceMapping[] {
    return [{ range: { address: base, size: VirtioMmio.windowSize }, device: this }];
  }

  /** Default window base: the first slot of the conventional 0xd0000000 MMIO hole. */
  static readonly defaultBase = 0xd0000000n;

  /** Linux `virtio_mmio.device=` parameter for this window at `base` with interrupt `irq`. */
  static kernelParameter(base: bigint, irq: number): string {
    return `virtio_mmio.device=${VirtioMmio.windowSize}@0x${base.toString(16)}:${irq}`;
  }

  /** The device model. */
  get device(): VirtioDevice {
    return this.#dev;
  }

  /** Current `Status` register. */
  get status(): number {
    return this.#status;
  }

  /** Current `InterruptStatus` register. */
  get interruptStatus(): number {
    return this.#interruptStatus;
  }

  /** Features both offered and accepted. */
  get negotiatedFeatures(): bigint {
    return this.#driverFeatures & this.#offered;
  }

  /** Whether work deferred by the budget is waiting for a later turn of the event loop. */
  get busy(): boolean {
    return this.#queues.some((q) => q.deferred !== undefined) || this.#restoreKick !== undefined;
  }

  /** Guest register read. Never throws. */
  read(offset: number, size: AccessSize, access?: Access): number {
    this.#reportPendingStop(access);
    if (offset >= MmioReg.Config) return this.#guard(() => this.#dev.readConfig(offset - MmioReg.Config, size), 0);
    if (size !== 4) {
      this.stats.ignoredAccesses++;
      return 0;
    }
    const q = this.#queues[this.#queueSel];
    switch (offset) {
      case MmioReg.MagicValue: return VIRTIO_MMIO_MAGIC;
      case MmioReg.Version: return VIRTIO_MMIO_VERSION;
      case MmioReg.DeviceId: return this.#dev.deviceId;
      case MmioReg.VendorId: return VIRTIO_VENDOR_ID;
      case MmioReg.DeviceFeatures:
        return this.#deviceFeaturesSel > 1 ? 0 : Number((this.#offered >> BigInt(32 * this.#deviceFeaturesSel)) & 0xffffffffn);
      case MmioReg.QueueNumMax: return q === undefined ? 0 : (this.#dev.queueMaxSizes[this.#queueSel] ?? 0);
      case MmioReg.QueueReady: return q?.ready === true ? 1 : 0;
      case MmioReg.InterruptStatus: return this.#interruptStatus;
      case MmioReg.Status: return this.#status;
      case MmioReg.ConfigGeneration: return this.#configGeneration;
      default:
        this.stats.ignoredAccesses++;
        return 0;
    }
  }

  /** Guest register write. Never throws; a host bug in a device model becomes a `device-error` stop. */
  write(offset: number, value: number, size: AccessSize, access?: Access): void {
    this.#reportPendingStop(access);
    if (offset >= MmioReg.Config) {
      this.#guard(() => this.#dev.writeConfig(offset - MmioReg.Config, value, size), undefined, access);
      return;
    }
    if (size !== 4) {
      this.stats.ignoredAccesses++;
      return;
    }
    const v = value >>> 0;
    switch (offset) {
      case MmioReg.DeviceFeaturesSel: this.#deviceFeaturesSel = v; return;
      case MmioReg.DriverFeaturesSel: this.#driverFeaturesSel = v; return;
      case MmioReg.DriverFeatures:
        if (this.#status & Status.FeaturesOk || this.#driverFeaturesSel > 1) this.stats.ignoredAccesses++;
        else this.#driverFeatures = setHalf(this.#driverFeatures, this.#driverFeaturesSel as 0 | 1, v);
        return;
      case MmioReg.QueueSel: this.#queueSel = v; return;
      case MmioReg.QueueNum: this.#queueField((q) => { q.num = v; }); return;
      case MmioReg.QueueDescLow: this.#queueField((q) => { q.desc = setHalf(q.desc, 0, v); }); return;
      case MmioReg.QueueDescHigh: this.#queueField((q) => { q.desc = setHalf(q.desc, 1, v); }); return;
      case MmioReg.QueueDriverLow: this.#queueField((q) => { q.driver = setHalf(q.driver, 0, v); }); return;
      case MmioReg.QueueDriverHigh: this.#queueField((q) => { q.driver = setHalf(q.driver, 1, v); }); return;
      case MmioReg.QueueDeviceLow: this.#queueField((q) => { q.device = setHalf(q.device, 0, v); }); return;
      case MmioReg.QueueDeviceHigh: this.#queueField((q) => { q.device = setHalf(q.device, 1, v); }); return;
      case MmioReg.QueueReady: this.#setQueueReady(v === 1); return;
      case MmioReg.QueueNotify: this.#notify(v, access); return;
      case MmioReg.InterruptAck:
        this.#interruptStatus &= ~v;
        this.#updateIrq();
        return;
      case MmioReg.Status: this.#writeStatus(v & 0xff, access); return; // only 8 status bits exist
      default:
        this.stats.ignoredAccesses++;
    }
  }

  /** Device reset, as if the driver wrote 0 to `Status`. */
  reset(): void {
    this.#status = 0;
    this.#deviceFeaturesSel = 0;
    this.#driverFeaturesSel = 0;
    this.#driverFeatures = 0n;
    this.#queueSel = 0;
    this.#interruptStatus = 0;
    this.#cancelDeferred();
    this.#queues = this.#dev.queueMaxSizes.map(newQueue);
    this.#dev.reset();
    this.#updateIrq();
  }

  /** Transport and device-model state as JSON. */
  snapshot(): unknown {
    return {
      version: 1,
      status: this.#status,
      deviceFeaturesSel: this.#deviceFeaturesSel,
      driverFeaturesSel: this.#driverFeaturesSel,
      driverFeatures: encodeU64(this.#driverFeatures),
      queueSel: this.#queueSel,
      interruptStatus: this.#interruptStatus,
      configGeneration: this.#configGeneration,
      queues: this.#queues.map((q) => ({
        num: q.num, ready: q.ready, desc: encodeU64(q.desc), driver: encodeU64(q.driver), device: encodeU64(q.device),
        lastAvail: q.lastAvail, usedIdx: q.usedIdx,
      })),
      device: this.#dev.snapshot(),
    };
  }

  /** Restores {@link VirtioMmio.snapshot} output; throws `SnapshotFormatError` on a bad shape. */
  restore(state: unknown): void {
    const r = new SnapshotReader(this.name, state, 1);
    const u32 = 0xffffffff;
    const top = {
      status: r.int('status', 0, 0xff), dfs: r.int('deviceFeaturesSel', 0, u32), drfs: r.int('driverFeaturesSel', 0, u32),
      driverFeatures: r.u64('driverFeatures'), queueSel: r.int('queueSel', 0, u32), isr: r.int('interruptStatus', 0, 3),
      gen: r.int('configGeneration', 0, u32),
    };
    const raw = r.raw('queues');
    if (!Array.isArray(raw) || raw.length !== this.#queues.length) {
      throw new SnapshotFormatError(`${this.name}: field 'queues' must be an array of ${this.#queues.length} queues`);
    }
    const queues = raw.map((q: unknown, i) => {
      const qr = new SnapshotReader(`${this.name}.queues[${i}]`, q);
      return {
        num: qr.int('num', 0, u32), ready: qr.bool('ready'), desc: qr.u64('desc'), driver: qr.u64('driver'), device: qr.u64('device'),
        lastAvail: qr.int('lastAvail', 0, 0xffff), usedIdx: qr.int('usedIdx', 0, 0xffff), vq: undefined,
      } satisfies QueueRegs;
    });
    this.#dev.restore(r.raw('device'));
    this.#status = top.status;
    this.#deviceFeaturesSel = top.dfs;
    this.#driverFeaturesSel = top.drfs;
    this.#driverFeatures = top.driverFeatures;
    this.#queueSel = top.queueSel;
    this.#interruptStatus = top.isr;
    this.#configGeneration = top.gen;
    this.#cancelDeferred();
    this.#queues = queues;
    for (let i = 0; i < queues.length; i++) if (queues[i]?.ready === true) this.#activateQueue(i);
    this.#updateIrq();
    // Chains a budget left for later at snapshot time are still in the avail ring, but the
    // driver already kicked for them and will not again: kick the device model once.
    this.#restoreKick = setImmediate(() => {
      this.#restoreKick = undefined;
      if (!this.#isActive()) return;
      this.#queues.forEach((q, i) => {
        if (q.vq !== undefined) this.#guard(() => this.#dev.notify(i), undefined);
      });
    });
  }

  /** Drops deferred work and closes the device model's host resources. */
  /** Delivers output the device model still buffers (`Device.flush`). */
  flush(): void {
    this.#dev.flush?.();
  }

  close(): void {
    this.#cancelDeferred();
    this.#dev.close?.();
  }

  #context(): VirtioContext {
    const self = this;
    return {
      memory: this.#mem,
      get features(): bigint {
        return self.negotiatedFeatures;
      },
      get active(): boolean {
        return self.#isActive();
      },
      processQueue: (index, handler, hasWork) => this.#guard(() => this.#process(index, handler, hasWork), 0),
      configChanged: () => {
        this.#configGeneration = (this.#configGeneration + 1) >>> 0;
        this.#raise(Interrupt.ConfigChange);
      },
    };
  }

  #isActive(): boolean {
    return (this.#status & (Status.DriverOk | Status.DeviceNeedsReset | Status.Failed)) === Status.DriverOk;
  }

  #process(index: number, handler: ChainHandler, hasWork?: () => boolean): number {
    const q = this.#queues[index];
    if (q?.vq === undefined || !this.#isActive()) return 0;
    if (q.deferred !== undefined) {
      // A continuation is scheduled: it does this work too, so kicks cannot buy extra budget.
      q.deferred.handler = handler;
      q.deferred.hasWork = hasWork;
      return 0;
    }
    return this.#spend(index, q.vq, handler, hasWork);
  }

  /** Handles chains until the queue is empty, `hasWork` says no, or the budget is spent (then defers). */
  #spend(index: number, vq: SplitVirtqueue, handler: ChainHandler, hasWork: (() => boolean) | undefined): number {
    const b = this.#budget;
    const bytes0 = this.#mem.bytesMoved;
    let handled = 0;
    let descriptors = 0;
    try {
      while (hasWork === undefined || hasWork()) {
        if (handled >= b.chains || descriptors >= b.descriptors || this.#mem.bytesMoved - bytes0 >= b.bytes) {
          if (vq.pending() > 0) this.#defer(index, handler, hasWork);
          break;
        }
        const chain = vq.pop();
        if (chain === undefined) break;
        descriptors += chain.descriptors;
        const len = handler(chain);
        vq.pushUsed(chain.head, len);
        handled++;
      }
    } finally {
      // Chains completed before a fault are still returned and signalled.
      if (handled > 0 && this.#isActive() && vq.shouldSignal()) this.#raise(Interrupt.UsedBuffer);
    }
    return handled;
  }

  #defer(index: number, handler: ChainHandler, hasWork: (() => boolean) | undefined): void {
    const q = this.#queues[index];
    if (q === undefined) return;
    this.stats.deferrals++;
    q.deferred = { handler, hasWork, timer: setImmediate(() => this.#resume(index, q)) };
  }

  #resume(index: number, q: QueueRegs): void {
    const d = q.deferred;
    q.deferred = undefined;
    // The queue may have been reset, disabled or replaced (restore) since.
    if (d === undefined || this.#queues[index] !== q || q.vq === undefined || !this.#isActive()) return;
    const vq = q.vq;
    this.#guard(() => this.#spend(index, vq, d.handler, d.hasWork), 0);
  }

  #cancelDeferred(): void {
    for (const q of this.#queues) {
      if (q.deferred !== undefined) clearImmediate(q.deferred.timer);
      q.deferred = undefined;
    }
    if (this.#restoreKick !== undefined) clearImmediate(this.#restoreKick);
    this.#restoreKick = undefined;
  }

  #reportPendingStop(access: Access | undefined): void {
    if (this.#pendingStop === undefined || access === undefined) return;
    access.requestStop(this.#pendingStop);
    this.#pendingStop = undefined;
  }

  /** Runs guest-driven work: guest faults → NEEDS_RESET; host bugs → a `device-error` stop. */
  #guard<T>(fn: () => T, fallback: T, access?: Access): T {
    try {
      return fn();
    } catch (e) {
      if (e instanceof TsvmError) {
        this.#needsReset(e);
      } else {
        const err = e instanceof Error ? e : new TsvmError('TSVM_DEVICE', `device threw a non-Error: ${String(e)}`);
        this.#needsReset(err);
        const stop: DeviceStopRequest = { reason: 'device-error', device: this.name, message: err.message };
        // Outside an exit (deferred work) there is no one to ask; the next access reports it.
        if (access !== undefined) access.requestStop(stop);
        else this.#pendingStop ??= stop;
      }
      return fallback;
    }
  }

  #needsReset(error: Error): void {
    this.lastError = error;
    this.stats.needsReset++;
    if (this.#status & Status.DeviceNeedsReset) return;
    this.#status |= Status.DeviceNeedsReset;
    this.#raise(Interrupt.ConfigChange);
    this.#onError?.(error);
  }

  #queueField(set: (q: QueueRegs) => void): void {
    const q = this.#queues[this.#queueSel];
    // The layout of a live queue must not change under the device (2.6.1.1: driver MUST NOT).
    if (q === undefined || q.ready) {
      this.stats.ignoredAccesses++;
      return;
    }
    set(q);
  }

  #setQueueReady(ready: boolean): void {
    const q = this.#queues[this.#queueSel];
    if (q === undefined) {
      this.stats.ignoredAccesses++;
      return;
    }
    if (!ready) {
      q.ready = false;
      q.vq = undefined;
      if (q.deferred !== undefined) clearImmediate(q.deferred.timer);
      q.deferred = undefined;
      return;
    }
    if (q.ready) return;
    const max = this.#dev.queueMaxSizes[this.#queueSel] ?? 0;
    if (q.num === 0 || q.num > max || (q.num & (q.num - 1)) !== 0) {
      this.#needsReset(new VirtqueueError(`queue ${this.#queueSel}: size ${q.num} is not a power of two in [1, ${max}]`));
      return;
    }
    q.ready = true;
    q.lastAvail = 0;
    q.usedIdx = 0;
    this.#activateQueue(this.#queueSel);
  }

  #activateQueue(index: number): void {
    const q = this.#queues[index];
    if (q === undefined) return;
    const layout = {
      size: q.num, desc: q.desc, driver: q.driver, device: q.device,
      indirect: (this.negotiatedFeatures & Feature.RingIndirectDesc) !== 0n,
      eventIdx: (this.negotiatedFeatures & Feature.RingEventIdx) !== 0n,
    };
    const why = SplitVirtqueue.validateLayout(this.#mem, layout);
    if (why !== undefined) {
      q.ready = false;
      q.vq = undefined;
      this.#needsReset(new VirtqueueError(`queue ${index}: ${why}`));
      return;
    }
    q.vq = new SplitVirtqueue(this.#mem, layout, q);
  }

  #notify(index: number, access?: Access): void {
    const q = this.#queues[index];
    if (!this.#isActive() || q?.vq === undefined) {
      this.stats.ignoredNotifies++;
      return;
    }
    this.#guard(() => this.#dev.notify(index), undefined, access);
  }

  #writeStatus(v: number, access?: Access): void {
    if (v === 0) {
      this.#guard(() => this.reset(), undefined, access);
      return;
    }
    const old = this.#status;
    let next = (v & ~Status.DeviceNeedsReset) | (old & Status.DeviceNeedsReset);
    if (next & Status.FeaturesOk && !(old & Status.FeaturesOk)) {
      const unknown = this.#driverFeatures & ~this.#offered;
      if (unknown !== 0n || !(this.#driverFeatures & Feature.Version1)) next &= ~Status.FeaturesOk;
    }
    this.#status = next;
    if (next & Status.DriverOk && !(old & Status.DriverOk)) {
      if (!(next & Status.FeaturesOk)) {
        this.#needsReset(new VirtqueueError('DRIVER_OK set without FEATURES_OK'));
        return;
      }
      // Queues made ready before FEATURES_OK was known are rebuilt with the final ring features.
      for (let i = 0; i < this.#queues.length; i++) if (this.#queues[i]?.ready === true) this.#activateQueue(i);
      if (this.#dev.activate !== undefined) this.#guard(() => this.#dev.activate?.(), undefined, access);
    }
  }

  #raise(bit: number): void {
    this.#interruptStatus |= bit;
    this.#updateIrq();
  }

  #updateIrq(): void {
    const level = this.#interruptStatus !== 0;
    if (level !== this.#irqLevel) {
      this.#irqLevel = level;
      this.#irq?.set(level);
    }
  }
}
