/* virtio-blk: init (accepting RO, BLK_SIZE, FLUSH, SEG_MAX), read config, then one request at a
 * time: IN sector 1, OUT sector 2, GET_ID, FLUSH, IN past the end, and an unknown type.
 * The guest reports; the host decides (the same binary runs against a read-only disk).
 *   RESULT[0] = capacity low, [1] = capacity high, [2] = blk_size, [3] = accepted features low,
 *   RESULT[4 + 3*i] = status byte, [5 + 3*i] = used.len, [6 + 3*i] = used.id of request i,
 *   RESULT[30] = Status at the end.
 *   RESULT_DATA: sector 1 as read (512), then the 20-byte id. */
#include "virtio.h"

#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8

struct blk_hdr {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
};

static struct vq vq;
static unsigned nreq;

static int request(uint32_t type, uint64_t sector, void *data, uint32_t len, int data_writable) {
	volatile struct blk_hdr *hdr = (volatile struct blk_hdr *)(VQ_BASE + 0x10000);
	volatile uint8_t *status = (volatile uint8_t *)(VQ_BASE + 0x10100);
	hdr->type = type;
	hdr->reserved = 0;
	hdr->sector = sector;
	*status = 0xee; /* the device must overwrite this */
	struct vbuf bufs[3];
	unsigned n = 0;
	bufs[n++] = (struct vbuf){ (uintptr_t)hdr, sizeof(struct blk_hdr), 0 };
	if (len) bufs[n++] = (struct vbuf){ (uintptr_t)data, len, data_writable };
	bufs[n++] = (struct vbuf){ (uintptr_t)status, 1, 1 };
	vq_submit(&vq, bufs, n);
	uint32_t id, used_len;
	if (vq_wait(&vq, &id, &used_len)) return -1;
	RESULT[4 + 3 * nreq] = *status;
	RESULT[5 + 3 * nreq] = used_len;
	RESULT[6 + 3 * nreq] = id;
	nreq++;
	return 0;
}

int main(void) {
	uintptr_t base = VIRTIO_BASE;
	uint64_t features;
	uint64_t want = (1u << 2) | (1u << 5) | (1u << 6) | (1u << 9); /* SEG_MAX, RO, BLK_SIZE, FLUSH */
	int err = virtio_begin(base, 2, want, &features);
	if (err) return err;
	uint32_t gen = vreg(base, VIRTIO_MMIO_CONFIG_GENERATION);
	RESULT[0] = vreg(base, VIRTIO_MMIO_CONFIG + 0);
	RESULT[1] = vreg(base, VIRTIO_MMIO_CONFIG + 4);
	RESULT[2] = vreg(base, VIRTIO_MMIO_CONFIG + 20);
	if (vreg(base, VIRTIO_MMIO_CONFIG_GENERATION) != gen) return 40;
	RESULT[3] = (uint32_t)features;
	if ((err = virtio_queue(base, 0, 16, &vq))) return err;
	if (!(virtio_driver_ok(base) & VIRTIO_STATUS_DRIVER_OK)) return 41;

	uint8_t *sector = (uint8_t *)(VQ_BASE + 0x11000);
	memset(sector, 0xcc, 512);
	if (request(BLK_T_IN, 1, sector, 512, 1)) return 42;
	memcpy((void *)RESULT_DATA, sector, 512);

	const char msg[] = "written by the guest into sector 2";
	memset(sector, 0, 512);
	memcpy(sector, msg, sizeof msg);
	for (unsigned i = sizeof msg; i < 512; i++) sector[i] = (uint8_t)(i ^ 0x5a);
	if (request(BLK_T_OUT, 2, sector, 512, 0)) return 43;

	uint8_t *id = (uint8_t *)(VQ_BASE + 0x12000);
	memset(id, 0, 20);
	if (request(BLK_T_GET_ID, 0, id, 20, 1)) return 44;
	memcpy((void *)(RESULT_DATA + 512), id, 20);

	if (request(BLK_T_FLUSH, 0, 0, 0, 0)) return 45;
	uint64_t capacity = RESULT[0] | ((uint64_t)RESULT[1] << 32);
	if (request(BLK_T_IN, capacity, sector, 512, 1)) return 46;
	if (request(0x77, 0, 0, 0, 0)) return 47;
	RESULT[30] = vreg(base, VIRTIO_MMIO_STATUS);
	return 0;
}
