// Part of `pnpm test`: installs the Debian tools the tests use when they are missing (gdb, for
// the gdb stub's tests against the real client; redis-server, for the scan-queue example's
// BullMQ tests, which start their own instance on a free port), if this is a Debian host where we may. Never
// fails the run: where a tool cannot be installed, the tests that need it skip loudly.
import { spawnSync } from 'node:child_process';

const tools = [{ command: 'gdb', pkg: 'gdb' }, { command: 'redis-server', pkg: 'redis-server' }];
const has = (cmd) => spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
const missing = tools.filter((t) => !has(t.command));
if (missing.length > 0) {
  const pkgs = missing.map((t) => t.pkg);
  const root = typeof process.getuid === 'function' && process.getuid() === 0;
  const ok = root && has('apt-get')
    && spawnSync('apt-get', ['update', '-qq'], { stdio: 'ignore', timeout: 300_000 }).status === 0
    && spawnSync('apt-get', ['install', '-y', '-qq', ...pkgs], { stdio: 'ignore', timeout: 600_000, env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } }).status === 0;
  for (const t of missing) {
    if (ok && has(t.command)) process.stderr.write(`[tsvm] installed ${t.pkg} (apt)\n`);
    else process.stderr.write(`[tsvm] ***** could not install ${t.pkg}${root ? '' : ' (not root)'}: the tests that need ${t.command} will SKIP *****\n`);
  }
}
