/* Interrupt-driven I/O through the in-kernel irqchip: the guest installs its own IDT, masks the
 * 8259s, enables the local APIC and routes IOAPIC pins 4 (COM1) and 5 (virtio-mmio) as
 * level-triggered vectors 0x34 / 0x35, then waits with `sti; hlt` for
 *   1. the virtio-rng used-buffer interrupt of one request (the handler reads and acks
 *      InterruptStatus, then EOIs), and
 *   2. COM1 received-data interrupts while the host types a line (the handler drains RBR).
 *   RESULT[0] = virtio interrupts, [1] = InterruptStatus seen by the handler, [2] = used.len,
 *   RESULT[3] = COM1 interrupts, [4] = bytes received; RESULT_DATA = the bytes. */
#include "virtio.h"

#define IOAPIC 0xfec00000UL
#define LAPIC 0xfee00000UL
#define COM1 0x3f8
#define VEC_COM1 0x34
#define VEC_VIRTIO 0x35

struct idt_entry {
	uint16_t off0, sel;
	uint8_t ist, type;
	uint16_t off1;
	uint32_t off2, zero;
} __attribute__((packed));

static struct idt_entry idt[256] __attribute__((aligned(16)));
static volatile unsigned virtio_irqs, com1_irqs, received, line_done;
static volatile uint32_t virtio_isr;

void irq_stub_com1(void);
void irq_stub_virtio(void);

/* Interrupt entry stubs: save the caller-saved registers (nine pushes after the 40-byte frame
 * keep the stack 16-byte aligned at the call), run the C handler, return with iretq. */
__asm__(
	".macro IRQ_STUB name, handler\n"
	"\t.globl \\name\n"
	"\\name:\n"
	"\tpush %rax; push %rcx; push %rdx; push %rsi; push %rdi\n"
	"\tpush %r8; push %r9; push %r10; push %r11\n"
	"\tcall \\handler\n"
	"\tpop %r11; pop %r10; pop %r9; pop %r8\n"
	"\tpop %rdi; pop %rsi; pop %rdx; pop %rcx; pop %rax\n"
	"\tiretq\n"
	".endm\n"
	".text\n"
	"IRQ_STUB irq_stub_com1, com1_irq\n"
	"IRQ_STUB irq_stub_virtio, virtio_irq\n");

static void set_gate(unsigned vec, void (*fn)(void)) {
	uintptr_t a = (uintptr_t)fn;
	idt[vec] = (struct idt_entry){ (uint16_t)a, 0x08, 0, 0x8e, (uint16_t)(a >> 16), (uint32_t)(a >> 32), 0 };
}

static void ioapic_route(unsigned pin, unsigned vector) {
	mmio_write32(IOAPIC, 0x10 + 2 * pin + 1);
	mmio_write32(IOAPIC + 0x10, 0); /* destination: APIC ID 0 */
	mmio_write32(IOAPIC, 0x10 + 2 * pin);
	mmio_write32(IOAPIC + 0x10, vector | (1u << 15)); /* fixed, physical, active high, level, unmasked */
}

static void eoi(void) { mmio_write32(LAPIC + 0xb0, 0); }

void virtio_irq(void) {
	uint32_t isr = vreg(VIRTIO_BASE, VIRTIO_MMIO_INTERRUPT_STATUS);
	virtio_isr |= isr;
	vwrite(VIRTIO_BASE, VIRTIO_MMIO_INTERRUPT_ACK, isr); /* lowers the line before the EOI */
	virtio_irqs++;
	eoi();
}

void com1_irq(void) {
	while (inb(COM1 + 5) & 0x01) {
		uint8_t c = inb(COM1);
		((volatile uint8_t *)RESULT_DATA)[received++] = c;
		if (c == '\n' || received >= 200) line_done = 1;
	}
	com1_irqs++;
	eoi();
}

static void wait_for(volatile unsigned *flag) {
	while (!*flag) __asm__ volatile("sti; hlt; cli" : : : "memory");
}

int main(void) {
	set_gate(VEC_COM1, irq_stub_com1);
	set_gate(VEC_VIRTIO, irq_stub_virtio);
	struct __attribute__((packed)) { uint16_t limit; uint64_t base; } idtr = { sizeof idt - 1, (uintptr_t)idt };
	__asm__ volatile("lidt %0" : : "m"(idtr));

	outb(0x21, 0xff); /* mask both 8259s: the IOAPIC delivers */
	outb(0xa1, 0xff);
	mmio_write32(LAPIC + 0x80, 0);                               /* TPR: accept everything */
	mmio_write32(LAPIC + 0xf0, mmio_read32(LAPIC + 0xf0) | 0x1ff); /* SVR: enable, spurious 0xff */
	ioapic_route(4, VEC_COM1);
	ioapic_route(5, VEC_VIRTIO);

	/* 1. virtio-rng: the completion interrupt is raised during the notify exit. */
	int err = virtio_begin(VIRTIO_BASE, 4, 0, 0);
	if (err) return err;
	struct vq vq;
	if ((err = virtio_queue(VIRTIO_BASE, 0, 8, &vq))) return err;
	if (!(virtio_driver_ok(VIRTIO_BASE) & VIRTIO_STATUS_DRIVER_OK)) return 70;
	struct vbuf b = { VQ_BASE + 0x10000, 32, 1 };
	vq_submit(&vq, &b, 1);
	wait_for(&virtio_irqs);
	uint32_t id, len;
	if (vq_wait(&vq, &id, &len)) return 71;
	RESULT[0] = virtio_irqs;
	RESULT[1] = virtio_isr;
	RESULT[2] = len;

	/* 2. COM1: received-data interrupts while the host types a line. */
	outb(COM1 + 3, 0x03);
	outb(COM1 + 2, 0x00); /* no FIFO: one byte per interrupt at most */
	outb(COM1 + 4, 0x08); /* OUT2 */
	outb(COM1 + 1, 0x01); /* IER: received data available */
	uart_puts("irq-ready\n");
	wait_for(&line_done);
	outb(COM1 + 1, 0x00);
	RESULT[3] = com1_irqs;
	RESULT[4] = received;
	return 0;
}
