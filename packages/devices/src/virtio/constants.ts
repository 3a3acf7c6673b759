/**
 * Numbers from the virtio 1.x specification (sections 2.1, 2.7 and 4.2.2) used by the MMIO
 * transport, the split virtqueue and the devices. Kept in one table so none is pasted twice.
 * @module
 */

/** `MagicValue` register: "virt" in little-endian ASCII. */
export const VIRTIO_MMIO_MAGIC = 0x74726976;
/** `Version` register of a modern (non-legacy) virtio-mmio device. */
export const VIRTIO_MMIO_VERSION = 2;
/** Our `VendorID`: "TSVM" in little-endian ASCII. */
export const VIRTIO_VENDOR_ID = 0x4d565354;

/** MMIO register offsets (virtio 1.x, 4.2.2). */
export const MmioReg = {
  MagicValue: 0x000,
  Version: 0x004,
  DeviceId: 0x008,
  VendorId: 0x00c,
  DeviceFeatures: 0x010,
  DeviceFeaturesSel: 0x014,
  DriverFeatures: 0x020,
  DriverFeaturesSel: 0x024,
  QueueSel: 0x030,
  QueueNumMax: 0x034,
  QueueNum: 0x038,
  QueueReady: 0x044,
  QueueNotify: 0x050,
  InterruptStatus: 0x060,
  InterruptAck: 0x064,
  Status: 0x070,
  QueueDescLow: 0x080,
  QueueDescHigh: 0x084,
  QueueDriverLow: 0x090,
  QueueDriverHigh: 0x094,
  QueueDeviceLow: 0x0a0,
  QueueDeviceHigh: 0x0a4,
  ConfigGeneration: 0x0fc,
  Config: 0x100,
} as const;

/** Device status bits (2.1). */
export const Status = {
  Acknowledge: 0x01,
  Driver: 0x02,
  DriverOk: 0x04,
  FeaturesOk: 0x08,
  DeviceNeedsReset: 0x40,
  Failed: 0x80,
} as const;

/** `InterruptStatus` bits. */
export const Interrupt = {
  UsedBuffer: 0x1,
  ConfigChange: 0x2,
} as const;

/** Transport feature bits (6). */
export const Feature = {
  RingIndirectDesc: 1n << 28n,
  RingEventIdx: 1n << 29n,
  Version1: 1n << 32n,
} as const;

/** Descriptor flags (2.7.5). */
export const DescFlag = {
  Next: 1,
  Write: 2,
  Indirect: 4,
} as const;

/** `avail.flags` bit: the driver does not want used-buffer interrupts (without EVENT_IDX). */
export const VIRTQ_AVAIL_F_NO_INTERRUPT = 1;

/** Size of one descriptor in bytes. */
export const DESC_SIZE = 16;

/** Virtio device IDs (5). */
export const DeviceId = {
  Block: 2,
  Console: 3,
  Entropy: 4,
} as const;
