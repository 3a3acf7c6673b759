/* virtio-console: negotiate EMERG_WRITE and print through config space, then send a line on the
 * transmit queue, receive what the host queued on the receive queue and echo it back.
 *   RESULT[0] = features accepted (low), [1] = rx used.len, [2] = tx used.len,
 *   RESULT_DATA = the bytes received. */
#include "virtio.h"

int main(void) {
	uintptr_t base = VIRTIO_BASE;
	uint64_t features;
	int err = virtio_begin(base, 3, 1u << 2, &features); /* VIRTIO_CONSOLE_F_EMERG_WRITE */
	if (err) return err;
	RESULT[0] = (uint32_t)features;
	struct vq rx, tx;
	if ((err = virtio_queue(base, 0, 8, &rx))) return err;
	if ((err = virtio_queue(base, 1, 8, &tx))) return err;
	if (!(virtio_driver_ok(base) & VIRTIO_STATUS_DRIVER_OK)) return 50;

	const char *emerg = "emergency!\n";
	for (const char *p = emerg; *p; p++) vwrite(base, VIRTIO_MMIO_CONFIG + 8, (uint8_t)*p);

	char *out = (char *)(VQ_BASE + 0x10000);
	const char line[] = "hello over virtio-console\n";
	memcpy(out, line, sizeof line - 1);
	struct vbuf b = { (uintptr_t)out, sizeof line - 1, 0 };
	vq_submit(&tx, &b, 1);
	uint32_t id, len;
	if (vq_wait(&tx, &id, &len)) return 51;
	RESULT[2] = len;

	char *in = (char *)(VQ_BASE + 0x11000);
	memset(in, 0, 64);
	struct vbuf r = { (uintptr_t)in, 64, 1 };
	vq_submit(&rx, &r, 1);
	if (vq_wait(&rx, &id, &len)) return 52;
	RESULT[1] = len;
	memcpy((void *)RESULT_DATA, in, len);

	const char prefix[] = "echo: ";
	memcpy(out, prefix, sizeof prefix - 1);
	memcpy(out + sizeof prefix - 1, in, len);
	struct vbuf e = { (uintptr_t)out, (uint32_t)(sizeof prefix - 1 + len), 0 };
	vq_submit(&tx, &e, 1);
	if (vq_wait(&tx, &id, &len)) return 53;
	return 0;
}
