/* Host-side reference for bench/devices.ts, built with cc like exitloop.c.
 *
 *   devices-host tsc
 *       {"tscHz": N}: the TSC rate against CLOCK_MONOTONIC_RAW (median of three 100 ms windows).
 *       KVM guests read the host TSC (plus an offset) unless the VMM scales it, which neither
 *       tsvm nor QEMU does by default, so this converts the guests' rdtsc intervals to seconds.
 *   devices-host pread <file> <rand_requests> <seed> <seq_request_bytes> <seq_bytes>
 *       The blk baseline: the guest's exact workload (same xorshift sequence of 4 KiB blocks,
 *       then the same sequential requests) as plain pread() on the same file, checking the same
 *       sector tags. {"randNs": N, "seqNs": N, "seqRequests": N}
 *
 * Any error exits non-zero with a message on stderr. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <x86intrin.h>

#include "guest/bench-shared.h"

static uint64_t now_ns(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC_RAW, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static int tsc(void) {
	double hz[3];
	for (int i = 0; i < 3; i++) {
		uint64_t t0 = now_ns(), c0 = __rdtsc();
		struct timespec d = { 0, 100 * 1000 * 1000 };
		while (nanosleep(&d, &d) != 0 && errno == EINTR) {}
		uint64_t t1 = now_ns(), c1 = __rdtsc();
		hz[i] = (double)(c1 - c0) * 1e9 / (double)(t1 - t0);
	}
	qsort(hz, 3, sizeof hz[0], cmp_double);
	printf("{\"tscHz\": %.0f}\n", hz[1]);
	return 0;
}

static uint64_t arg(const char *s, const char *what) {
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || *end || end == s) {
		fprintf(stderr, "devices-host: bad %s '%s'\n", what, s);
		exit(2);
	}
	return v;
}

static void read_checked(int fd, uint8_t *buf, uint32_t bytes, uint64_t sector) {
	ssize_t n = pread(fd, buf, bytes, (off_t)(sector * BENCH_SECTOR));
	if (n != (ssize_t)bytes) {
		fprintf(stderr, "devices-host: pread at sector %" PRIu64 ": %s\n", sector, n < 0 ? strerror(errno) : "short read");
		exit(1);
	}
	long bad = bench_check_tags(buf, sector, bytes);
	if (bad >= 0) {
		fprintf(stderr, "devices-host: sector %" PRIu64 " does not carry its tag\n", sector + (uint64_t)bad);
		exit(1);
	}
}

static int preads(char **argv) {
	uint64_t requests = arg(argv[1], "rand_requests"), seed = arg(argv[2], "seed");
	uint64_t seq_size = arg(argv[3], "seq_request_bytes"), seq_bytes = arg(argv[4], "seq_bytes");
	int fd = open(argv[0], O_RDONLY);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) != 0) {
		fprintf(stderr, "devices-host: %s: %s\n", argv[0], strerror(errno));
		return 1;
	}
	uint64_t capacity = (uint64_t)st.st_size / BENCH_SECTOR, blocks = capacity / (BENCH_BLOCK / BENCH_SECTOR);
	if (blocks == 0 || seed == 0 || seq_size == 0 || seq_size % BENCH_SECTOR || seq_bytes > capacity * BENCH_SECTOR) {
		fprintf(stderr, "devices-host: arguments out of range\n");
		return 2;
	}
	uint8_t *buf = aligned_alloc(4096, (seq_size + 4095) & ~4095ull);
	if (!buf) return 1;
	uint64_t t0 = now_ns();
	for (uint64_t i = 0; i < requests; i++) read_checked(fd, buf, BENCH_BLOCK, (bench_next(&seed) % blocks) * (BENCH_BLOCK / BENCH_SECTOR));
	uint64_t t1 = now_ns();
	uint64_t seq_requests = seq_bytes / seq_size;
	for (uint64_t i = 0; i < seq_requests; i++) read_checked(fd, buf, (uint32_t)seq_size, i * (seq_size / BENCH_SECTOR));
	uint64_t t2 = now_ns();
	printf("{\"randNs\": %" PRIu64 ", \"seqNs\": %" PRIu64 ", \"seqRequests\": %" PRIu64 "}\n", t1 - t0, t2 - t1, seq_requests);
	free(buf);
	close(fd);
	return 0;
}

int main(int argc, char **argv) {
	if (argc == 2 && strcmp(argv[1], "tsc") == 0) return tsc();
	if (argc == 7 && strcmp(argv[1], "pread") == 0) return preads(argv + 2);
	fprintf(stderr, "usage: devices-host tsc | devices-host pread <file> <rand_requests> <seed> <seq_request_bytes> <seq_bytes>\n");
	return 2;
}
