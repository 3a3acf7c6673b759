// Test-only virtio device model shared by the transport tests (not exported from the package).
import type { AccessSize } from '@tsvm/core';
import { ChainReader, ChainWriter } from './chain-io.js';
import type { VirtioContext, VirtioDevice } from './device.js';
import type { DescriptorChain } from './virtqueue.js';

/** Echoes each chain's readable bytes, reversed, into its writable part; records every chain. */
export class EchoDevice implements VirtioDevice {
  readonly name = 'echo';
  readonly deviceId = 0x7f;
  readonly queueMaxSizes: readonly number[];
  readonly deviceFeatures = 1n << 0n;
  readonly chains: DescriptorChain[] = [];
  config = new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8]);
  resets = 0;
  ctx: VirtioContext | undefined;

  constructor(queueMax = 8) {
    this.queueMaxSizes = [queueMax];
  }
  attach(context: VirtioContext): void {
    this.ctx = context;
  }
  readConfig(offset: number, size: AccessSize): number {
    let v = 0;
    for (let i = size - 1; i >= 0; i--) v = v * 256 + (this.config[offset + i] ?? 0);
    return v;
  }
  writeConfig(offset: number, value: number): void {
    if (offset < this.config.length) this.config[offset] = value & 0xff;
  }
  notify(index: number): void {
    const ctx = this.ctx;
    if (ctx === undefined) return;
    ctx.processQueue(index, (chain) => {
      this.chains.push(chain);
      const data = new ChainReader(ctx.memory, chain.readable).read(chain.readableLength).reverse();
      return new ChainWriter(ctx.memory, chain.writable).write(data);
    });
  }
  reset(): void {
    this.resets++;
  }
  snapshot(): unknown {
    return { version: 1 };
  }
  restore(): void {}
}
