/**
 * One way to wrap a backend object: a Proxy that answers `overrides` itself and forwards every
 * other member to `target` (methods bound to it, once), so a wrapper cannot fall behind what
 * `target` offers — optional backend methods included. Used by restore (the image-backed VM,
 * the backend wrapper) and by record/replay's taps.
 * @module
 */

/** @internal `target` with the members in `overrides` replaced and every other member its own. */
export function forwarding<T extends object>(target: T, overrides: Partial<T>): T {
  const bound = new Map<PropertyKey, unknown>();
  return new Proxy(target, {
    get(t, key) {
      if (Object.hasOwn(overrides, key)) return (overrides as Record<PropertyKey, unknown>)[key];
      let f = bound.get(key);
      if (f === undefined) {
        const v = (t as Record<PropertyKey, unknown>)[key];
        f = typeof v === 'function' ? v.bind(t) : v;
        bound.set(key, f);
      }
      return f;
    },
  });
}
