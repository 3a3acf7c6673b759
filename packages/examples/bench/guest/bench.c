/* The device-bench guest (see start.S for how it boots on both tsvm and QEMU). The multiboot
 * command line picks the workload and its size, e.g. "mode=uart bytes=1048576 line=64". Every
 * workload times itself with rdtsc around the measured loop only (no boot, no set-up) and reports
 * one line on COM1 that the host parses:
 *   TSVMBENCH end <mode> key=value ...
 * A failure prints "TSVMBENCH error <what>" and returns a step number (debug-exit code 2n+1).
 *
 *   mode=uart bytes=N line=L    "TSVMBENCH begin uart\n", then N bytes to THR, each after polling
 *                               LSR.THRE, as an early console does; a '\n' ends every L-byte line
 *                               (L = 0: no newlines). Payload byte i: see uart_byte().
 *   mode=blk requests=R qd=Q seqsize=S seqbytes=B seed=X
 *                               R random 4 KiB reads, then B bytes (0: the whole disk) read
 *                               sequentially in S-byte requests; Q requests per kick (QD).
 *                               Every sector's tag is checked.
 *   mode=rng bytes=N size=S qd=Q
 *                               N bytes of entropy in S-byte requests, Q per kick. */
#include "bench-shared.h"
#include "virtio.h"

#define COM1 0x3f8
#define LSR_THRE 0x20
#define MULTIBOOT_BOOTLOADER_MAGIC 0x2badb002u
#define MB_INFO_CMDLINE (1u << 2)

#define BLK_T_IN 0
#define BLK_S_OK 0
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_RNG 4
#define VIRTIO_BLK_F_SEG_MAX (1u << 2)
#define VIRTIO_BLK_F_BLK_SIZE (1u << 6)

/* Request headers, status bytes and data buffers: above the rings (VQ_BASE, 2 MiB) and the image. */
#define HDR_BASE 0x380000UL
#define STATUS_BASE 0x390000UL
#define DATA_BASE 0x400000UL
#define DATA_LIMIT 0x200000UL /* at most QD * request size bytes of data buffers */
#define MAX_QD 64             /* three descriptors per block request, queue of 256 */
#define SENTINEL 0x5e5e5e5e5e5e5e5eULL

static char cmdline[512];
static struct vq vq;

static inline uint64_t rdtsc(void) {
	uint32_t lo, hi;
	__asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi) : : "memory");
	return ((uint64_t)hi << 32) | lo;
}

static void put_u64(uint64_t v) {
	char buf[21];
	int i = 20;
	buf[i] = 0;
	do buf[--i] = (char)('0' + v % 10); while ((v /= 10) != 0);
	uart_puts(buf + i);
}

static void put_field(const char *key, uint64_t v) {
	uart_putc(' ');
	uart_puts(key);
	uart_putc('=');
	put_u64(v);
}

static int fail(int step, const char *what) {
	uart_puts("\nTSVMBENCH error ");
	uart_puts(what);
	uart_putc('\n');
	return step;
}

/* The value of `key=` in the command line, as a token (not NUL-terminated), or 0. */
static const char *find_arg(const char *key, size_t *len) {
	size_t klen = 0;
	while (key[klen]) klen++;
	for (const char *p = cmdline; *p;) {
		while (*p == ' ') p++;
		const char *tok = p;
		while (*p && *p != ' ') p++;
		if ((size_t)(p - tok) > klen && tok[klen] == '=' && memcmp(tok, key, klen) == 0) {
			*len = (size_t)(p - tok) - klen - 1;
			return tok + klen + 1;
		}
	}
	return 0;
}

/* A decimal `key=` argument; `def` when absent. Returns -1 on a malformed value. */
static int arg_u64(const char *key, uint64_t def, uint64_t *out) {
	size_t len;
	const char *v = find_arg(key, &len);
	if (!v) {
		*out = def;
		return 0;
	}
	if (len == 0 || len > 19) return -1;
	uint64_t n = 0;
	for (size_t i = 0; i < len; i++) {
		if (v[i] < '0' || v[i] > '9') return -1;
		n = n * 10 + (uint64_t)(v[i] - '0');
	}
	*out = n;
	return 0;
}

static int mode_is(const char *mode) {
	size_t len, mlen = 0;
	const char *v = find_arg("mode", &len);
	while (mode[mlen]) mlen++;
	return v && len == mlen && memcmp(v, mode, len) == 0;
}

/* ------------------------------------------------------------------------------------ UART */

/* Payload byte i (the host checks every byte against the same rule, devices-guest.ts). */
static inline uint8_t uart_byte(uint64_t i, uint64_t line) {
	if (line && i % line == line - 1) return '\n';
	return (uint8_t)('a' + i % 26);
}

static int bench_uart(void) {
	uint64_t n, line;
	if (arg_u64("bytes", 0, &n) || arg_u64("line", 64, &line)) return fail(10, "bad bytes= or line=");
	/* The usual 8250 bring-up: no interrupts, 115200 8N1, FIFOs on; the scratch register
	 * proves a UART answers at 0x3f8 before we measure anything. */
	outb(COM1 + 1, 0x00);
	outb(COM1 + 3, 0x80);
	outb(COM1 + 0, 0x01);
	outb(COM1 + 1, 0x00);
	outb(COM1 + 3, 0x03);
	outb(COM1 + 2, 0xc7);
	outb(COM1 + 7, 0xa5);
	if (inb(COM1 + 7) != 0xa5) return fail(11, "no scratch register at 0x3ff");
	uart_puts("TSVMBENCH begin uart\n");
	uint64_t t0 = rdtsc();
	for (uint64_t i = 0; i < n; i++) {
		uint8_t c = uart_byte(i, line);
		while (!(inb(COM1 + 5) & LSR_THRE)) {}
		outb(COM1, c);
	}
	uint64_t t1 = rdtsc();
	uart_puts("TSVMBENCH end uart");
	put_field("bytes", n);
	put_field("cycles", t1 - t0);
	uart_putc('\n');
	return 0;
}

/* ---------------------------------------------------------------------------- virtqueues */

/* Writes chain `bufs` at descriptors [head, head+n) and puts it in the available ring without
 * publishing it: a batch becomes visible with one avail.idx store and one notify (vq_kick). */
static void vq_add(struct vq *q, uint16_t head, const struct vbuf *bufs, unsigned n) {
	for (unsigned i = 0; i < n; i++) {
		uint16_t d = (uint16_t)(head + i);
		q->desc[d].addr = bufs[i].addr;
		q->desc[d].len = bufs[i].len;
		q->desc[d].flags = (uint16_t)((bufs[i].writable ? VIRTQ_DESC_F_WRITE : 0) | (i + 1 < n ? VIRTQ_DESC_F_NEXT : 0));
		q->desc[d].next = i + 1 < n ? (uint16_t)(d + 1) : 0;
	}
	q->avail[2 + q->avail_idx % q->size] = head;
	q->avail_idx++;
}

static void vq_kick(struct vq *q) {
	barrier();
	q->avail[1] = q->avail_idx;
	barrier();
	vwrite(q->base, VIRTIO_MMIO_QUEUE_NOTIFY, q->index);
}

static int device_up(uint32_t id, uint64_t want) {
	uint64_t features;
	int err = virtio_begin(VIRTIO_BASE, id, want, &features);
	if (err) return fail(err, "virtio handshake");
	if ((err = virtio_queue(VIRTIO_BASE, 0, 256, &vq))) return fail(err, "virtio queue set-up");
	if (!(virtio_driver_ok(VIRTIO_BASE) & VIRTIO_STATUS_DRIVER_OK)) return fail(30, "DRIVER_OK refused");
	return 0;
}

static int device_still_ok(void) {
	return (vreg(VIRTIO_BASE, VIRTIO_MMIO_STATUS) & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED)) == 0;
}

/* -------------------------------------------------------------------------------- blk */

struct blk_hdr {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
};

/* Reads k requests of `bytes` each from sectors[0..k) with one kick, then checks every
 * completion: its id, used.len, status byte and the tag of every sector it brought in. */
static int blk_batch(const uint64_t *sectors, unsigned k, uint32_t bytes) {
	volatile struct blk_hdr *hdr = (volatile struct blk_hdr *)HDR_BASE;
	volatile uint8_t *status = (volatile uint8_t *)STATUS_BASE;
	for (unsigned j = 0; j < k; j++) {
		hdr[j].type = BLK_T_IN;
		hdr[j].reserved = 0;
		hdr[j].sector = sectors[j];
		status[j] = 0xee; /* the device must overwrite this */
		struct vbuf bufs[3] = {
			{ (uintptr_t)&hdr[j], sizeof(struct blk_hdr), 0 },
			{ DATA_BASE + (uint64_t)j * bytes, bytes, 1 },
			{ (uintptr_t)&status[j], 1, 1 },
		};
		vq_add(&vq, (uint16_t)(3 * j), bufs, 3);
	}
	vq_kick(&vq);
	uint64_t seen = 0;
	for (unsigned got = 0; got < k; got++) {
		uint32_t id, len;
		if (vq_wait(&vq, &id, &len)) return fail(50, "blk: no completion");
		unsigned j = id / 3;
		if (id % 3 || j >= k || (seen >> j) & 1) return fail(51, "blk: bad used.id");
		seen |= 1ULL << j;
		if (status[j] != BLK_S_OK) return fail(52, "blk: status not OK");
		if (len != bytes + 1) return fail(53, "blk: used.len is not data + status");
		if (bench_check_tags((const volatile uint8_t *)(DATA_BASE + (uint64_t)j * bytes), sectors[j], bytes) >= 0)
			return fail(54, "blk: data does not match the disk");
	}
	return 0;
}

static int bench_blk(void) {
	uint64_t requests, qd, seq_size, seqbytes, seed;
	if (arg_u64("requests", 1000, &requests) || arg_u64("qd", 1, &qd) || arg_u64("seqsize", 65536, &seq_size) ||
	    arg_u64("seqbytes", 0, &seqbytes) || arg_u64("seed", 1, &seed))
		return fail(10, "bad blk arguments");
	if (qd == 0 || qd > MAX_QD || seq_size == 0 || seq_size % BENCH_SECTOR || qd * seq_size > DATA_LIMIT || qd * BENCH_BLOCK > DATA_LIMIT || seed == 0)
		return fail(11, "blk arguments out of range");
	int err = device_up(VIRTIO_ID_BLOCK, VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE);
	if (err) return err;
	if (3 * qd > vq.size) return fail(13, "blk: queue too small for qd= (three descriptors per request)");
	uint64_t capacity = vreg(VIRTIO_BASE, VIRTIO_MMIO_CONFIG) | ((uint64_t)vreg(VIRTIO_BASE, VIRTIO_MMIO_CONFIG + 4) << 32);
	uint64_t blocks = capacity / (BENCH_BLOCK / BENCH_SECTOR);
	if (blocks == 0) return fail(12, "blk: disk smaller than 4 KiB");
	if (seqbytes == 0 || seqbytes > capacity * BENCH_SECTOR) seqbytes = capacity * BENCH_SECTOR;
	seqbytes -= seqbytes % seq_size;
	uint64_t sectors[MAX_QD];

	uint64_t t0 = rdtsc();
	for (uint64_t done = 0; done < requests;) {
		unsigned k = (unsigned)(requests - done < qd ? requests - done : qd);
		for (unsigned j = 0; j < k; j++) sectors[j] = (bench_next(&seed) % blocks) * (BENCH_BLOCK / BENCH_SECTOR);
		if ((err = blk_batch(sectors, k, BENCH_BLOCK))) return err;
		done += k;
	}
	uint64_t t1 = rdtsc();
	uint64_t seq_requests = seqbytes / seq_size, next = 0;
	for (uint64_t done = 0; done < seq_requests;) {
		unsigned k = (unsigned)(seq_requests - done < qd ? seq_requests - done : qd);
		for (unsigned j = 0; j < k; j++, next += seq_size / BENCH_SECTOR) sectors[j] = next;
		if ((err = blk_batch(sectors, k, (uint32_t)seq_size))) return err;
		done += k;
	}
	uint64_t t2 = rdtsc();
	if (!device_still_ok()) return fail(55, "blk: device needs reset");
	uart_puts("TSVMBENCH end blk");
	put_field("capacity", capacity);
	put_field("qd", qd);
	put_field("rand_requests", requests);
	put_field("rand_cycles", t1 - t0);
	put_field("seq_requests", seq_requests);
	put_field("seq_bytes", seqbytes);
	put_field("seq_cycles", t2 - t1);
	uart_putc('\n');
	return 0;
}

/* -------------------------------------------------------------------------------- rng */

static int bench_rng(void) {
	uint64_t bytes, size, qd;
	if (arg_u64("bytes", 1 << 20, &bytes) || arg_u64("size", 4096, &size) || arg_u64("qd", 1, &qd)) return fail(10, "bad rng arguments");
	if (qd == 0 || qd > MAX_QD || size < 16 || size > 65536 || size % 8 || qd * size > DATA_LIMIT || bytes % size)
		return fail(11, "rng arguments out of range");
	int err = device_up(VIRTIO_ID_RNG, 0);
	if (err) return err;
	if (qd > vq.size) return fail(13, "rng: queue too small for qd=");
	uint64_t requests = bytes / size;
	uint64_t t0 = rdtsc();
	for (uint64_t done = 0; done < requests;) {
		unsigned k = (unsigned)(requests - done < qd ? requests - done : qd);
		for (unsigned j = 0; j < k; j++) {
			volatile uint64_t *buf = (volatile uint64_t *)(DATA_BASE + j * size);
			/* Sentinels at both ends: a device that reports the length but writes nothing shows. */
			buf[0] = SENTINEL;
			buf[size / 8 - 1] = SENTINEL;
			struct vbuf b = { (uintptr_t)buf, (uint32_t)size, 1 };
			vq_add(&vq, (uint16_t)j, &b, 1);
		}
		vq_kick(&vq);
		for (unsigned got = 0; got < k; got++) {
			uint32_t id, len;
			if (vq_wait(&vq, &id, &len)) return fail(60, "rng: no completion");
			if (id >= k) return fail(61, "rng: bad used.id");
			if (len != size) return fail(62, "rng: short entropy buffer");
			volatile uint64_t *buf = (volatile uint64_t *)(DATA_BASE + id * size);
			if (buf[0] == SENTINEL || buf[size / 8 - 1] == SENTINEL) return fail(63, "rng: buffer not written");
		}
		done += k;
	}
	uint64_t t1 = rdtsc();
	if (!device_still_ok()) return fail(64, "rng: device needs reset");
	uart_puts("TSVMBENCH end rng");
	put_field("bytes", bytes);
	put_field("requests", requests);
	put_field("cycles", t1 - t0);
	uart_putc('\n');
	return 0;
}

int main(uint32_t magic, uint32_t info) {
	if (magic != MULTIBOOT_BOOTLOADER_MAGIC) return fail(2, "not entered by a multiboot loader");
	const volatile uint32_t *mbi = (const volatile uint32_t *)(uintptr_t)info;
	if (!(mbi[0] & MB_INFO_CMDLINE)) return fail(3, "no command line");
	/* Copied first: the loader put it somewhere we may overwrite later. */
	const char *src = (const char *)(uintptr_t)mbi[4];
	size_t n = 0;
	while (src[n] && n + 1 < sizeof cmdline) {
		cmdline[n] = src[n];
		n++;
	}
	cmdline[n] = 0;
	if (src[n]) return fail(4, "command line too long");
	if (mode_is("uart")) return bench_uart();
	if (mode_is("blk")) return bench_blk();
	if (mode_is("rng")) return bench_rng();
	return fail(5, "unknown mode=");
}
