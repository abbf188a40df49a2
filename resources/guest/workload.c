/*
 * wb-workload: the waterbear guest workload.
 *
 * Fills a region of anonymous memory with a pattern derived from a seed, remembers its
 * checksum, then prints a tick line every interval and re-checks the region every few
 * ticks. Tests read these lines to tell a guest that continued (same boot_id, tick
 * counter still increasing, memory intact) from one that rebooted or lost memory.
 * The line formats are documented in resources/guest/README.md; keep them in sync.
 *
 *   wb-workload [--fill-mib N] [--seed N] [--verify-every N] [--ticks N] [--interval-ms N]
 *   wb-workload --drain     wait until the console has sent all queued output, then exit
 *   wb-workload --write-records FILE [--interval-ms N] [--ticks N]
 *                           the disk writer: numbered records, each made durable with
 *                           fsync before its WB-DISK-ACK line (see write_records below)
 *
 * --ticks 0 (the default) runs forever. With a finite count the region is also checked
 * after the last tick, and the exit status is 0 only if every check passed.
 *
 * Built static (gcc -static -O2) by tools/guest/build-initramfs. It is deliberately
 * light: guests may run under nested emulation at a few million instructions a second.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

struct options {
	const char *records_file;
	uint64_t fill_mib;
	uint64_t seed;
	uint64_t verify_every;
	uint64_t ticks;
	uint64_t interval_ms;
};

/*
 * Writes one whole line with a single write(2) so that lines are never buffered inside
 * the process (a snapshot must not catch output sitting in a stdio buffer) and are not
 * split by other writers to the console.
 */
static void emit(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	int len;

	va_start(ap, fmt);
	len = vsnprintf(line, sizeof(line) - 1, fmt, ap);
	va_end(ap);
	if (len < 0)
		return;
	if ((size_t)len > sizeof(line) - 2)
		len = sizeof(line) - 2;
	line[len++] = '\n';

	const char *p = line;
	while (len > 0) {
		ssize_t n = write(STDOUT_FILENO, p, (size_t)len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return;
		}
		p += n;
		len -= (int)n;
	}
}

static void usage_exit(const char *why)
{
	fprintf(stderr, "wb-workload: %s\n"
		"usage: wb-workload [--fill-mib N] [--seed N] [--verify-every N] [--ticks N]"
		" [--interval-ms N]\n"
		"       wb-workload --drain\n"
		"       wb-workload --write-records FILE [--interval-ms N] [--ticks N]\n", why);
	exit(2);
}

static uint64_t parse_u64(const char *name, const char *value)
{
	char *end;

	if (value == NULL)
		usage_exit("missing value");
	errno = 0;
	unsigned long long v = strtoull(value, &end, 0);
	if (errno != 0 || end == value || *end != '\0' || value[0] == '-') {
		fprintf(stderr, "wb-workload: %s wants a non-negative integer, got '%s'\n",
			name, value);
		exit(2);
	}
	return v;
}

/* Reads the first whitespace-delimited word of a small file, or "unknown". */
static void read_word(const char *path, char *buf, size_t size)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	ssize_t n = -1;

	if (fd >= 0) {
		n = read(fd, buf, size - 1);
		close(fd);
	}
	if (n <= 0) {
		snprintf(buf, size, "unknown");
		return;
	}
	buf[n] = '\0';
	buf[strcspn(buf, " \t\n")] = '\0';
}

/* xorshift64*: cheap, and every seed (including 0, remapped) gives a distinct stream. */
static uint64_t next_word(uint64_t *state)
{
	uint64_t x = *state;

	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*state = x;
	return x * 0x2545f4914f6cdd1dULL;
}

static void fill(uint64_t *words, size_t count, uint64_t seed)
{
	uint64_t state = seed ? seed : 0x9e3779b97f4a7c15ULL;

	for (size_t i = 0; i < count; i++)
		words[i] = next_word(&state);
}

/* FNV-1a over 64-bit words: one xor and one multiply per word. */
static uint64_t checksum(const uint64_t *words, size_t count)
{
	uint64_t h = 0xcbf29ce484222325ULL;

	for (size_t i = 0; i < count; i++)
		h = (h ^ words[i]) * 0x100000001b3ULL;
	return h;
}

static void sleep_ms(uint64_t ms)
{
	struct timespec ts = { .tv_sec = (time_t)(ms / 1000),
			       .tv_nsec = (long)(ms % 1000) * 1000000L };

	/* Relative sleeps: after a long pause (snapshot, host reset) the next tick comes
	 * one interval after resuming instead of a burst of catch-up ticks. */
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

static int drain(void)
{
	/* Waits for the UART to send everything queued, so that a reboot right after
	 * this cannot cut the last lines off. Not a tty (a pipe, a file): nothing to do. */
	if (isatty(STDOUT_FILENO) && tcdrain(STDOUT_FILENO) != 0) {
		perror("wb-workload: tcdrain");
		return 1;
	}
	return 0;
}

static void parse_args(int argc, char **argv, struct options *o)
{
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (strcmp(a, "--fill-mib") == 0)
			o->fill_mib = parse_u64(a, v);
		else if (strcmp(a, "--seed") == 0)
			o->seed = parse_u64(a, v);
		else if (strcmp(a, "--verify-every") == 0)
			o->verify_every = parse_u64(a, v);
		else if (strcmp(a, "--ticks") == 0)
			o->ticks = parse_u64(a, v);
		else if (strcmp(a, "--interval-ms") == 0)
			o->interval_ms = parse_u64(a, v);
		else if (strcmp(a, "--drain") == 0)
			exit(drain());
		else if (strcmp(a, "--write-records") == 0) {
			if (v == NULL)
				usage_exit("missing value");
			o->records_file = v;
		}
		else
			usage_exit("unknown argument");
		i++;
	}
	if (o->fill_mib > (1ULL << 20))
		usage_exit("--fill-mib is larger than 1 TiB");
}

/*
 * The disk writer. Record n (from 1) is RECORD_BYTES bytes at offset (n - 1) *
 * RECORD_BYTES of FILE:
 *
 *     "rec " + n as 10 decimal digits + " " + 48 times the letter 'a' + n % 26 + "\n"
 *
 * so a test can check every record from the file alone. Each record is written with
 * pwrite, then fsync'ed, and only after fsync returned is "WB-DISK-ACK n" printed:
 * every acknowledged record must be on the disk, whatever happens to the VM afterwards
 * (snapshot, restore in another process, live update, host reset, power cut). The file
 * is created empty and its directory fsync'ed first, so its name is durable too.
 *
 * Pauses of any length are fine: a write or fsync simply takes longer. An error ends
 * the writer with a WB-DISK-ERROR line and status 1.
 */
#define RECORD_BYTES 64

static void make_record(char *rec, uint64_t n)
{
	int len = snprintf(rec, RECORD_BYTES + 1, "rec %010" PRIu64 " ",
			   (uint64_t)(n % 10000000000ULL));

	memset(rec + len, 'a' + (int)(n % 26), RECORD_BYTES - 1 - (size_t)len);
	rec[RECORD_BYTES - 1] = '\n';
}

static int fsync_parent_dir(const char *path)
{
	char dir[4096];
	const char *slash = strrchr(path, '/');
	size_t len = slash == NULL ? 1 : (slash == path ? 1 : (size_t)(slash - path));

	if (len >= sizeof(dir))
		return -1;
	if (slash == NULL)
		dir[0] = '.';
	else
		memcpy(dir, path, len);
	dir[len] = '\0';
	int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	int ret = fsync(fd);
	close(fd);
	return ret;
}

static int write_records(const struct options *o)
{
	char rec[RECORD_BYTES + 1];
	int fd = open(o->records_file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);

	if (fd < 0) {
		emit("WB-DISK-ERROR open %s: %s", o->records_file, strerror(errno));
		return 1;
	}
	if (fsync(fd) != 0 || fsync_parent_dir(o->records_file) != 0) {
		emit("WB-DISK-ERROR fsync after creating %s: %s", o->records_file, strerror(errno));
		return 1;
	}
	emit("WB-DISK-WRITER file=%s record_bytes=%d interval_ms=%" PRIu64 " records=%" PRIu64,
	     o->records_file, RECORD_BYTES, o->interval_ms, o->ticks);

	for (uint64_t n = 1; o->ticks == 0 || n <= o->ticks; n++) {
		make_record(rec, n);
		off_t off = (off_t)((n - 1) * RECORD_BYTES);
		size_t done = 0;
		while (done < RECORD_BYTES) {
			ssize_t w = pwrite(fd, rec + done, RECORD_BYTES - done, off + (off_t)done);
			if (w < 0 && errno == EINTR)
				continue;
			if (w <= 0) {
				emit("WB-DISK-ERROR write of record %" PRIu64 ": %s", n,
				     w < 0 ? strerror(errno) : "wrote nothing");
				return 1;
			}
			done += (size_t)w;
		}
		if (fsync(fd) != 0) {
			emit("WB-DISK-ERROR fsync of record %" PRIu64 ": %s", n, strerror(errno));
			return 1;
		}
		emit("WB-DISK-ACK %" PRIu64, n);
		sleep_ms(o->interval_ms);
	}
	close(fd);
	return 0;
}

int main(int argc, char **argv)
{
	struct options o = {
		.records_file = NULL, .fill_mib = 32, .seed = 1, .verify_every = 10, .ticks = 0,
		.interval_ms = 500,
	};
	parse_args(argc, argv, &o);
	if (o.records_file != NULL)
		return write_records(&o);

	size_t bytes = (size_t)o.fill_mib << 20;
	size_t count = bytes / sizeof(uint64_t);
	uint64_t *words = NULL;
	if (bytes > 0) {
		words = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
			     -1, 0);
		if (words == MAP_FAILED) {
			emit("WB-ERROR mmap of %" PRIu64 " MiB failed: %s", o.fill_mib,
			     strerror(errno));
			return 1;
		}
	}
	fill(words, count, o.seed);
	const uint64_t expected = checksum(words, count);
	emit("WB-WORKLOAD fill_mib=%" PRIu64 " seed=%" PRIu64 " csum=%016" PRIx64
	     " verify_every=%" PRIu64 " ticks=%" PRIu64,
	     o.fill_mib, o.seed, expected, o.verify_every, o.ticks);

	int failed = 0;
	for (uint64_t n = 1; o.ticks == 0 || n <= o.ticks; n++) {
		char boot_id[64], uptime[64];

		sleep_ms(o.interval_ms);
		read_word("/proc/sys/kernel/random/boot_id", boot_id, sizeof(boot_id));
		read_word("/proc/uptime", uptime, sizeof(uptime));
		emit("WB-TICK n=%" PRIu64 " boot_id=%s uptime=%s", n, boot_id, uptime);

		int last = o.ticks != 0 && n == o.ticks;
		if ((o.verify_every != 0 && n % o.verify_every == 0) || last) {
			uint64_t got = checksum(words, count);
			if (got == expected) {
				emit("WB-CSUM ok %016" PRIx64, got);
			} else {
				emit("WB-CSUM BAD expected %016" PRIx64 " got %016" PRIx64,
				     expected, got);
				failed = 1;
			}
		}
	}
	return failed;
}
