/* Shared by the bench guest (bench.c) and the host reference (../devices-host.c): the disk
 * pattern and the random-read sequence must be identical on both sides, so they live here once.
 * The TypeScript runner writes the disk with the same tag (devices-guest.ts, writeBenchDisk). */
#ifndef TSVM_BENCH_SHARED_H
#define TSVM_BENCH_SHARED_H

#include <stdint.h>

#define BENCH_SECTOR 512u
#define BENCH_BLOCK 4096u
#define BENCH_DISK_MAGIC 0x6b6c625f6d767374ULL /* "tsvm_blk", little-endian */

/* xorshift64: cheap, and the same sequence in the guest and on the host for one seed. */
static inline uint64_t bench_next(uint64_t *state) {
	uint64_t x = *state;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *state = x;
}

/* The first 8 bytes of every 512-byte sector of the bench disk. */
static inline uint64_t bench_sector_tag(uint64_t sector) { return sector ^ BENCH_DISK_MAGIC; }

/* Checks the tag of every sector in a buffer read from `sector` on; returns the index of the first
 * bad sector, or -1. */
static inline long bench_check_tags(const volatile uint8_t *buf, uint64_t sector, uint32_t bytes) {
	for (uint32_t off = 0, i = 0; off < bytes; off += BENCH_SECTOR, i++)
		if (*(const volatile uint64_t *)(buf + off) != bench_sector_tag(sector + i)) return (long)i;
	return -1;
}

#endif
