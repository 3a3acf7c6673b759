/* Shared helpers of the freestanding test guests (x86-64, ring 0, identity-mapped, polling). */
#ifndef TSVM_TEST_GUEST_H
#define TSVM_TEST_GUEST_H

#include <stddef.h>
#include <stdint.h>

/* Fixed guest-physical addresses the host side reads (see guest-build.ts GUEST_LAYOUT). */
#define RESULT_BASE 0x300000UL /* uint32_t results[] the host inspects */
#define RESULT_DATA 0x301000UL /* byte buffers copied out for the host */
#define VQ_BASE 0x200000UL     /* virtqueue rings and buffers */
#define VIRTIO_BASE 0xd0000000UL

#define RESULT ((volatile uint32_t *)RESULT_BASE)

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) {
	uint8_t v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline void barrier(void) { __asm__ volatile("mfence" : : : "memory"); }
static inline uint32_t mmio_read32(uintptr_t a) { return *(volatile uint32_t *)a; }
static inline void mmio_write32(uintptr_t a, uint32_t v) { *(volatile uint32_t *)a = v; }

void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);

/* COM1 at 0x3f8, polled: diagnostics for the host (shown when a test fails). */
void uart_putc(char c);
void uart_puts(const char *s);
void uart_puthex(uint64_t v);

#endif
