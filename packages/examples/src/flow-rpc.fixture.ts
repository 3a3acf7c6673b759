/**
 * What the real-guest flow tests share: a client (CID 3) and a server (CID 4), one `rpc` rule
 * to the server's port 80 (through a `scan` guard that declassifies nothing, when asked), and
 * the stop of a guest as its debug-exit code or its reason.
 * @module
 */
import type { Stop } from '@tsvm/core';
import type { FlowPolicy, Topology } from '@tsvm/monitor';

/** Client and server machines, unlabelled. */
export const rpcTopology: Topology = { version: 1, principals: { client: { kind: 'machine', cid: 3 }, server: { kind: 'machine', cid: 4 } } };

/** Client → server:80 allowed, through the `scan` guard when `guard`. */
export const rpcPolicy = (guard: boolean): FlowPolicy => ({
  version: 1,
  ...(guard ? { guards: { scan: { declassify: [] } } } : {}),
  rules: [{ id: 'rpc', source: 'client', destination: 'server', port: 80, action: 'allow', ...(guard ? { guard: 'scan' } : {}) }],
});

/** A guest's stop as its debug-exit code, or the stop reason. */
export const stopCode = (s: Stop): number | string => (s.reason === 'debug-exit' ? s.code : s.reason);
