// Prints one plain closing line ("N passed, N failed, N skipped") that any CI log reader
// understands, after vitest's own summary (vitest prints its summary in onTestRunEnd, so
// ours waits for process exit).
import type { Reporter, TestModule } from 'vitest/node';

export default class SummaryReporter implements Reporter {
  onTestRunEnd(modules: ReadonlyArray<TestModule>): void {
    let passed = 0, failed = 0, skipped = 0;
    for (const m of modules) {
      const tests = [...m.children.allTests()];
      for (const t of tests) {
        const s = t.result().state;
        if (s === 'passed') passed++;
        else if (s === 'failed') failed++;
        else skipped++;
      }
      // A file that failed to load has no tests but must still count as a failure.
      if (m.state() === 'failed' && tests.length === 0) failed++;
    }
    process.once('exit', () => { process.stdout.write(`\n${passed} passed, ${failed} failed, ${skipped} skipped\n`); });
  }
}
