/*
 * waterbear's built-in test guest: a few hundred bytes of x86_64 code that proves a
 * VM runs and, later, that its state survives snapshot, restore and live update.
 *
 * It prints a banner, then one line per timer tick:
 *     tick <n> sum <checksum> ok|BAD
 * The ticks come from the local APIC timer in periodic mode. On every tick the guest
 * changes one word of a memory region, keeps a running checksum of the region in a
 * variable, and recomputes the checksum over the whole region: "ok" means the two
 * agree. A counter that goes on from where it was and "ok" after a restore show that
 * guest memory and CPU state came back intact; a timer that keeps ticking shows the
 * interrupt state did.
 *
 * Parameters come from the kernel command line (boot_params.cmd_line_ptr):
 *     ticks=N     stop after N ticks: print "done N sum X" and reset through the
 *                 i8042 controller, which makes waterbear exit 0 (0 = run forever)
 *     tick_ms=M   timer period in milliseconds (default 100)
 *     region_kib=K size of the checksummed region (default 16, at most 64)
 *     disk=1      drive the first virtio device as a disk on every tick (virtio_blk.c)
 * Keep the per-tick work tiny: on software KVM guest code runs slowly.
 */
#include <stdint.h>

#include "guest.h"

#define COM1_THR 0x3f8
#define I8042_CMD 0x64
#define I8042_RESET 0xfe

#define LAPIC_BASE 0xfee00000UL
#define LAPIC_EOI 0x0b0
#define LAPIC_SVR 0x0f0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_DIV 0x3e0
#define TIMER_VECTOR 0x20
#define SPURIOUS_VECTOR 0xff
#define LVT_PERIODIC (1u << 17)
/* KVM's APIC timer counts at 1 GHz; divide by 128 gives 7812.5 counts per ms. */
#define TIMER_DIVIDE_128 0xa
#define COUNTS_PER_MS_X2 15625u

#define CODE_SELECTOR 0x08
#define MAX_REGION_WORDS (64 * 1024 / 8)

struct idt_entry {
    uint16_t offset_lo, selector;
    uint8_t ist, type;
    uint16_t offset_mid;
    uint32_t offset_hi, reserved;
} __attribute__((packed));

struct idt_ptr {
    uint16_t limit;
    uint64_t base;
} __attribute__((packed));

static struct idt_entry idt[256];
static volatile uint64_t timer_interrupts;
static uint64_t region[MAX_REGION_WORDS];

static inline volatile uint32_t *lapic(uint32_t reg)
{
    return (volatile uint32_t *)(LAPIC_BASE + reg);
}

void puts(const char *s)
{
    while (*s)
        outb(COM1_THR, (uint8_t)*s++);
}

void put_dec(uint64_t v)
{
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    puts(&buf[i]);
}

static void put_hex32(uint32_t v)
{
    char buf[9];
    for (int i = 7; i >= 0; i--, v >>= 4)
        buf[i] = "0123456789abcdef"[v & 0xf];
    buf[8] = 0;
    puts(buf);
}

/* Returns the decimal value of "key=" in the command line, or dflt. */
static uint64_t param(const char *cmdline, const char *key, uint64_t dflt)
{
    for (const char *p = cmdline; p && *p; p++) {
        if (p != cmdline && p[-1] != ' ')
            continue;
        const char *k = key, *q = p;
        while (*k && *q == *k)
            k++, q++;
        if (*k || *q != '=')
            continue;
        uint64_t v = 0;
        for (q++; *q >= '0' && *q <= '9'; q++)
            v = v * 10 + (uint64_t)(*q - '0');
        return v;
    }
    return dflt;
}

void lapic_eoi(void)
{
    *lapic(LAPIC_EOI) = 0;
}

__attribute__((interrupt)) static void timer_isr(struct interrupt_frame *frame)
{
    (void)frame;
    timer_interrupts++;
    lapic_eoi();
}

__attribute__((interrupt)) static void spurious_isr(struct interrupt_frame *frame)
{
    (void)frame;
}

void set_gate(int vector, void (*handler)(struct interrupt_frame *))
{
    uint64_t a = (uint64_t)handler;
    idt[vector] = (struct idt_entry){
        .offset_lo = (uint16_t)a,
        .selector = CODE_SELECTOR,
        .type = 0x8e, /* present, interrupt gate */
        .offset_mid = (uint16_t)(a >> 16),
        .offset_hi = (uint32_t)(a >> 32),
    };
}

static uint32_t region_sum(uint64_t words)
{
    uint64_t s = 0;
    for (uint64_t i = 0; i < words; i++)
        s += region[i] ^ i;
    return (uint32_t)(s ^ (s >> 32));
}

static void reset_machine(void)
{
    outb(I8042_CMD, I8042_RESET);
    for (;;)
        __asm__ volatile("cli; hlt");
}

void guest_main(const uint8_t *boot_params)
{
    const char *cmdline = (const char *)(uint64_t)*(const uint32_t *)(boot_params + 0x228);
    uint64_t max_ticks = param(cmdline, "ticks", 0);
    uint64_t tick_ms = param(cmdline, "tick_ms", 100);
    uint64_t words = param(cmdline, "region_kib", 16) * 1024 / 8;
    uint64_t disk = param(cmdline, "disk", 0);
    if (words == 0 || words > MAX_REGION_WORDS)
        words = 16 * 1024 / 8;
    if (tick_ms == 0)
        tick_ms = 1;

    puts("waterbear test guest: ticking every ");
    put_dec(tick_ms);
    puts(" ms\n");

    for (uint64_t i = 0; i < words; i++)
        region[i] = i * 0x9e3779b97f4a7c15ull;
    uint64_t expected = 0;
    for (uint64_t i = 0; i < words; i++)
        expected += region[i] ^ i;

    set_gate(TIMER_VECTOR, timer_isr);
    set_gate(SPURIOUS_VECTOR, spurious_isr);
    struct idt_ptr ip = { sizeof(idt) - 1, (uint64_t)idt };
    __asm__ volatile("lidt %0" : : "m"(ip));

    if (disk && vblk_init() != 0)
        disk = 0;

    *lapic(LAPIC_SVR) = 0x100 | SPURIOUS_VECTOR;
    *lapic(LAPIC_TIMER_DIV) = TIMER_DIVIDE_128;
    *lapic(LAPIC_LVT_TIMER) = LVT_PERIODIC | TIMER_VECTOR;
    *lapic(LAPIC_TIMER_INIT) = (uint32_t)(tick_ms * COUNTS_PER_MS_X2 / 2);

    uint64_t ticks = 0;
    for (;;) {
        __asm__ volatile("sti; hlt; cli");
        if (timer_interrupts == ticks)
            continue;
        ticks++;
        /* Change one word and keep the expected sum in step with it. */
        uint64_t i = (ticks * 7) % words;
        expected -= region[i] ^ i;
        region[i] += ticks;
        expected += region[i] ^ i;
        uint32_t sum = region_sum(words);
        if (disk)
            vblk_tick(ticks);

        puts(max_ticks && ticks == max_ticks ? "done " : "tick ");
        put_dec(ticks);
        puts(" sum ");
        put_hex32(sum);
        puts(sum == (uint32_t)(expected ^ (expected >> 32)) ? " ok\n" : " BAD\n");
        if (max_ticks && ticks >= max_ticks)
            reset_machine();
    }
}
