/**
 * The framing of gdb's Remote Serial Protocol: `$payload#xx` packets (two hex digits of the byte
 * sum mod 256), `+`/`-` acknowledgements, `}`-escapes (the next byte XOR 0x20) and the bare
 * 0x03 byte a client sends to interrupt a running target. Payloads are kept as latin1 strings
 * (one char per byte), so binary `X` packets survive. Hand-written: no maintained RSP library is
 * on the npm registry, and the framing is forty lines.
 * @module
 */

/** Largest payload accepted from a client (bytes after unescaping); also what `qSupported` advertises. */
export const MAX_PACKET = 0x4000;

/** What the reader found in the byte stream. */
export type RspEvent =
  /** A packet with a good checksum (payload unescaped). */
  | { readonly kind: 'packet'; readonly payload: string }
  /** A packet whose checksum did not match (or was not hex): answer `-`, the client resends. */
  | { readonly kind: 'bad-checksum' }
  /** A packet longer than {@link MAX_PACKET}: its bytes were dropped, not kept. */
  | { readonly kind: 'overflow' }
  /** The interrupt byte (0x03) outside a packet (Ctrl-C). */
  | { readonly kind: 'interrupt' }
  /** `+` or `-` from the client. */
  | { readonly kind: 'ack'; readonly ok: boolean };

/** The byte sum mod 256 of a latin1 string. */
export function checksum(s: string): number {
  let sum = 0;
  for (let i = 0; i < s.length; i++) sum = (sum + s.charCodeAt(i)) & 0xff;
  return sum;
}

/** `$payload#xx` with `$`, `#`, `}` and `*` escaped, as bytes ready for the socket. */
export function frame(payload: string): Buffer {
  const body = payload.replace(/[$#}*]/g, (c) => `}${String.fromCharCode(c.charCodeAt(0) ^ 0x20)}`);
  return Buffer.from(`$${body}#${hex2(checksum(body))}`, 'latin1');
}

/** Two lowercase hex digits. */
export function hex2(n: number): string {
  return (n & 0xff).toString(16).padStart(2, '0');
}

const HEX = /^[0-9a-fA-F]{2}$/;

/**
 * A streaming parser: feed it socket chunks, get {@link RspEvent}s. Its memory is bounded by
 * {@link MAX_PACKET} whatever the client sends (an over-long packet is counted, not stored).
 */
export class PacketReader {
  #state: 'idle' | 'body' | 'escape' | 'sum1' | 'sum2' = 'idle';
  #body: string[] = [];
  #raw = 0; // checksum over the bytes as sent (escapes included)
  #length = 0;
  #sum = '';
  #overflow = false;

  /** Parses `chunk`, continuing a packet split across chunks. */
  push(chunk: Uint8Array): RspEvent[] {
    const out: RspEvent[] = [];
    for (const b of chunk) {
      switch (this.#state) {
        case 'idle':
          if (b === 0x24) this.#start();
          else if (b === 0x03) out.push({ kind: 'interrupt' });
          else if (b === 0x2b || b === 0x2d) out.push({ kind: 'ack', ok: b === 0x2b });
          break; // anything else between packets is line noise
        case 'body':
        case 'escape':
          if (b === 0x23 && this.#state === 'body') { this.#state = 'sum1'; break; }
          if (b === 0x24) { this.#start(); break; } // a new packet restarts (the old one was cut)
          this.#raw = (this.#raw + b) & 0xff;
          if (this.#state === 'body' && b === 0x7d) { this.#state = 'escape'; break; }
          this.#add(this.#state === 'escape' ? b ^ 0x20 : b);
          this.#state = 'body';
          break;
        case 'sum1':
          this.#sum = String.fromCharCode(b);
          this.#state = 'sum2';
          break;
        case 'sum2': {
          this.#sum += String.fromCharCode(b);
          this.#state = 'idle';
          if (this.#overflow) out.push({ kind: 'overflow' });
          else if (!HEX.test(this.#sum) || parseInt(this.#sum, 16) !== this.#raw) out.push({ kind: 'bad-checksum' });
          else out.push({ kind: 'packet', payload: this.#body.join('') });
          this.#body = [];
          break;
        }
      }
    }
    return out;
  }

  #start(): void {
    this.#state = 'body';
    this.#body = [];
    this.#raw = 0;
    this.#length = 0;
    this.#overflow = false;
  }

  #add(b: number): void {
    if (++this.#length > MAX_PACKET) { this.#overflow = true; this.#body = []; return; }
    if (!this.#overflow) this.#body.push(String.fromCharCode(b));
  }
}

/** Bytes as lowercase hex. */
export function toHex(bytes: Uint8Array): string {
  return Buffer.from(bytes).toString('hex');
}

/** Hex to bytes; undefined when `s` is not an even run of hex digits. */
export function fromHex(s: string): Uint8Array | undefined {
  if (s.length % 2 !== 0 || !/^[0-9a-fA-F]*$/.test(s)) return undefined;
  return new Uint8Array(Buffer.from(s, 'hex'));
}

/** A hex number of at most 16 digits (a 64-bit address), or undefined. */
export function parseHex(s: string | undefined): bigint | undefined {
  if (s === undefined || !/^[0-9a-fA-F]{1,16}$/.test(s)) return undefined;
  return BigInt(`0x${s}`);
}
