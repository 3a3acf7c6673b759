export * from './device.js';
export * from './memory.js';
export * from './address.js';
export * from './errors.js';
