/* A hostile virtio driver (against virtio-rng). Each scenario starts from a device reset and
 * breaks one rule; the guest records what the device shows afterwards:
 *   RESULT[i] = Status, RESULT[10 + i] = InterruptStatus, RESULT[20 + i] = used.idx
 * for scenario i:
 *   0: a device-writable buffer at 4 GiB, outside RAM
 *   1: a descriptor chain that loops (0 -> 1 -> 0)
 *   2: a buffer inside the virtio-mmio window (MMIO, not RAM)
 *   3: avail.idx jumping by more than the queue size
 *   4: QueueNum = 3 (not a power of two); RESULT[9] = QueueReady read back
 *   5: DRIVER_OK without FEATURES_OK
 *   6: a kick after NEEDS_RESET without a reset (scenario 0 again, kicked twice)
 * Finally a reset and a well-formed request: RESULT[30] = used.len, RESULT[31] = Status,
 * RESULT[32] = InterruptStatus before the final request. */
#include "virtio.h"

static uintptr_t base = VIRTIO_BASE;

static void record(unsigned i, struct vq *vq) {
	RESULT[i] = vreg(base, VIRTIO_MMIO_STATUS);
	RESULT[10 + i] = vreg(base, VIRTIO_MMIO_INTERRUPT_STATUS);
	RESULT[20 + i] = vq ? vq->used[1] : 0xffff;
}

static int fresh(struct vq *vq) {
	int err = virtio_begin(base, 4, 0, 0);
	if (err) return err;
	if ((err = virtio_queue(base, 0, 8, vq))) return err;
	if (!(virtio_driver_ok(base) & VIRTIO_STATUS_DRIVER_OK)) return 60;
	return 0;
}

static void one(struct vq *vq, uint64_t addr, uint32_t len) {
	vq->desc[0].addr = addr;
	vq->desc[0].len = len;
	vq->desc[0].flags = VIRTQ_DESC_F_WRITE;
	vq->desc[0].next = 0;
	vq_publish(vq, 0);
}

int main(void) {
	struct vq vq;
	int err;

	if ((err = fresh(&vq))) return err;
	one(&vq, 0x100000000ULL, 64);
	record(0, &vq);

	if ((err = fresh(&vq))) return err;
	vq.desc[0] = (struct virtq_desc){ VQ_BASE + 0x10000, 16, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1 };
	vq.desc[1] = (struct virtq_desc){ VQ_BASE + 0x10010, 16, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 0 };
	vq_publish(&vq, 0);
	record(1, &vq);

	if ((err = fresh(&vq))) return err;
	one(&vq, VIRTIO_BASE, 64);
	record(2, &vq);

	if ((err = fresh(&vq))) return err;
	vq.desc[0] = (struct virtq_desc){ VQ_BASE + 0x10000, 16, VIRTQ_DESC_F_WRITE, 0 };
	vq.avail[1] = (uint16_t)(vq.size + 5);
	barrier();
	vwrite(base, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
	record(3, &vq);

	if ((err = virtio_begin(base, 4, 0, 0))) return err;
	vwrite(base, VIRTIO_MMIO_QUEUE_SEL, 0);
	vwrite(base, VIRTIO_MMIO_QUEUE_NUM, 3);
	vwrite(base, VIRTIO_MMIO_QUEUE_DESC_LOW, VQ_BASE);
	vwrite(base, VIRTIO_MMIO_QUEUE_DRIVER_LOW, VQ_BASE + 0x1000);
	vwrite(base, VIRTIO_MMIO_QUEUE_DEVICE_LOW, VQ_BASE + 0x2000);
	vwrite(base, VIRTIO_MMIO_QUEUE_READY, 1);
	RESULT[9] = vreg(base, VIRTIO_MMIO_QUEUE_READY);
	record(4, 0);

	vwrite(base, VIRTIO_MMIO_STATUS, 0);
	vwrite(base, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
	vwrite(base, VIRTIO_MMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_DRIVER_OK);
	record(5, 0);

	if ((err = fresh(&vq))) return err;
	one(&vq, 0x100000000ULL, 64);
	vq.desc[0].addr = VQ_BASE + 0x10000; /* now fixed, but the device is broken until reset */
	vq_publish(&vq, 0);
	record(6, &vq);

	if ((err = fresh(&vq))) return err;
	RESULT[32] = vreg(base, VIRTIO_MMIO_INTERRUPT_STATUS);
	struct vbuf b = { VQ_BASE + 0x10000, 48, 1 };
	vq_submit(&vq, &b, 1);
	uint32_t id, len;
	if (vq_wait(&vq, &id, &len)) return 61;
	RESULT[30] = len;
	RESULT[31] = vreg(base, VIRTIO_MMIO_STATUS);
	return 0;
}
