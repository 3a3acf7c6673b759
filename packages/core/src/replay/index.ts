/**
 * Record and replay (single vCPU): record what a guest receives from the host at exit
 * boundaries, replay it from the base snapshot without the devices, under another monitor, and
 * get the first divergence named by exit number.
 * @module
 */
export { tappable, countsAsGuestExit } from './tap.js';
export { record, startRecording, rdtscTrapped, Recorder, type RecordOptions, type Recording } from './record.js';
export { replay, ReplayDivergence, type ReplayOptions, type ReplayResult } from './replay.js';
export {
  parseLog, encodeLog, snapshotDigest, REPLAY_FORMAT, REPLAY_VERSION,
  type ReplayLog, type LoggedExit, type LoggedDma, type LoggedIrq, type LoggedStop,
} from './log.js';
