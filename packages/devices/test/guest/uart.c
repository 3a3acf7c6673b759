/* 16550 UART: program the line, check DLAB/scratch registers, print by polling LSR.THRE, then
 * read a line the host injects while the guest runs (polling LSR.DR) and echo it back. */
#include "guest.h"

#define COM1 0x3f8
#define LSR_DR 0x01

static int getc_polled(void) {
	while (!(inb(COM1 + 5) & LSR_DR)) {} /* the host's run timeout bounds this */
	return inb(COM1);
}

int main(void) {
	outb(COM1 + 1, 0x00); /* IER: no interrupts */
	outb(COM1 + 3, 0x80); /* DLAB */
	outb(COM1 + 0, 0x01); /* 115200 baud */
	outb(COM1 + 1, 0x00);
	if (inb(COM1 + 0) != 0x01 || inb(COM1 + 1) != 0x00) return 2;
	outb(COM1 + 3, 0x03); /* 8N1, DLAB off */
	if (inb(COM1 + 3) != 0x03) return 3;
	outb(COM1 + 2, 0xc7); /* FIFO on, clear both, 14-byte trigger */
	if ((inb(COM1 + 2) & 0xc0) != 0xc0) return 4; /* IIR reports FIFOs enabled */
	outb(COM1 + 7, 0x5a);
	if (inb(COM1 + 7) != 0x5a) return 5;
	if (inb(COM1 + 5) & LSR_DR) return 6; /* nothing received yet */

	uart_puts("hello from the guest\n");
	uart_puts("ready\n");

	/* Echo one line back, uppercased, and keep a copy for the host. */
	volatile uint8_t *copy = (volatile uint8_t *)RESULT_DATA;
	unsigned n = 0;
	uart_puts("echo: ");
	for (;;) {
		int c = getc_polled();
		copy[n++] = (uint8_t)c;
		if (c >= 'a' && c <= 'z') c -= 32;
		uart_putc((char)c);
		if (c == '\n' || n >= 200) break;
	}
	RESULT[0] = n;
	if (inb(COM1 + 5) & LSR_DR) return 7; /* the line was all there was */
	return 0;
}
