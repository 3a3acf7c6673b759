/* Entry of the device-bench guest. Multiboot v1 with the a.out kludge, so QEMU's -kernel and
 * tsvm's loadMultiboot load the same ELF64 file the same way and enter it in flat 32-bit protected
 * mode, paging off, EAX = 0x2BADB002, EBX = multiboot info. From there the guest builds its own
 * identity map of the low 4 GiB (2 MiB pages; the virtio-mmio window is at 3.25 GiB), enters long
 * mode, and calls main(magic, info). main's return value goes to the debug-exit port (0xf4):
 * 0 becomes QEMU's exit status 1 and tsvm's stop { reason: 'debug-exit', code: 1 }.
 * Interrupts stay off (IF = 0) throughout; nothing installs an IDT, so a fault triple-faults. */
#define MB_MAGIC 0x1badb002
#define MB_FLAGS 0x00010000 /* a.out kludge: the load addresses below, not the ELF headers */

	.section .text.start, "ax"
	.code32
	.align 4
mb_header:
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)
	.long mb_header   /* header_addr */
	.long __load_start /* load_addr */
	.long __load_end  /* load_end_addr */
	.long __bss_end   /* bss_end_addr: the loaders zero [load_end, bss_end) */
	.long _start32    /* entry_addr */

	.globl _start32
_start32:
	cli
	mov %eax, mb_magic
	mov %ebx, mb_info
	mov $stack_top, %esp

	/* PML4, PDPT and four page directories (6 pages), zeroed, then 2048 2 MiB identity pages. */
	mov $pml4, %edi
	xor %eax, %eax
	mov $(6 * 4096 / 4), %ecx
	rep stosl
	movl $(pdpt + 3), pml4
	movl $(pd + 0 * 4096 + 3), pdpt + 0
	movl $(pd + 1 * 4096 + 3), pdpt + 8
	movl $(pd + 2 * 4096 + 3), pdpt + 16
	movl $(pd + 3 * 4096 + 3), pdpt + 24
	xor %ecx, %ecx
1:	mov %ecx, %eax
	shl $21, %eax
	or $0x83, %eax /* present, writable, 2 MiB */
	mov %eax, pd(, %ecx, 8)
	inc %ecx
	cmp $2048, %ecx
	jb 1b

	mov %cr4, %eax
	or $0x20, %eax /* PAE */
	mov %eax, %cr4
	mov $pml4, %eax
	mov %eax, %cr3
	mov $0xc0000080, %ecx /* EFER */
	rdmsr
	or $0x100, %eax /* LME */
	wrmsr
	mov %cr0, %eax
	or $0x80000001, %eax /* PG | PE */
	mov %eax, %cr0
	lgdt gdt_ptr
	ljmp $0x08, $long_mode

	.code64
long_mode:
	mov $0x10, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	mov %eax, %fs
	mov %eax, %gs
	mov $stack_top, %rsp
	xor %ebp, %ebp
	mov mb_magic, %edi
	mov mb_info, %esi
	call main
	mov $0xf4, %dx
	out %al, %dx
2:	hlt
	jmp 2b

	.section .rodata
	.align 16
gdt:
	.quad 0
	.quad 0x00af9a000000ffff /* 0x08: 64-bit code */
	.quad 0x00cf92000000ffff /* 0x10: data */
gdt_ptr:
	.word gdt_ptr - gdt - 1
	.long gdt

	.section .bss
	.align 4096
pml4:	.skip 4096
pdpt:	.skip 4096
pd:	.skip 4 * 4096
stack:	.skip 16384
stack_top:
mb_magic: .skip 4
mb_info: .skip 4

	.section .note.GNU-stack, "", @progbits
