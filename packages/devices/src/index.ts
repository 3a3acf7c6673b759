/**
 * `@tsvm/devices` — the devices a tsvm machine can attach. Each is a register file
 * (`Device` from `@tsvm/core`) whose side effects go through injected interfaces: an `IrqLine`,
 * an output sink, `GuestMemory`, a clock, an entropy source. Each exposes `mappings()` (where it
 * wants to live on the PIO/MMIO bus) and its default ports/IRQ as static fields, supports
 * `reset()`, and JSON `snapshot()`/`restore()`.
 *
 * Legacy PC devices: {@link Uart16550} (COM1), {@link DebugExit} (QEMU isa-debug-exit),
 * {@link I8042} (reset via 0xFE), {@link CmosRtc}, {@link AcpiPm} (ACPI PM timer and S3/S5 sleep
 * states, for the FADT of `writeAcpiTables({ power })`), and {@link Unpopulated} ranges (absent
 * hardware a guest probes for, attached deliberately: reads all ones, writes dropped).
 *
 * Virtio: the {@link VirtioMmio} transport (virtio 1.x, split queues, hardened against hostile
 * drivers) and the models behind it: {@link VirtioConsole}, {@link VirtioBlock}, {@link VirtioRng}.
 * Test helpers live in `@tsvm/devices/testing`.
 * @module
 */

// Plumbing shared by devices
export type { DeviceMapping } from './mapping.js';
export { OutputBuffer, type OutputBufferOptions, type OutputSink, type ByteReadable, type ByteWritable } from './stream-io.js';

// Legacy PC devices
export { Uart16550, type Uart16550Options, type Uart16550State } from './uart16550.js';
export { DebugExit, type DebugExitOptions } from './debug-exit.js';
export { I8042, type I8042Operand, type I8042Options, type I8042State } from './i8042.js';
export { CmosRtc, hostClock, fixedClock, hostPreciseClock, RTC_UIP_WINDOW_NS, type Clock, type PreciseClock, type CmosRtcOptions, type CmosRtcState } from './cmos-rtc.js';
export { Unpopulated, PC_PROBED_RANGES, type UnpopulatedRange } from './unpopulated.js';

// ACPI fixed hardware (PM timer, PM1 event/control, S3/S5) behind `writeAcpiTables({ power })`
export {
  AcpiPm,
  hostMonotonicClock,
  PM_TIMER_HZ,
  Pm1Event,
  Pm1Control,
  type MonotonicClock,
  type AcpiPmOptions,
  type AcpiPmState,
  type AcpiPmStats,
} from './acpi-pm.js';

// Virtio transport and queues
export { VirtioMmio, type VirtioMmioOptions, type VirtioMmioStats } from './virtio/mmio.js';
export { DEFAULT_VIRTIO_BUDGET, type VirtioBudget } from './virtio/budget.js';
export type { VirtioDevice, VirtioContext, ChainHandler } from './virtio/device.js';
export { readConfigBytes } from './virtio/device.js';
export {
  SplitVirtqueue,
  VirtqueueError,
  MAX_INDIRECT_ENTRIES,
  type DescriptorChain,
  type Segment,
  type QueueLayout,
  type QueuePosition,
} from './virtio/virtqueue.js';
export { ChainReader, ChainWriter, CHAIN_IO_CHUNK } from './virtio/chain-io.js';
export {
  VIRTIO_MMIO_MAGIC,
  VIRTIO_MMIO_VERSION,
  VIRTIO_VENDOR_ID,
  MmioReg,
  Status as VirtioStatus,
  Interrupt as VirtioInterrupt,
  Feature as VirtioFeature,
  DescFlag,
  DeviceId as VirtioDeviceId,
} from './virtio/constants.js';

// Virtio device models
export { VirtioConsole, VIRTIO_CONSOLE_F_EMERG_WRITE, type VirtioConsoleOptions } from './virtio/console.js';
export {
  VirtioBlock,
  BlockFeature,
  BlockRequest,
  BlockStatus,
  BLOCK_ID_BYTES,
  SECTOR_SIZE,
  type VirtioBlockOptions,
} from './virtio/block.js';
export { MemoryBacking, FileBacking, type BlockBacking } from './virtio/block-backing.js';
export { VirtioRng, hostEntropy, MAX_ENTROPY_PER_REQUEST, type EntropySource, type VirtioRngOptions } from './virtio/rng.js';

// virtio-vsock and its host-side router (channels between machines)
export {
  VirtioVsock,
  VsockOp,
  VsockShutdown,
  VSOCK_DEVICE_ID,
  VSOCK_HEADER_SIZE,
  VSOCK_MAX_PAYLOAD,
  VSOCK_HOST_CID,
  VSOCK_TYPE_STREAM,
  VSOCK_TYPE_SEQPACKET,
  VSOCK_F_SEQPACKET,
  VSOCK_SEQ_EOM,
  VSOCK_SEQ_EOR,
  encodeVsockHeader,
  decodeVsockHeader,
  type VirtioVsockOptions,
  type VsockPacket,
  type VsockUplink,
  type VsockDeviceStats,
  type VsockDropReason,
} from './virtio/vsock.js';
export {
  VsockRouter,
  allowAllMediator,
  type VsockRouterOptions,
  type VsockRouterStats,
  type VsockMediator,
  type VsockConnectRequest,
  type VsockConnectVerdict,
  type VsockMessageVerdict,
  type VsockHostStream,
  type DisposableLease,
  type DisposableProvider,
  type DisposableEndpointOptions,
} from './net/vsock-router.js';
/** Disposable endpoints served by forks of a snapshot (one fresh machine per connection). */
export { forkEndpoint, type ForkEndpoint, type ForkEndpointOptions, type ForkEndpointStats } from './net/disposable.js';
/** Driver side of a vsock device without a guest, for tests and host-level demos. */
export { VsockTestGuest, openVsockPair, type VsockTestGuestOptions } from './net/vsock-test-guest.js';

// virtio-net and its host-side L2 switch (frames between machines)
export {
  VirtioNet,
  NetFeature,
  NET_DEVICE_ID,
  NET_HEADER_SIZE,
  NET_HDR_F_NEEDS_CSUM,
  NET_HDR_GSO_NONE,
  NET_S_LINK_UP,
  ETHERNET_HEADER_SIZE,
  VLAN_TAG_SIZE,
  DEFAULT_MTU,
  parseMac,
  formatMac,
  maxFrameSize,
  type MacAddress,
  type VirtioNetOptions,
  type NetUplink,
  type NetDeviceStats,
  type NetDropReason,
} from './virtio/net.js';
export {
  VirtualSwitch,
  allowAllFrames,
  type VirtualSwitchOptions,
  type SwitchPortOptions,
  type SwitchPortStats,
  type SwitchStats,
  type SwitchDropReason,
  type SwitchFrame,
  type FrameVerdict,
  type FrameMediator,
  type HostPort,
} from './net/switch.js';
/** Driver side of a virtio-net card without a guest, for tests, host-level demos and benchmarks. */
export { NetTestGuest, ethernetFrame, BROADCAST_MAC, type NetTestGuestOptions, type ReceivedFrame } from './net/net-test-guest.js';
