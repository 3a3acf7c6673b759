/**
 * The sandbox of the scan example (`scan.ts`): one small long-mode machine whose only way in is a
 * virtio-blk disk. A ring-3 loader stub drives the disk: before the snapshot it resets the
 * device, negotiates VERSION_1 and sets up one queue (MMIO at CPL3); it then pauses, and the
 * host snapshots it there. Every child resumes the loader, which submits one prepared read of
 * the disk's first 16 KiB into the code area, waits for the used ring and jumps to it. So two
 * samples differ only in their disk: a fork gets a new `VirtioBlock` on its own image, a reset
 * machine gets its disk image rewritten in place before the run.
 *
 * Memory is laid out so that the monitor can see what matters without re-slotting a fork's
 * copy-on-write RAM (a monitor's write-watch on a sub-range copies the region and renumbers
 * slots, which would also break `reset`): the regions the sample may not write are whole
 * read-only regions from the start, so the monitor's write-watch finds them already read-only.
 *
 * | range | region | sample may |
 * |---|---|---|
 * | `0x00000–0x2ffff` | scratch (avail ring at 0x1000, data, stack down from 0x30000) | read, write |
 * | `0x30000–0x3ffff` | core's system area (page tables, GDT, IDT, TSS) | — (not watched: the CPU writes A/D bits there) |
 * | `0x40000–0x43fff` | loader: code, descriptors, used ring, request (read-only slot) | read |
 * | `0x50000–0x53fff` | code: the sample, delivered by the disk's DMA (read-only slot) | read, execute |
 * | everything else below 4 GiB | no RAM; the disk controller at 0xd0000000 | nothing |
 * @module
 */
import { InvalidArgumentError, type Machine } from '@tsvm/core';
import { asm } from '@tsvm/core/asm';
import { MemoryBacking, VirtioBlock, VirtioMmio, type BlockBacking } from '@tsvm/devices';

/** The disk controller's MMIO window. */
export const VIRTIO_BASE = 0xd000_0000n;
/** Scratch RAM (region 0, writable): the avail ring, the sample's data and stack. */
export const SCRATCH = { start: 0x0, size: 0x40000 } as const;
/** Where samples may keep data: scratch RAM between the avail ring's page and the stack. */
export const DATA = 0x8000;
/** Top of the stack the sample starts with (just below core's system area). */
export const STACK_TOP = 0x30000;
/** The loader's region (read-only for the guest). */
export const LOADER = { start: 0x40000, size: 0x4000 } as const;
/** The code area the disk's payload is read into (read-only for the guest). */
export const CODE = { start: 0x50000, size: 0x4000 } as const;
/** Bytes of the disk (one read fills the code area). */
export const DISK_SIZE = CODE.size;
/** Port the loader pauses on: the host snapshots the machine there. */
export const PAUSE_PORT = 0x501;
/** Console: the sample's only output (byte writes). */
export const CONSOLE_PORT = 0x3f8;
/** Debug-exit: the sample's way to finish (`out` the exit code). */
export const EXIT_PORT = 0xf4;
/** Exit code the loader uses when the disk read failed. */
export const LOADER_FAILED = 0xfe;
/** Name of the disk device (the snapshot stores its state under it). */
export const DISK_NAME = 'virtio-blk';

const AVAIL = 0x1000;
const DESC = LOADER.start + 0x1000;
const USED = LOADER.start + 0x2000;
const REQUEST = LOADER.start + 0x3000;
const STATUS = REQUEST + 0x10;
const QUEUE_SIZE = 8;

/** The ring-3 loader: virtio-mmio set-up, pause (snapshot point), one read, jump to the code area. */
const LOADER_SOURCE = `
    mov rbx, ${VIRTIO_BASE}
    cmp dword ptr [rbx + 0x08], 2
    jne failed
    mov dword ptr [rbx + 0x70], 0
    mov dword ptr [rbx + 0x70], 1
    mov dword ptr [rbx + 0x70], 3
    mov dword ptr [rbx + 0x24], 1
    mov dword ptr [rbx + 0x20], 1
    mov dword ptr [rbx + 0x24], 0
    mov dword ptr [rbx + 0x20], 0
    mov dword ptr [rbx + 0x70], 11
    mov eax, dword ptr [rbx + 0x70]
    test eax, 8
    jz failed
    mov dword ptr [rbx + 0x30], 0
    mov dword ptr [rbx + 0x38], ${QUEUE_SIZE}
    mov dword ptr [rbx + 0x80], ${DESC}
    mov dword ptr [rbx + 0x84], 0
    mov dword ptr [rbx + 0x90], ${AVAIL}
    mov dword ptr [rbx + 0x94], 0
    mov dword ptr [rbx + 0xa0], ${USED}
    mov dword ptr [rbx + 0xa4], 0
    mov dword ptr [rbx + 0x44], 1
    mov dword ptr [rbx + 0x70], 15
    mov word ptr [${AVAIL}], 1
    mov dx, ${PAUSE_PORT}
    out dx, al
    mov word ptr [${AVAIL + 2}], 1
    mov dword ptr [rbx + 0x50], 0
  wait_used:
    cmp word ptr [${USED + 2}], 1
    jne wait_used
    cmp byte ptr [${STATUS}], 0
    jne failed
    xor eax, eax
    xor ebx, ebx
    xor ecx, ecx
    xor edx, edx
    xor esi, esi
    xor edi, edi
    mov rax, ${CODE.start}
    jmp rax
  failed:
    mov dx, ${EXIT_PORT}
    mov al, ${LOADER_FAILED}
    out dx, al
`;

/** Host-built data of the loader region: the request's three descriptors and its header. */
function writeLoaderData(vm: Machine): void {
  const desc = (i: number, addr: number, len: number, flags: number, next: number): void => {
    const at = DESC + i * 16;
    vm.memory.writeU64(at, BigInt(addr));
    vm.memory.writeUint(at + 8, 4, len);
    vm.memory.writeUint(at + 12, 2, flags);
    vm.memory.writeUint(at + 14, 2, next);
  };
  const NEXT = 1, WRITE = 2;
  desc(0, REQUEST, 16, NEXT, 1); // virtio_blk_req header: type IN (0), sector 0
  desc(1, CODE.start, CODE.size, NEXT | WRITE, 2); // the payload, straight into the code area
  desc(2, STATUS, 1, WRITE, 0);
  vm.memory.fill(REQUEST, 16, 0);
  vm.memory.writeUint(STATUS, 1, 0xff); // not 0 until the device answers
}

/** Memory regions of the sandbox (the first holds core's system area at its top). */
export const REGIONS = [
  { start: SCRATCH.start, size: SCRATCH.size, name: 'scratch' },
  { start: LOADER.start, size: LOADER.size, readonly: true, name: 'loader' },
  { start: CODE.start, size: CODE.size, readonly: true, name: 'code' },
] as const;

/** What the host sees of one sandbox machine's devices. */
export interface SandboxIo {
  /** The disk model (its backing holds the sample). */
  readonly disk: VirtioBlock;
  /** Bytes the guest wrote to the console since the last {@link SandboxIo.clearOutput}. */
  printed(): string;
  /** Forgets the console output (between two samples on one machine). */
  clearOutput(): void;
}

/**
 * Attaches the sandbox's devices to `vm`: the disk (on `backing`) behind its virtio-mmio
 * window, a console sink and the debug-exit port. Used for the template and for every child
 * (a restore takes the disk's transport state from the snapshot by name).
 */
export function attachSandboxDevices(vm: Machine, backing: BlockBacking): SandboxIo {
  const disk = new VirtioBlock({ name: DISK_NAME, backing, queueSize: QUEUE_SIZE });
  const mmio = new VirtioMmio({ device: disk, memory: vm.memory, indirect: false, eventIdx: false });
  vm.attachDevice(mmio.mappings(VIRTIO_BASE));
  let out = '';
  vm.io.register({ port: CONSOLE_PORT, size: 1 }, { name: 'console', write: (_o, v) => { out += String.fromCharCode(v & 0xff); } });
  vm.io.register({ port: EXIT_PORT, size: 1 }, { name: 'debug-exit', write: (_o, v, _s, a) => a.requestStop({ reason: 'debug-exit', code: v & 0xff }) });
  return { disk, printed: () => out, clearOutput: () => { out = ''; } };
}

/** A disk image holding `payload` at sector 0, zero-padded to {@link DISK_SIZE}. */
export function diskImage(payload: Uint8Array): Uint8Array {
  if (!(payload instanceof Uint8Array) || payload.length > DISK_SIZE) throw new InvalidArgumentError('payload', `must be a Uint8Array of at most ${DISK_SIZE} bytes`);
  const img = new Uint8Array(DISK_SIZE);
  img.set(payload);
  return img;
}

/**
 * Builds the template machine and runs its loader to the pause point (virtio set-up done, the
 * read not yet submitted). The caller snapshots it and closes it. `notifyAt` is the address of
 * the loader's queue-notify instruction (a hostile sample jumps there).
 */
export async function buildTemplate(create: (regions: typeof REGIONS) => Promise<Machine>): Promise<{ readonly vm: Machine; readonly notifyAt: number }> {
  const vm = await create(REGIONS);
  try {
    attachSandboxDevices(vm, new MemoryBacking(new Uint8Array(DISK_SIZE)));
    vm.io.register({ port: PAUSE_PORT, size: 1 }, { name: 'pause', write: (_o, _v, _s, a) => a.requestStop({ reason: 'debug-exit', code: 0x100 }) });
    const code = await asm(LOADER_SOURCE, { bits: 64, address: LOADER.start });
    if (code.length > 0x1000) throw new Error('the loader outgrew its page');
    const notify = Buffer.from(await asm('mov dword ptr [rbx + 0x50], 0', { bits: 64 }));
    const notifyAt = Buffer.from(code).indexOf(notify);
    if (notifyAt < 0) throw new Error('the loader has no notify instruction');
    vm.loadFlat(code, { at: LOADER.start, mode: 'long', ring: 3, stack: STACK_TOP });
    writeLoaderData(vm);
    const stop = await vm.run({ timeout: 10_000 });
    if (stop.reason !== 'debug-exit' || stop.code !== 0x100) throw new Error(`the sandbox's loader did not reach its pause point: ${stop.reason}${stop.reason === 'debug-exit' ? ` ${stop.code}` : ''}`);
    return { vm, notifyAt: LOADER.start + notifyAt };
  } catch (e) {
    await vm.close();
    throw e;
  }
}
