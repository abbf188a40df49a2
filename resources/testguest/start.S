/* Entry of the built-in test guest. waterbear enters here in 64-bit mode with paging
 * on (first 4 GiB identity mapped), interrupts off, and %rsi pointing at the Linux
 * boot_params page, exactly as it enters a Linux vmlinux without PVH. */
    .section .text.start, "ax"
    .global _start
_start:
    cli
    lea     stack_top(%rip), %rsp
    mov     %rsi, %rdi              /* boot_params pointer is guest_main's argument */
    /* Zero .bss: a reused memory file may hold anything. */
    lea     __bss_start(%rip), %rcx
    lea     __bss_end(%rip), %rdx
1:  cmp     %rdx, %rcx
    jae     2f
    movb    $0, (%rcx)
    inc     %rcx
    jmp     1b
2:  call    guest_main
3:  cli
    hlt
    jmp     3b

    .section .bss
    .balign 16
stack:
    .skip   4096
stack_top:

    .section .note.GNU-stack, "", @progbits
