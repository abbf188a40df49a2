/* Entry of the built-in test guest. waterbear enters here in 64-bit mode with paging
 * on (first 4 GiB identity mapped), interrupts off, and %rsi pointing at the Linux
 * boot_params page, exactly as it enters a Linux vmlinux without PVH. */
    .section .text.start, "ax"
    .global _start
_start:
    cli
    lea     stack_top(%rip), %rsp
    mov     %rsi, %rdi              /* boot_params pointer is guest_main's argument */
    /* Zero .bss (a reused memory file may hold anything) with one string
     * instruction: a byte loop costs a million instructions here, seconds on a
     * software KVM. The linker script keeps .bss 8-byte aligned and sized. */
    mov     %rdi, %r8
    lea     __bss_start(%rip), %rdi
    lea     __bss_end(%rip), %rcx
    sub     %rdi, %rcx
    shr     $3, %rcx
    xor     %eax, %eax
    cld
    rep stosq
    mov     %r8, %rdi
    call    guest_main
3:  cli
    hlt
    jmp     3b

    .section .bss
    .balign 16
stack:
    .skip   4096
stack_top:

    .section .note.GNU-stack, "", @progbits
