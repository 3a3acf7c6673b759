/* i8042: self-test (0xAA -> 0x55), read and write the configuration byte, then pulse the reset
 * line (0xFE). Nothing after the reset command may run.
 *   RESULT[0] = self-test answer, RESULT[1] = config byte read back, RESULT[2] = status. */
#include "guest.h"

static int read_data(void) {
	for (unsigned spin = 0; spin < 1000; spin++)
		if (inb(0x64) & 0x01) return inb(0x60);
	return -1;
}

int main(void) {
	RESULT[2] = inb(0x64);
	outb(0x64, 0xaa);
	RESULT[0] = (uint32_t)read_data();
	outb(0x64, 0x60); /* write config */
	outb(0x60, 0x47);
	outb(0x64, 0x20); /* read config */
	RESULT[1] = (uint32_t)read_data();
	uart_puts("resetting\n");
	outb(0x64, 0xfe);
	uart_puts("still running after reset\n");
	return 0x42;
}
