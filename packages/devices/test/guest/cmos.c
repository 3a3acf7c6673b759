/* CMOS RTC: read the clock the way firmware does (wait for UIP clear, read twice until stable)
 * in the default BCD/24 h format, then switch register B to binary and read again.
 *   RESULT[0..7]  = sec, min, hour, weekday, day, month, year, century (BCD)
 *   RESULT[8..15] = the same in binary mode; RESULT[16] = register B, RESULT[17] = register D,
 *   RESULT[18] = hours in 12 h BCD mode (bit 7 = PM) */
#include "guest.h"

static uint8_t cmos(uint8_t reg) {
	outb(0x70, reg);
	return inb(0x71);
}

static const uint8_t regs[8] = { 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32 };

static void read_clock(volatile uint32_t *out) {
	uint8_t a[8], b[8];
	do {
		while (cmos(0x0a) & 0x80) {} /* update in progress */
		for (int i = 0; i < 8; i++) a[i] = cmos(regs[i]);
		for (int i = 0; i < 8; i++) b[i] = cmos(regs[i]);
	} while (memcmp(a, b, 8) != 0);
	for (int i = 0; i < 8; i++) out[i] = a[i];
}

int main(void) {
	RESULT[16] = cmos(0x0b);
	RESULT[17] = cmos(0x0d);
	read_clock(&RESULT[0]);
	outb(0x70, 0x0b);
	outb(0x71, (uint8_t)(RESULT[16] | 0x04)); /* binary */
	read_clock(&RESULT[8]);
	outb(0x70, 0x0b);
	outb(0x71, 0x00); /* BCD, 12 h */
	RESULT[18] = cmos(0x04);
	outb(0x70, 0x0b);
	outb(0x71, (uint8_t)RESULT[16]);
	return 0;
}
