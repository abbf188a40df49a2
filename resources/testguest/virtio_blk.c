/*
 * A minimal virtio-blk driver for the built-in test guest, enough to prove that the
 * VMM's virtio-mmio path works end to end on a KVM that cannot run Linux: the register
 * window on the MMIO bus, feature negotiation, a split queue in guest memory, the
 * queue notification (an ioeventfd in waterbear), the request served on the VMM's
 * event loop, and the interrupt (an irqfd on GSI 5, routed here through the IOAPIC).
 *
 * With `disk=1` on the command line the guest drives the first virtio device
 * (0xd0000000, GSI 5, waterbear's first --disk with --virtio-discovery cmdline or acpi
 * alike) and on every tick writes one sector (sector = tick % capacity, filled from the
 * tick number), flushes, reads it back and compares. It prints one line per tick before
 * the tick line:
 *     disk <tick> ok irqs <n>      or      disk <tick> BAD <what>
 * `irqs` counts the device's interrupts so far: it must grow, or the irqfd is not wired.
 * A read-only disk answers the write with an I/O error: `disk <tick> RO` (the guest
 * then only reads).
 */
#include <stdint.h>

#include "guest.h"

#define VIRTIO_BASE 0xd0000000UL
#define VIRTIO_GSI 5
#define VIRTIO_VECTOR 0x31

#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INTERRUPT_STATUS 0x060
#define R_INTERRUPT_ACK 0x064
#define R_STATUS 0x070
#define R_QUEUE_DESC 0x080
#define R_QUEUE_AVAIL 0x090
#define R_QUEUE_USED 0x0a0
#define R_CONFIG 0x100

#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8

#define F_RO 5
#define F_FLUSH 9
#define F_VERSION_1 32

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4

#define DESC_NEXT 1
#define DESC_WRITE 2

#define QSIZE 8

#define IOAPIC_BASE 0xfec00000UL

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags, next;
};

struct ring {
    struct desc desc[QSIZE];
    uint16_t avail_flags, avail_idx, avail_ring[QSIZE], used_event;
    uint8_t pad[2];
    uint16_t used_flags, used_idx;
    struct {
        uint32_t id, len;
    } used_ring[QSIZE];
    uint16_t avail_event;
} __attribute__((aligned(16)));

struct request {
    uint32_t type, reserved;
    uint64_t sector;
} __attribute__((aligned(16)));

static struct ring vq;
static struct request req;
static uint8_t data[512] __attribute__((aligned(16)));
static uint8_t check[512] __attribute__((aligned(16)));
static volatile uint8_t status;
static uint16_t last_used;
static uint64_t capacity;
static int read_only;
static volatile uint64_t interrupts;

static inline volatile uint32_t *reg(uint32_t offset)
{
    return (volatile uint32_t *)(VIRTIO_BASE + offset);
}

static inline void barrier(void)
{
    __asm__ volatile("mfence" ::: "memory");
}

__attribute__((interrupt)) static void virtio_isr(struct interrupt_frame *frame)
{
    (void)frame;
    *reg(R_INTERRUPT_ACK) = *reg(R_INTERRUPT_STATUS);
    interrupts++;
    lapic_eoi();
}

/* Routes GSI 5 to VIRTIO_VECTOR on the boot CPU: edge-triggered, active high. */
static void route_interrupt(void)
{
    volatile uint32_t *sel = (volatile uint32_t *)IOAPIC_BASE;
    volatile uint32_t *win = (volatile uint32_t *)(IOAPIC_BASE + 0x10);
    *sel = 0x10 + 2 * VIRTIO_GSI + 1;
    *win = 0; /* destination APIC ID 0 */
    *sel = 0x10 + 2 * VIRTIO_GSI;
    *win = VIRTIO_VECTOR;
}

static void fail(const char *what)
{
    puts("disk init BAD ");
    puts(what);
    puts("\n");
}

int vblk_init(void)
{
    /* The 8259s stay masked: every interrupt here comes through the IOAPIC or LAPIC. */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    if (*reg(R_MAGIC) != 0x74726976 || *reg(R_VERSION) != 2) {
        fail("no virtio-mmio device at 0xd0000000");
        return -1;
    }
    if (*reg(R_DEVICE_ID) != 2) {
        fail("the first virtio device is not a disk");
        return -1;
    }
    *reg(R_STATUS) = 0;
    *reg(R_STATUS) = S_ACKNOWLEDGE;
    *reg(R_STATUS) = S_ACKNOWLEDGE | S_DRIVER;
    *reg(R_DEVICE_FEATURES_SEL) = 0;
    uint32_t lo = *reg(R_DEVICE_FEATURES);
    *reg(R_DEVICE_FEATURES_SEL) = 1;
    uint32_t hi = *reg(R_DEVICE_FEATURES);
    if (!(hi & (1u << (F_VERSION_1 - 32)))) {
        fail("no VERSION_1");
        return -1;
    }
    read_only = (lo >> F_RO) & 1;
    *reg(R_DRIVER_FEATURES_SEL) = 0;
    *reg(R_DRIVER_FEATURES) = lo & ((1u << F_FLUSH) | (1u << F_RO));
    *reg(R_DRIVER_FEATURES_SEL) = 1;
    *reg(R_DRIVER_FEATURES) = 1u << (F_VERSION_1 - 32);
    *reg(R_STATUS) = S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK;
    if (!(*reg(R_STATUS) & S_FEATURES_OK)) {
        fail("features refused");
        return -1;
    }
    *reg(R_QUEUE_SEL) = 0;
    if (*reg(R_QUEUE_NUM_MAX) < QSIZE) {
        fail("queue too small");
        return -1;
    }
    *reg(R_QUEUE_NUM) = QSIZE;
    uint64_t a;
    a = (uint64_t)&vq.desc;
    reg(R_QUEUE_DESC)[0] = (uint32_t)a;
    reg(R_QUEUE_DESC)[1] = (uint32_t)(a >> 32);
    a = (uint64_t)&vq.avail_flags;
    reg(R_QUEUE_AVAIL)[0] = (uint32_t)a;
    reg(R_QUEUE_AVAIL)[1] = (uint32_t)(a >> 32);
    a = (uint64_t)&vq.used_flags;
    reg(R_QUEUE_USED)[0] = (uint32_t)a;
    reg(R_QUEUE_USED)[1] = (uint32_t)(a >> 32);
    *reg(R_QUEUE_READY) = 1;
    capacity = *(volatile uint64_t *)(VIRTIO_BASE + R_CONFIG);
    set_gate(VIRTIO_VECTOR, virtio_isr);
    route_interrupt();
    *reg(R_STATUS) = S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK;
    if (capacity == 0) {
        fail("zero capacity");
        return -1;
    }
    puts("disk capacity ");
    put_dec(capacity);
    puts(read_only ? " ro\n" : " rw\n");
    return 0;
}

/* Submits one request and waits for the device to complete it; returns its status. */
static uint8_t submit(uint32_t type, uint64_t sector, uint8_t *buf)
{
    req.type = type;
    req.reserved = 0;
    req.sector = sector;
    status = 0xff;
    vq.desc[0] = (struct desc){ (uint64_t)&req, sizeof(req), DESC_NEXT, 1 };
    int n = 1;
    if (buf) {
        uint16_t flags = DESC_NEXT | (type == T_IN ? DESC_WRITE : 0);
        vq.desc[1] = (struct desc){ (uint64_t)buf, 512, flags, 2 };
        n = 2;
    }
    vq.desc[n - 1].next = (uint16_t)n;
    vq.desc[n] = (struct desc){ (uint64_t)&status, 1, DESC_WRITE, 0 };
    vq.avail_ring[vq.avail_idx % QSIZE] = 0;
    barrier();
    vq.avail_idx++;
    barrier();
    *reg(R_QUEUE_NOTIFY) = 0;
    /* Any interrupt (the device's or the timer's) ends the hlt. */
    while (*(volatile uint16_t *)&vq.used_idx == last_used)
        __asm__ volatile("sti; hlt; cli");
    last_used++;
    barrier();
    return status;
}

void vblk_tick(uint64_t tick)
{
    uint64_t sector = tick % capacity;
    for (int i = 0; i < 512; i++)
        data[i] = (uint8_t)(tick * 31 + (uint64_t)i);
    puts("disk ");
    put_dec(tick);
    if (!read_only) {
        uint8_t s = submit(T_OUT, sector, data);
        if (s != 0) {
            puts(" BAD write status ");
            put_dec(s);
            puts("\n");
            return;
        }
        s = submit(T_FLUSH, 0, 0);
        if (s != 0) {
            puts(" BAD flush status ");
            put_dec(s);
            puts("\n");
            return;
        }
    } else if (submit(T_OUT, sector, data) != 1) {
        puts(" BAD read-only disk accepted a write\n");
        return;
    }
    uint8_t s = submit(T_IN, sector, check);
    if (s != 0) {
        puts(" BAD read status ");
        put_dec(s);
        puts("\n");
        return;
    }
    if (!read_only) {
        for (int i = 0; i < 512; i++) {
            if (check[i] != data[i]) {
                puts(" BAD read back differs\n");
                return;
            }
        }
    }
    puts(read_only ? " RO irqs " : " ok irqs ");
    put_dec(interrupts);
    puts("\n");
}
