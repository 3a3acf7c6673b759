/**
 * Labels in the style of DIFC systems (Flume, HiStar): a set of *secrecy* tags (what the data may
 * not be shown to) and a set of *integrity* tags (what the data vouches for). Information may
 * flow from `a` to `b` only if it does not lower secrecy (every secrecy tag of `a` is on `b`) and
 * does not raise integrity (every integrity tag of `b` is on `a`). Only a guard may lift a
 * secrecy tag off a message (declassification), and only one the policy names.
 * @module
 */

/** A label: two sets of tag names. Kept as sorted arrays so labels are JSON and compare cheaply. */
export interface Label {
  /** Secrecy tags, sorted, unique. */
  readonly secrecy: readonly string[];
  /** Integrity tags, sorted, unique. */
  readonly integrity: readonly string[];
}

/** The empty label: public data that vouches for nothing. */
export const PUBLIC: Label = Object.freeze({ secrecy: Object.freeze([]), integrity: Object.freeze([]) });

/** Builds a label from tag lists (duplicates removed, sorted). */
export function makeLabel(secrecy: Iterable<string> = [], integrity: Iterable<string> = []): Label {
  return { secrecy: [...new Set(secrecy)].sort(), integrity: [...new Set(integrity)].sort() };
}

/** What keeps a flow from `from` to `to` from being allowed by the lattice rule. */
export interface LatticeGap {
  /** Secrecy tags of `from` that `to` lacks (the flow would lower them). */
  readonly secrecy: readonly string[];
  /** Integrity tags of `to` that `from` lacks (the flow would raise them). */
  readonly integrity: readonly string[];
}

/** The tags that stop `from` → `to` under the lattice rule; both lists empty means allowed. */
export function latticeGap(from: Label, to: Label): LatticeGap {
  return {
    secrecy: from.secrecy.filter((t) => !to.secrecy.includes(t)),
    integrity: to.integrity.filter((t) => !from.integrity.includes(t)),
  };
}

/** Whether the lattice rule allows information labelled `from` to reach a holder labelled `to`. */
export function canFlow(from: Label, to: Label): boolean {
  const g = latticeGap(from, to);
  return g.secrecy.length === 0 && g.integrity.length === 0;
}

/** `label` with the secrecy tags in `tags` removed (what a declassifying guard does to a message). */
export function declassify(label: Label, tags: readonly string[]): Label {
  return { secrecy: label.secrecy.filter((t) => !tags.includes(t)), integrity: label.integrity };
}

/** Whether `label` carries `tag` as a secrecy or an integrity tag. */
export function hasTag(label: Label, tag: string): boolean {
  return label.secrecy.includes(tag) || label.integrity.includes(tag);
}

/** Short human form: `{s: key,pii; i: signed}`. */
export function formatLabel(label: Label): string {
  return `{s: ${label.secrecy.join(',') || '-'}; i: ${label.integrity.join(',') || '-'}}`;
}
