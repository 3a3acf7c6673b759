/* virtio-rng: full init, then two requests (one 64-byte buffer; a 100-byte two-descriptor chain),
 * polling the used ring. Results for the host:
 *   RESULT[0..1] = used.len of the requests, RESULT[2..3] = used.id, RESULT[4] = InterruptStatus
 *   after the requests, RESULT[5] = InterruptStatus after the ack, RESULT[6] = Status,
 *   RESULT[7] = queue size used; RESULT_DATA = the 64 bytes, then the 100 bytes. */
#include "virtio.h"

int main(void) {
	uintptr_t base = VIRTIO_BASE;
	uint64_t features;
	int err = virtio_begin(base, 4, 0, &features);
	if (err) return err;
	struct vq vq;
	if ((err = virtio_queue(base, 0, 8, &vq))) return err;
	if (!(virtio_driver_ok(base) & VIRTIO_STATUS_DRIVER_OK)) return 30;

	uint8_t *buf = (uint8_t *)(VQ_BASE + 0x10000);
	memset(buf, 0xaa, 256);
	struct vbuf one = { (uintptr_t)buf, 64, 1 };
	vq_submit(&vq, &one, 1);
	uint32_t id, len;
	if (vq_wait(&vq, &id, &len)) return 31;
	RESULT[0] = len;
	RESULT[2] = id;
	memcpy((void *)RESULT_DATA, buf, 64);

	struct vbuf two[2] = { { (uintptr_t)buf + 128, 32, 1 }, { (uintptr_t)buf + 160, 68, 1 } };
	vq_submit(&vq, two, 2);
	if (vq_wait(&vq, &id, &len)) return 32;
	RESULT[1] = len;
	RESULT[3] = id;
	memcpy((void *)(RESULT_DATA + 64), buf + 128, 100);

	uint32_t isr = vreg(base, VIRTIO_MMIO_INTERRUPT_STATUS);
	RESULT[4] = isr;
	vwrite(base, VIRTIO_MMIO_INTERRUPT_ACK, isr);
	RESULT[5] = vreg(base, VIRTIO_MMIO_INTERRUPT_STATUS);
	RESULT[6] = vreg(base, VIRTIO_MMIO_STATUS);
	RESULT[7] = vq.size;
	return 0;
}
