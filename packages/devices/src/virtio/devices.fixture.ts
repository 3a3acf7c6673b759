// Test-only: wires a device model to a transport and an initialised test driver.
import { RecordingIrq, testGuestMemory } from '../testing/fakes.js';
import { VirtioMmioTestDriver } from '../testing/virtio-driver.js';
import type { VirtioDevice } from './device.js';
import { VirtioMmio } from './mmio.js';

export function attach<D extends VirtioDevice>(device: D, init = true) {
  const memory = testGuestMemory(4 << 20);
  const irq = new RecordingIrq();
  const transport = new VirtioMmio({ device, memory, irq });
  const drv = new VirtioMmioTestDriver(transport, memory);
  if (init) drv.init();
  return { device, memory, irq, transport, drv };
}
