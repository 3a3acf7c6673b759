/**
 * `tsvm doctor`: what this host's KVM offers and what tsvm learned about it — flavour,
 * capabilities, where RIP is at an I/O exit (learned by the probe at open), and, from the
 * calibration cache, which monitor mechanism works at which CPL and how old that knowledge is.
 * @module
 */
import { kvmBackend, type Backend, type HostCapabilities, type IoRipBehaviour, type VirtFlavour } from '@tsvm/core';
import { MECHANISMS, hostIdentity, type MechanismId } from '@tsvm/monitor';
import { defaultCachePath, loadCalibration } from '@tsvm/monitor/calibrate';

/** What `doctor` found. */
export interface DoctorReport {
  /** Whether a KVM backend could be opened, and why not. */
  readonly kvm: { readonly available: true; readonly flavour: VirtFlavour; readonly capabilities: HostCapabilities; readonly ioExitRip: IoRipBehaviour }
    | { readonly available: false; readonly reason: string };
  /** The calibration cache for this host identity. */
  readonly calibration: {
    /** Cache file consulted. */
    readonly path: string;
    /** Whether it holds a table for this host (kernel, CPU, flavour). */
    readonly present: boolean;
    /** When the table was measured (ISO time). */
    readonly measuredAt?: string;
    /** Its age in hours. */
    readonly ageHours?: number;
    /** Per mechanism: does it work at CPL0 / CPL3 here. */
    readonly works?: Readonly<Partial<Record<MechanismId, { readonly cpl0: boolean; readonly cpl3: boolean }>>>;
  };
}

/** Options of {@link doctor}. */
export interface DoctorOptions {
  /** The backend to inspect (default: the process-wide KVM backend). */
  readonly backend?: Backend;
  /** Calibration cache file (default: the monitor's default cache path). */
  readonly cachePath?: string;
  /** "Now", for the cache's age (tests). */
  readonly now?: Date;
}

/** Inspects the host. Never throws for a missing or unusable `/dev/kvm`: that is a finding. */
export function doctor(options: DoctorOptions = {}): DoctorReport {
  const path = options.cachePath ?? defaultCachePath();
  let backend: Backend;
  try {
    backend = options.backend ?? kvmBackend();
  } catch (e) {
    return { kvm: { available: false, reason: e instanceof Error ? e.message : String(e) }, calibration: { path, present: false } };
  }
  const caps = backend.capabilities;
  const table = loadCalibration(hostIdentity(caps.flavour), { path });
  const kvm = { available: true as const, flavour: caps.flavour, capabilities: caps, ioExitRip: caps.ioExitRip };
  if (!table) return { kvm, calibration: { path, present: false } };
  const works: Partial<Record<MechanismId, { cpl0: boolean; cpl3: boolean }>> = {};
  for (const m of MECHANISMS) {
    const r = table.results[m];
    if (r) works[m] = { cpl0: r.cpl0.works, cpl3: r.cpl3.works };
  }
  const now = (options.now ?? new Date()).getTime();
  return { kvm, calibration: { path, present: true, measuredAt: table.createdAt, ageHours: (now - Date.parse(table.createdAt)) / 3_600_000, works } };
}

/** The report as lines a person reads. */
export function renderDoctor(r: DoctorReport): string {
  const out: string[] = [];
  if (!r.kvm.available) {
    out.push(`KVM: not usable — ${r.kvm.reason}`);
    out.push('  tsvm runs its unit tests anywhere; the KVM suite skips, or runs nested: pnpm test:nested');
  } else {
    const c = r.kvm.capabilities;
    out.push(`KVM: usable, flavour ${r.kvm.flavour}`);
    const flags = (['readonlyMemory', 'coalescedMmio', 'coalescedPio', 'irqchip', 'userSpaceMsr', 'guestDebug', 'dirtyLogRing', 'immediateExit', 'eventfds'] as const)
      .map((k) => `${c[k] ? '+' : '-'}${k}`);
    out.push(`  capabilities: ${flags.join(' ')}; ${c.maxMemslots} memslots`);
    const after = Object.entries(r.kvm.ioExitRip).filter(([, v]) => v === 'after').map(([k]) => k);
    out.push(`  RIP at an I/O exit: ${after.length ? `past the instruction for ${after.join(', ')}; on it otherwise` : 'on the instruction for every form'}`);
  }
  const cal = r.calibration;
  if (!cal.present) {
    out.push(`calibration: none for this host in ${cal.path} — the monitor uses assumed figures; measure with 'tsvm calibrate' (or calibrate() from '@tsvm/monitor/calibrate')`);
  } else {
    out.push(`calibration: measured ${cal.measuredAt} (${(cal.ageHours ?? 0).toFixed(1)} h ago), ${cal.path}`);
    for (const [m, w] of Object.entries(cal.works ?? {})) out.push(`  ${m.padEnd(18)} CPL0 ${(w.cpl0 ? 'works' : '—').padEnd(6)} CPL3 ${w.cpl3 ? 'works' : '—'}`);
  }
  return out.join('\n');
}
