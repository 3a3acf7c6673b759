/* What gcc may call even in freestanding code, and polled COM1 output. */
#include "guest.h"

void *memset(void *d, int c, size_t n) {
	volatile uint8_t *p = d; /* volatile: keep gcc from turning this loop into a memset call */
	while (n--) *p++ = (uint8_t)c;
	return d;
}

void *memcpy(void *d, const void *s, size_t n) {
	volatile uint8_t *p = d;
	const uint8_t *q = s;
	while (n--) *p++ = *q++;
	return d;
}

int memcmp(const void *a, const void *b, size_t n) {
	const uint8_t *p = a, *q = b;
	for (; n; n--, p++, q++)
		if (*p != *q) return *p - *q;
	return 0;
}

#define COM1 0x3f8
void uart_putc(char c) {
	while (!(inb(COM1 + 5) & 0x20)) {} /* LSR.THRE */
	outb(COM1, (uint8_t)c);
}

void uart_puts(const char *s) {
	while (*s) uart_putc(*s++);
}

void uart_puthex(uint64_t v) {
	uart_puts("0x");
	int started = 0;
	for (int i = 60; i >= 0; i -= 4) {
		unsigned d = (v >> i) & 0xf;
		if (d || started || i == 0) {
			uart_putc("0123456789abcdef"[d]);
			started = 1;
		}
	}
}
