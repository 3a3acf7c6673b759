/**
 * The main demo: a tiny 64-bit guest prints a line through the 16550 UART and halts.
 *
 *   pnpm demo
 *
 * @module
 */
import { Machine } from '@tsvm/core';
import { asm } from '@tsvm/core/asm';
import { Uart16550 } from '@tsvm/devices';
import { runCli } from './support.js';

const GUEST = `
    lea rsi, [rip + msg]
    mov dx, 0x3f8
  next:
    lodsb
    test al, al
    jz done
    out dx, al
    jmp next
  done:
    hlt
  msg:
    .asciz "Hello from a tsvm guest: 64-bit long mode, printed through a 16550 UART.\\n"
`;

async function main(): Promise<number> {
  await using vm = await Machine.create({ memory: 2 * 1024 * 1024, name: 'hello' });
  const uart = new Uart16550();
  uart.pipe(process.stdout);
  vm.attachDevice(uart);
  vm.loadFlat(await asm(GUEST, { bits: 64, address: 0x1000 }), { at: 0x1000, mode: 'long' });
  const stop = await vm.run({ timeout: 5000 });
  uart.flush();
  console.log(`guest stopped: ${stop.reason} at rip=0x${stop.rip.toString(16)} after ${stop.exits} exits in ${stop.elapsedMs.toFixed(2)} ms (KVM flavour: ${vm.capabilities.flavour})`);
  return stop.reason === 'halt' ? 0 : 1;
}

await runCli('tsvm demo', main);
