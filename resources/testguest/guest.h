/* What the built-in test guest's parts share: port output, the console, the IDT and the
 * local APIC. */
#ifndef WATERBEAR_TESTGUEST_H
#define WATERBEAR_TESTGUEST_H

#include <stdint.h>

struct interrupt_frame;

static inline void outb(uint16_t port, uint8_t v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

void puts(const char *s);
void put_dec(uint64_t v);
void set_gate(int vector, void (*handler)(struct interrupt_frame *));
void lapic_eoi(void);

/* virtio_blk.c */
int vblk_init(void);
void vblk_tick(uint64_t tick);

#endif
