/**
 * `@tsvm/monitor` — a reference monitor for tsvm machines, and the cost model that prices it.
 *
 * - {@link Monitor}: attach to a `Machine`, register hooks by *event* (`pio`, `mmio`, `msr`,
 *   `hypercall`, `exec`, `step`, `write-watch`, `halt`, `shutdown`, `any-exit`) as *mediate*
 *   (decide: {@link allow} / {@link deny} / {@link emulate}) or *observe* (see). The monitor picks
 *   the mechanism per hook from the host's capabilities and calibration ({@link Monitor.plan}),
 *   denies by default, and {@link Monitor.seal}s.
 * - Mechanisms: {@link selectMechanism}; VMM-side probes ({@link PatchBreakpoints}) where KVM guest
 *   debug does not work; {@link DebugUnit} where it does; read-only memslots and dirty logs for
 *   write-watching ({@link RegionFlags}).
 * - Policy as data: {@link compilePolicy} / {@link applyPolicy}.
 * - Audit: {@link AuditLog} (hash-chained JSON lines), {@link verifyAuditLog},
 *   `diagnostics_channel` {@link DECISION_CHANNEL}.
 * - Cost: `calibrate()`, `remeasure()` and `ExitTimer` (`@tsvm/monitor/calibrate`; need `/dev/kvm`), {@link assumedTable}, {@link predict},
 *   {@link report}; rows for `console.table` ({@link planRows}, {@link costRows}), text ({@link formatPlan}, {@link formatReport}),
 *   {@link renderJson}, and an SVG of predicted vs measured overhead ({@link renderSvg}, {@link renderChart}).
 * - Debugging: {@link gdbServer}, a gdb remote stub on a TCP port.
 * - Decoding: {@link formatInstructionAt}, {@link formatInstruction}, {@link successors} (iced-x86).
 * @module
 */
export { Monitor, type MonitorOptions, type HookOptions, type HookHandle, type PlanEntry, type MonitorHookStats, type CpuidOverride } from './monitor.js';
export { allow, deny, emulate, type Decision, type HookContext, type MediateFn, type ObserveFn } from './decisions.js';
export {
  HYPERCALL_PORT, EVENT_NAMES, normaliseSpec, describeSpec, specsOverlap,
  type EventSpec, type EventName, type MonitorEvent, type NormalSpec, type Span,
  type PioSpec, type MmioSpec, type MsrSpec, type CpuidSpec, type HypercallSpec, type ExecSpec, type StepSpec, type WriteWatchSpec, type HaltSpec, type ShutdownSpec, type AnyExitSpec,
} from './events.js';
export type { InternalEnv } from './internal-hooks.js';
export type { HookRecord, PipelineEnv } from './records.js';
export { selectMechanism, type Selection, type SelectionInput } from './mechanisms.js';
export { MechanismUnavailableError, PolicyError, PolicyConflictError, MediationBypassError } from './errors.js';
export { PatchBreakpoints, PROBE_PORT, type TrapKind, type BreakpointTarget, type CpuAccess, type PatchStats } from './probe.js';
export { DebugUnit, GUESTDBG, type DebugCause, type DebugTarget } from './debug-unit.js';
export { RegionFlags, dirtyPageAddresses } from './write-watch.js';
/**
 * A gdb remote stub (`gdb/`): {@link gdbServer} — registers, memory (the code under the monitor's
 * traps, {@link Monitor.readOriginal}), breakpoints as the monitor's exec hooks, emulated
 * single-step, continue, Ctrl-C, detach. Core's `Machine` has no `gdb()`: core does not depend on the monitor.
 */
export { gdbServer, type GdbServer, type GdbServerOptions, type GdbServerEvents } from './gdb/server.js';
export { formatInstructionAt, formatInstruction, explainInternalError, decodeBytes, successors, readCode, type DecodedInstruction, type Successors, type MachineView, type ReadPointer } from './decode.js';
/** Re-exported from `@tsvm/core` (where the page walk lives: core's stops and the I/O-exit RIP helper need it). */
export { translateVirtual, bitnessOf, linearRip } from '@tsvm/core';
export { compilePolicy, applyPolicy, type Policy, type PolicyRule, type RuleEvent, type CompiledRule, type JsonInt } from './policy.js';
export { AuditLog, verifyAuditLog, DECISION_CHANNEL, decisionChannel, GENESIS, type AuditEntry, type AuditLine, type AuditSink, type AuditVerification } from './audit.js';
export { MECHANISMS, assumedTable, priceOf, resultOf, type CalibrationTable, type MechanismId, type MechanismResult, type HostIdentity, type Cpl } from './calibration/table.js';
export { hostIdentity, hostKey, cpuModel } from './calibration/host.js';
// Measuring the host (calibrate, remeasure, the cache) is `@tsvm/monitor/calibrate`.
export { predict, report, baselineNs, type Prediction, type HookPrediction, type CostReport, type HookCost, type RunTime, type Alternative } from './cost/model.js';
export { renderTable, renderJson, renderSvg, reportChart, formatNs, formatOverhead, planRows, costRows, textTable, formatPlan, formatReport, type PlanRow, type CostRow } from './cost/render.js';
export { renderChart, chartUnit, CHART, type CostChart, type ChartRow, type ChartSpread } from './cost/chart.js';
/**
 * Information flow between machines (`flow/`): labels, a qrexec-style flow policy with a lattice
 * rule, guards, the {@link FlowMonitor}, {@link analyzeFlows}, {@link explain}, {@link learnPolicy}.
 */
export { PUBLIC, makeLabel, canFlow, latticeGap, declassify, hasTag, formatLabel, type Label, type LatticeGap } from './flow/labels.js';
export {
  compileFlowPolicy, compileTopology, matchesPattern, ruleMismatch, DEFAULT_GUARD_TIMEOUT_MS,
  type FlowPolicy, type FlowRule, type FlowAction, type GuardDeclaration, type Topology, type PrincipalSpec, type SwitchSpec, type Principal,
  type CompiledFlowPolicy, type CompiledFlowRule, type CompiledGuard, type CompiledTopology, type ConnectRequest,
} from './flow/policy.js';
export { evaluateConnect, latticeRefusal, type ConnectEvaluation, type TraceStep } from './flow/evaluate.js';
export { runGuard, type GuardFn, type GuardVerdict, type GuardContext, type GuardOutcome } from './flow/guards.js';
export {
  FlowMonitor, type FlowMonitorOptions, type FlowConnection, type ConnectDecision, type MessageDecision, type FlowDirection,
  type ObservedFlow, type FlowStats, type FlowAuditEntry, type AskFn,
} from './flow/monitor.js';
export { explain } from './flow/explain.js';
export { FlowCostMeter, type FlowCostReport, type FlowCostRow } from './flow/costs.js';
export {
  calibrateFlowCosts, predictFlowCosts, withPredictions, checkFlowCostModel,
  type FlowCostModel, type FlowTraffic, type FlowCostPrediction, type FlowCostPredictionRow, type PredictFlowOptions, type CalibrateFlowOptions,
} from './flow/predict.js';
export { renderFlowSvg } from './flow/svg.js';
export { analyzeFlows, renderFlowDot, type FlowAnalysis, type FlowEdge, type FlowPath, type TagReach, type RuleFinding, type AnalyzeOptions } from './flow/analysis.js';
export { learnPolicy, type LearnOptions, type LearnedPolicy, type UnresolvedFlow } from './flow/learning.js';
/** L2 frames through the flow monitor (the `FrameMediator` of `@tsvm/devices`' `VirtualSwitch`). */
export { type FrameRequest } from './flow/monitor.js';
