/**
 * `@tsvm/kvm-backend/raw` — the ABI layer under the typed wrappers, for tests and benchmarks
 * that need to fabricate a `kvm_run` page: the layout offsets checked against `<linux/kvm.h>`
 * and the exit decoder itself. Programs use `KvmVcpu.run()`; nothing here hands out a view of
 * a live mapping.
 * @module
 */
export { KVM_RUN_OFFSETS } from './structs.js';
export { KVM, KVM_CAP, KVM_CONST, KVM_EXIT } from './ioctls.js';
export { decodeExit, Pending, type PendingAnswer } from '../exit.js';
