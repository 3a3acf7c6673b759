/**
 * `@tsvm/core/testing` — what tests need: a {@link MockBackend} that replays scripted exits,
 * inline assembly ({@link asm}), and {@link kvmAvailability} for suites that need `/dev/kvm`.
 * @module
 */
export { MockBackend, MockVcpu, MockVm, MockRunners, outExit, inExit, mmioExit, type MockStep } from './mock.js';
/** Re-exported from `@tsvm/core/asm` for tests. */
export { asm, type AsmOptions } from '../asm.js';
export { kvmAvailability, type KvmAvailability } from './kvm-gate.js';
export { loadSmpGuest, expectedSum, SMP_GUEST } from '../machine/smp-guest.js';
export { replayGuestSource, attachReplayDevices, REPLAY_GUEST_LOOP } from './replay-guest.js';
