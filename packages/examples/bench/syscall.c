/* Baseline for the ts-exit-path line of `pnpm bench`: the same cheap ioctl the TypeScript side
 * issues through koffi (TCGETS on /dev/null, which fails with ENOTTY), from C. Its time is the
 * kernel's share of a syscall, which the C exit loop pays as well; koffi's call costs the rest.
 * usage: syscall <iterations>   prints {"ns": <ns per call>} */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <time.h>

int main(int argc, char **argv) {
  long n = argc > 1 ? strtol(argv[1], 0, 0) : 200000;
  int fd = open("/dev/null", O_RDONLY);
  if (fd < 0) { perror("/dev/null"); return 1; }
  struct termios t;
  struct timespec a, b;
  for (long i = 0; i < n / 10; i++) ioctl(fd, TCGETS, &t); /* warm-up */
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (long i = 0; i < n; i++) ioctl(fd, TCGETS, &t);
  clock_gettime(CLOCK_MONOTONIC, &b);
  printf("{\"ns\":%.1f}\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
  return 0;
}
