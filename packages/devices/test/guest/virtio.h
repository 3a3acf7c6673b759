/* A minimal polling virtio 1.x driver for the virtio-mmio transport (split queues). */
#ifndef TSVM_TEST_VIRTIO_H
#define TSVM_TEST_VIRTIO_H

#include "guest.h"

/* virtio-mmio registers (virtio 1.x, 4.2.2) */
#define VIRTIO_MMIO_MAGIC 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_VENDOR_ID 0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION 0x0fc
#define VIRTIO_MMIO_CONFIG 0x100

#define VIRTIO_STATUS_ACKNOWLEDGE 0x01
#define VIRTIO_STATUS_DRIVER 0x02
#define VIRTIO_STATUS_DRIVER_OK 0x04
#define VIRTIO_STATUS_FEATURES_OK 0x08
#define VIRTIO_STATUS_NEEDS_RESET 0x40
#define VIRTIO_STATUS_FAILED 0x80

#define VIRTIO_F_VERSION_1 (1ULL << 32)
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2

struct virtq_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct virtq_used_elem {
	uint32_t id;
	uint32_t len;
};

struct vq {
	uintptr_t base; /* transport */
	unsigned index;
	uint16_t size;
	volatile struct virtq_desc *desc;
	volatile uint16_t *avail; /* flags, idx, ring[size], used_event */
	volatile uint16_t *used;  /* flags, idx, then elements at byte offset 4 */
	uint16_t avail_idx;       /* driver's copy of avail.idx */
	uint16_t used_seen;       /* used entries consumed */
	uint16_t next_desc;       /* next free descriptor (requests are completed one at a time) */
};

struct vbuf {
	uint64_t addr;
	uint32_t len;
	int writable;
};

static inline uint32_t vreg(uintptr_t base, unsigned off) { return mmio_read32(base + off); }
static inline void vwrite(uintptr_t base, unsigned off, uint32_t v) { mmio_write32(base + off, v); }

/* Reset, ACKNOWLEDGE, DRIVER, feature negotiation (VERSION_1 | (offered & want)), FEATURES_OK.
 * Returns 0 or a failing step number (>= 10); *features gets what was accepted. */
int virtio_begin(uintptr_t base, uint32_t device_id, uint64_t want, uint64_t *features);
/* Sets up queue `index` with min(QueueNumMax, size) entries at VQ_BASE + index * 0x4000.
 * Returns 0 or a failing step number. */
int virtio_queue(uintptr_t base, unsigned index, unsigned size, struct vq *vq);
/* Sets DRIVER_OK; returns the Status read back. */
uint32_t virtio_driver_ok(uintptr_t base);
/* Places a chain of n buffers, publishes it and notifies. Returns the head index. */
uint16_t vq_submit(struct vq *vq, const struct vbuf *bufs, unsigned n);
/* Publishes `head` in the available ring and notifies, without writing descriptors. */
void vq_publish(struct vq *vq, uint16_t head);
/* Polls the used ring; returns 0 with id/len filled, or -1 when nothing arrived. */
int vq_wait(struct vq *vq, uint32_t *id, uint32_t *len);

#endif
