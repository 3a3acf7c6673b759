/**
 * Where a device wants to be mapped. Every device class exposes `mappings()` so that a machine
 * can attach it without knowing its ports: `machine.attachDevice(device)`.
 * The object to snapshot/reset is the device itself; a mapping's `device` may be a thin view
 * of it (see `I8042`, whose two ports are not contiguous). The type lives in core (the bus's
 * registration shape) and is re-exported here for convenience.
 * @module
 */
export type { DeviceMapping } from '@tsvm/core';
