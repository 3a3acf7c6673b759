/**
 * Test helpers for `@tsvm/devices`: a recording access context and IRQ line, a RAM-only
 * `GuestMemory`, and a guest-side virtio-mmio driver that builds (also malicious) virtqueues.
 * Import from `@tsvm/devices/testing`; not part of the runtime API.
 * @module
 */
export { recordingAccess, RecordingIrq, testGuestMemory, type RecordingAccess } from './fakes.js';
export {
  VirtioMmioTestDriver,
  TestQueue,
  TRANSPORT_FEATURES,
  type RawDescriptor,
  type TestBuffer,
  type TestDriverInit,
  type UsedEntry,
} from './virtio-driver.js';
