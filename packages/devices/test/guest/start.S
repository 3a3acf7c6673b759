/* Entry of every test guest: a stack, main(), then report main's return value through the
 * debug-exit port (code = (v << 1) | 1 on the host side). Interrupts stay off (IF = 0). */
	.section .text.start, "ax"
	.globl _start
_start:
	mov $0x80000, %rsp
	xor %ebp, %ebp
	call main
	mov $0xf4, %dx
	out %al, %dx
1:	hlt
	jmp 1b

	.section .note.GNU-stack, "", @progbits

