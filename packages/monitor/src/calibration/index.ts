/**
 * `@tsvm/monitor/calibrate` — measuring this host: which mechanism works at which CPL and what
 * one event costs (`calibrate()`, `remeasure()`), and the cache those tables live in. A subpath
 * of its own because it creates machines, runs guests and (without `/dev/kvm`) falls back to the
 * mock backend: importing the monitor does none of that.
 * @module
 */
export { calibrate, remeasure, measureHookDispatch, runCostMs, type CalibrateOptions, type RemeasureOptions } from './calibrate.js';
export { loadCalibration, saveCalibration, validateTable, defaultCachePath } from './cache.js';
export { ExitTimer } from './exit-timer.js';
