/**
 * `tsvm policy check FILE`: schema-check a port/MSR policy (`compilePolicy`) or a flow policy
 * (`compileFlowPolicy`) with the monitor's own validators, whose errors name the JSON path; for a
 * flow policy with a topology (`--topology`, or a file holding `{ "policy", "topology" }`), also
 * the analysis findings (rules that never match, shadowed or contradicted rules).
 * @module
 */
import { readFileSync } from 'node:fs';
import { analyzeFlows, compileFlowPolicy, compilePolicy, PolicyConflictError, PolicyError, type RuleFinding } from '@tsvm/monitor';
import { CliError, EXIT } from './exit-codes.js';

/** A policy file, parsed and told apart. */
export interface PolicyFile {
  /** `port`: a monitor policy (`event` rules); `flow`: a flow policy (`source`/`destination` rules). */
  readonly kind: 'port' | 'flow';
  /** The policy document. */
  readonly doc: unknown;
  /** A topology given alongside in the same file (`{ "policy": ..., "topology": ... }`). */
  readonly topology?: unknown;
}

function readJson(path: string, what: string): unknown {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw new CliError(EXIT.noFile, `cannot read ${what} ${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`, { cause: e });
  }
  try {
    return JSON.parse(text) as unknown;
  } catch (e) {
    throw new CliError(EXIT.policyInvalid, `${path}: not JSON: ${(e as Error).message}`, { cause: e });
  }
}

const isObj = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);

/**
 * Which kind of policy a document is: a flow policy has `guards`/`lattice`, or rules with
 * `source`/`destination`; anything else is checked as a port/MSR policy (whose validator then
 * names what is wrong).
 */
export function policyKind(doc: unknown): 'port' | 'flow' {
  if (!isObj(doc)) return 'port';
  if ('guards' in doc || 'lattice' in doc) return 'flow';
  const rules = doc['rules'];
  return Array.isArray(rules) && rules.some((r) => isObj(r) && ('source' in r || 'destination' in r)) ? 'flow' : 'port';
}

/** Reads and validates a policy file. @throws CliError with `policyInvalid` naming the JSON path, or `noFile`. */
export function readPolicyFile(path: string): PolicyFile {
  const raw = readJson(path, 'policy');
  const wrapped = isObj(raw) && 'policy' in raw && 'topology' in raw;
  const doc = wrapped ? raw['policy'] : raw;
  const kind = policyKind(doc);
  try {
    if (kind === 'port') compilePolicy(doc);
    else compileFlowPolicy(doc);
  } catch (e) {
    if (e instanceof PolicyError || e instanceof PolicyConflictError) throw new CliError(EXIT.policyInvalid, `${path}: ${kind} policy: ${e.message}`, { cause: e });
    throw e;
  }
  return wrapped ? { kind, doc, topology: raw['topology'] } : { kind, doc };
}

/** What {@link checkPolicy} found. */
export interface PolicyCheck {
  /** Kind of policy. */
  readonly kind: 'port' | 'flow';
  /** Lines to print. */
  readonly lines: readonly string[];
  /** Analysis findings (flow policies with a topology). */
  readonly findings: readonly RuleFinding[];
}

/** Checks a policy file (and, for a flow policy, analyses it against a topology). */
export function checkPolicy(path: string, topologyPath?: string): PolicyCheck {
  const f = readPolicyFile(path);
  if (f.kind === 'port') {
    const c = compilePolicy(f.doc);
    return { kind: 'port', findings: [], lines: [`${path}: port/MSR policy OK: ${c.rules.length} rules, default ${c.default}, no overlaps`] };
  }
  const compiled = compileFlowPolicy(f.doc);
  const head = `${path}: flow policy OK: ${compiled.rules.length} rules, ${compiled.guards.size} guards, lattice ${compiled.lattice ? 'on' : 'off'}`;
  const topology = topologyPath === undefined ? f.topology : readJson(topologyPath, 'topology');
  if (topology === undefined) return { kind: 'flow', findings: [], lines: [head, '  (no topology: give --topology FILE to find rules that never match or are shadowed)'] };
  let findings: readonly RuleFinding[];
  try {
    findings = analyzeFlows(f.doc, topology).findings;
  } catch (e) {
    if (e instanceof PolicyError) throw new CliError(EXIT.policyInvalid, `${topologyPath ?? path}: ${e.message}`, { cause: e });
    throw e;
  }
  return {
    kind: 'flow', findings,
    lines: [head, findings.length === 0 ? '  analysis: no findings' : `  analysis: ${findings.length} finding(s)`, ...findings.map((x) => `  ${x.kind} ${x.rule}: ${x.message}`)],
  };
}
