/**
 * Guest virtual → guest-physical translation by walking the guest's page tables from the host.
 * The walk lives in `@tsvm/core` (its stops carry the code at RIP); re-exported here for the
 * monitor's exec hooks, which are keyed by guest-physical address.
 * @module
 */
export { bitnessOf, linearRip, translateVirtual } from '@tsvm/core';
