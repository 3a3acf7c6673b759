import { readFileSync, readlinkSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { closeFd } from './fd.js';
import { attachLedger, createLedger, detachLedger, heldFd, releaseLedger } from './ledger.js';
import { MemfdMapping } from './memfd.js';
import { C, libc } from './raw/libc.js';

const isOpen = (fd: number): boolean => { try { readlinkSync(`/proc/self/fd/${fd}`); return true; } catch { return false; } };
const mapped = (address: bigint): boolean => {
  const hex = address.toString(16);
  return readFileSync('/proc/self/maps', 'utf8').split('\n').some((l) => l.startsWith(hex + '-'));
};

describe.skipIf(process.platform !== 'linux')('ledger: what a thread holds, released by its parent', () => {
  afterEach(() => detachLedger());

  it('names what is held and not what was given back; release closes and unmaps the rest, once', () => {
    const ledger = createLedger(16);
    attachLedger(ledger);
    const kept = MemfdMapping.create(2 * 4096, 'tsvm-ledger-kept');
    // Closed, its range is kept (inaccessible) for the next mapping of its size: still a
    // mapping this thread holds. A size nothing else here maps, since this module's list of kept
    // ranges outlives the release below (in a real worker the thread, and the list, are gone).
    const gone = MemfdMapping.create(3 * 4096, 'tsvm-ledger-gone');
    gone.close(); // forgotten before it was closed: release must not close this number again
    const other = libc().open('/dev/null', C.O_RDWR | C.O_CLOEXEC); // not kvm-backend's: never named
    detachLedger();
    expect([isOpen(kept.fd), mapped(kept.hostAddress)]).toEqual([true, true]);
    const r = releaseLedger(ledger);
    expect(r).toEqual({ fds: 1, mappings: 2, timers: 0, unrecorded: 0 });
    expect([isOpen(kept.fd), mapped(kept.hostAddress)]).toEqual([false, false]);
    // The closed memfd's number may be anyone's now (here perhaps /dev/null's): whoever has it keeps it.
    expect(isOpen(other)).toBe(true);
    expect(releaseLedger(ledger)).toEqual({ fds: 0, mappings: 0, timers: 0, unrecorded: 0 });
    closeFd(other);
  });

  it('a full ledger counts what it could not name (and release leaves those alone)', () => {
    const ledger = createLedger(1);
    attachLedger(ledger);
    const a = libc().open('/dev/null', C.O_RDWR | C.O_CLOEXEC);
    const b = libc().open('/dev/null', C.O_RDWR | C.O_CLOEXEC);
    heldFd(a);
    heldFd(b);
    heldFd(a); // already named: no second entry
    detachLedger();
    expect(releaseLedger(ledger)).toEqual({ fds: 1, mappings: 0, timers: 0, unrecorded: 1 });
    expect([isOpen(a), isOpen(b)]).toEqual([false, true]);
    closeFd(b);
  });

  it('without a ledger nothing is recorded', () => {
    const m = MemfdMapping.create(5 * 4096);
    const ledger = createLedger(4);
    expect(releaseLedger(ledger)).toEqual({ fds: 0, mappings: 0, timers: 0, unrecorded: 0 });
    m.close();
  });
});
