#include "virtio.h"

int virtio_begin(uintptr_t base, uint32_t device_id, uint64_t want, uint64_t *features) {
	if (vreg(base, VIRTIO_MMIO_MAGIC) != 0x74726976) return 10;
	if (vreg(base, VIRTIO_MMIO_VERSION) != 2) return 11;
	if (vreg(base, VIRTIO_MMIO_DEVICE_ID) != device_id) return 12;
	vwrite(base, VIRTIO_MMIO_STATUS, 0);
	if (vreg(base, VIRTIO_MMIO_STATUS) != 0) return 13;
	vwrite(base, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
	vwrite(base, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
	vwrite(base, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	uint64_t offered = vreg(base, VIRTIO_MMIO_DEVICE_FEATURES);
	vwrite(base, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	offered |= (uint64_t)vreg(base, VIRTIO_MMIO_DEVICE_FEATURES) << 32;
	if (!(offered & VIRTIO_F_VERSION_1)) return 14;
	uint64_t accept = (offered & want) | VIRTIO_F_VERSION_1;
	vwrite(base, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	vwrite(base, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)accept);
	vwrite(base, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	vwrite(base, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)(accept >> 32));
	vwrite(base, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
	if (!(vreg(base, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_FEATURES_OK)) return 15;
	if (features) *features = accept;
	return 0;
}

int virtio_queue(uintptr_t base, unsigned index, unsigned size, struct vq *vq) {
	vwrite(base, VIRTIO_MMIO_QUEUE_SEL, index);
	if (vreg(base, VIRTIO_MMIO_QUEUE_READY) != 0) return 20;
	uint32_t max = vreg(base, VIRTIO_MMIO_QUEUE_NUM_MAX);
	if (max == 0) return 21;
	if (size > max) size = max;
	uintptr_t q = VQ_BASE + index * 0x4000UL;
	memset((void *)q, 0, 0x3000);
	vq->base = base;
	vq->index = index;
	vq->size = (uint16_t)size;
	vq->desc = (volatile struct virtq_desc *)q;
	vq->avail = (volatile uint16_t *)(q + 0x1000);
	vq->used = (volatile uint16_t *)(q + 0x2000);
	vq->avail_idx = 0;
	vq->used_seen = 0;
	vq->next_desc = 0;
	vwrite(base, VIRTIO_MMIO_QUEUE_NUM, size);
	vwrite(base, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)q);
	vwrite(base, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
	vwrite(base, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (uint32_t)(q + 0x1000));
	vwrite(base, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, 0);
	vwrite(base, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (uint32_t)(q + 0x2000));
	vwrite(base, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, 0);
	vwrite(base, VIRTIO_MMIO_QUEUE_READY, 1);
	if (vreg(base, VIRTIO_MMIO_QUEUE_READY) != 1) return 22;
	return 0;
}

uint32_t virtio_driver_ok(uintptr_t base) {
	vwrite(base, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK | VIRTIO_STATUS_DRIVER_OK);
	return vreg(base, VIRTIO_MMIO_STATUS);
}

void vq_publish(struct vq *vq, uint16_t head) {
	vq->avail[2 + vq->avail_idx % vq->size] = head;
	barrier();
	vq->avail_idx++;
	vq->avail[1] = vq->avail_idx;
	barrier();
	vwrite(vq->base, VIRTIO_MMIO_QUEUE_NOTIFY, vq->index);
}

uint16_t vq_submit(struct vq *vq, const struct vbuf *bufs, unsigned n) {
	uint16_t head = vq->next_desc;
	for (unsigned i = 0; i < n; i++) {
		uint16_t d = (uint16_t)((head + i) % vq->size);
		uint16_t next = (uint16_t)((d + 1) % vq->size);
		vq->desc[d].addr = bufs[i].addr;
		vq->desc[d].len = bufs[i].len;
		vq->desc[d].flags = (uint16_t)((bufs[i].writable ? VIRTQ_DESC_F_WRITE : 0) | (i + 1 < n ? VIRTQ_DESC_F_NEXT : 0));
		vq->desc[d].next = i + 1 < n ? next : 0;
	}
	vq->next_desc = (uint16_t)((head + n) % vq->size);
	vq_publish(vq, head);
	return head;
}

int vq_wait(struct vq *vq, uint32_t *id, uint32_t *len) {
	/* The device completes requests synchronously within the notify exit; the bound only
	 * keeps a broken device from hanging the guest. */
	for (unsigned long spin = 0; spin < 1000000; spin++) {
		barrier();
		if (vq->used[1] != vq->used_seen) {
			volatile struct virtq_used_elem *e = (volatile struct virtq_used_elem *)((uintptr_t)vq->used + 4) + vq->used_seen % vq->size;
			*id = e->id;
			*len = e->len;
			vq->used_seen++;
			return 0;
		}
	}
	return -1;
}
