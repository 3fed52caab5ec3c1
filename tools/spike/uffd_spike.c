/*
 * uffd_spike.c - measure the CPU-side userfaultfd mechanisms uhmm may use.
 *
 * Self-contained measurement tool (not product code). Needs Linux >= 6.8
 * (UFFDIO_MOVE, PAGEMAP_SCAN) and /dev/userfaultfd or the userfaultfd
 * syscall (root, or vm.unprivileged_userfaultfd=1).
 *
 *   gcc -O2 -pthread -o /tmp/uffd_spike tools/spike/uffd_spike.c && /tmp/uffd_spike
 *
 * Every row: one warm-up pass, then RUNS passes; prints median, min, max.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <linux/userfaultfd.h>
#include <linux/fs.h>

/* ---- ABI pieces that older system headers lack (values from the uapi) ---- */
#ifndef _UFFDIO_MOVE
#define _UFFDIO_MOVE 0x05
struct uffdio_move {
	__u64 dst, src, len, mode;
	__s64 move; /* out: bytes moved, or -errno */
};
#define UFFDIO_MOVE _IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#endif
#ifndef PAGEMAP_SCAN
struct page_region {
	__u64 start, end, categories;
};
struct pm_scan_arg {
	__u64 size, flags, start, end, walk_end, vec, vec_len, max_pages;
	__u64 category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#define PAGE_IS_PRESENT (1 << 3)
#endif

#define PG 4096UL
#define GIB (1UL << 30)
#define HPG (2UL << 20)
#define RUNS 5
#define NFAULT 20000UL /* pages in the fault-latency tests */

static void die(const char *what)
{
	fprintf(stderr, "FATAL: %s: errno %d (%s)\n", what, errno, strerror(errno));
	exit(1);
}
static void fail(const char *what)
{
	fprintf(stderr, "FATAL: %s\n", what);
	exit(1);
}

static double now(void)
{
	struct timespec ts;
	if (clock_gettime(CLOCK_MONOTONIC, &ts))
		die("clock_gettime");
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_d(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}
static double pct(double *v, size_t n, double p)
{
	qsort(v, n, sizeof *v, cmp_d);
	size_t i = (size_t)(p * (n - 1) + 0.5);
	return v[i];
}

/* 2 MiB-aligned private anonymous mapping; hint: 1 = MADV_HUGEPAGE, -1 = NOHUGEPAGE */
static char *map_anon(size_t len, int hint)
{
	char *p = mmap(NULL, len + HPG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		die("mmap anon");
	char *a = (char *)(((uintptr_t)p + HPG - 1) & ~(HPG - 1));
	if (a > p && munmap(p, a - p))
		die("munmap head");
	if (munmap(a + len, (p + len + HPG) - (a + len)))
		die("munmap tail");
	if (hint && madvise(a, len, hint > 0 ? MADV_HUGEPAGE : MADV_NOHUGEPAGE))
		die("madvise hugepage hint");
	return a;
}
static void unmap(void *p, size_t len)
{
	if (munmap(p, len))
		die("munmap");
}
static void dontneed(void *p, size_t len)
{
	if (madvise(p, len, MADV_DONTNEED))
		die("madvise(DONTNEED)");
}
/* write a recognisable value into the first word of every page (populates it) */
static void fill(char *p, size_t len, uint64_t salt)
{
	for (size_t off = 0; off < len; off += PG) {
		memset(p + off, 0x5a, PG);
		*(uint64_t *)(p + off) = (off / PG) ^ salt;
	}
}

/* ---- optional controls: SPIKE_PIN=same|split pins faulting + handler threads;
 * SPIKE_ONLY=2,4b,... runs only the rows with those ids;
 * SPIKE_SPIN_US=N makes the handler busy-poll N us before sleeping in poll() ---- */
static int pin_mode; /* 0 none, 1 same CPU, 2 different CPUs */
static double spin_us; /* SPIKE_SPIN_US: handler busy-polls this long before poll() */
static void pin_self(int cpu)
{
	cpu_set_t s;
	CPU_ZERO(&s);
	CPU_SET(cpu, &s);
	errno = pthread_setaffinity_np(pthread_self(), sizeof s, &s);
	if (errno)
		die("pthread_setaffinity_np");
}
static int want(const char *id)
{
	const char *only = getenv("SPIKE_ONLY");
	if (!only)
		return 1;
	char buf[256];
	snprintf(buf, sizeof buf, ",%s,", only);
	char key[16];
	snprintf(key, sizeof key, ",%s,", id);
	return strstr(buf, key) != NULL;
}

/* ---- userfaultfd plumbing ---- */
static int uffd;

static void uffd_open(void)
{
	int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
	if (dev >= 0) {
		uffd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
		close(dev);
	} else {
		uffd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	}
	if (uffd < 0)
		die("userfaultfd (need root, /dev/userfaultfd access or vm.unprivileged_userfaultfd=1)");
	struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_MOVE | UFFD_FEATURE_MINOR_SHMEM};
	if (ioctl(uffd, UFFDIO_API, &api))
		die("UFFDIO_API (features MOVE|MINOR_SHMEM; kernel too old?)");
}

static void uffd_register(void *p, size_t len, __u64 mode, __u64 need_ioctl)
{
	struct uffdio_register r = {.range = {(uintptr_t)p, len}, .mode = mode};
	if (ioctl(uffd, UFFDIO_REGISTER, &r))
		die("UFFDIO_REGISTER");
	if (need_ioctl && !(r.ioctls & (1ULL << need_ioctl)))
		fail("registered range lacks a needed ioctl");
}
static void uffd_unregister(void *p, size_t len)
{
	struct uffdio_range r = {(uintptr_t)p, len};
	if (ioctl(uffd, UFFDIO_UNREGISTER, &r))
		die("UFFDIO_UNREGISTER");
}
static void uffd_wake(uintptr_t a, size_t len)
{
	struct uffdio_range r = {a, len};
	if (ioctl(uffd, UFFDIO_WAKE, &r))
		die("UFFDIO_WAKE");
}

/* Resolve ioctls, each looping on partial progress (EAGAIN) and treating
 * EEXIST as "someone else installed it": wake the waiters. */
static void do_copy(uintptr_t dst, uintptr_t src, size_t len)
{
	size_t done = 0;
	while (done < len) {
		struct uffdio_copy c = {.dst = dst + done, .src = src + done, .len = len - done};
		if (ioctl(uffd, UFFDIO_COPY, &c) == 0)
			return;
		if (errno == EEXIST) {
			uffd_wake(dst, len);
			return;
		}
		if (errno != EAGAIN)
			die("UFFDIO_COPY");
		if (c.copy > 0)
			done += c.copy;
	}
}
static void do_move(uintptr_t dst, uintptr_t src, size_t len)
{
	size_t done = 0;
	while (done < len) {
		struct uffdio_move m = {.dst = dst + done, .src = src + done, .len = len - done};
		if (ioctl(uffd, UFFDIO_MOVE, &m) == 0)
			return;
		if (errno == EEXIST) {
			uffd_wake(dst, len);
			return;
		}
		if (errno != EAGAIN)
			die("UFFDIO_MOVE");
		if (m.move > 0)
			done += m.move;
	}
}
static void do_zero(uintptr_t dst, size_t len)
{
	size_t done = 0;
	while (done < len) {
		struct uffdio_zeropage z = {.range = {dst + done, len - done}};
		if (ioctl(uffd, UFFDIO_ZEROPAGE, &z) == 0)
			return;
		if (errno == EEXIST) {
			uffd_wake(dst, len);
			return;
		}
		if (errno != EAGAIN)
			die("UFFDIO_ZEROPAGE");
		if (z.zeropage > 0)
			done += z.zeropage;
	}
}
static void do_continue(uintptr_t dst, size_t len)
{
	size_t done = 0;
	while (done < len) {
		struct uffdio_continue c = {.range = {dst + done, len - done}};
		if (ioctl(uffd, UFFDIO_CONTINUE, &c) == 0)
			return;
		if (errno == EEXIST) {
			uffd_wake(dst, len);
			return;
		}
		if (errno != EAGAIN)
			die("UFFDIO_CONTINUE");
		if (c.mapped > 0)
			done += c.mapped;
	}
}

/* ---- fault handler thread ---- */
enum op { OP_COPY, OP_MOVE, OP_ZERO, OP_CONT };
struct handler {
	enum op op;
	char *base;   /* registered region */
	size_t len;
	char *src;    /* COPY source / MOVE staging / CONT data source */
	char *alias;  /* CONT: unregistered alias of the memfd */
	size_t win;   /* bytes resolved per fault */
	int evfd;     /* shutdown */
	long faults;
	pthread_t th;
};

static void *handler_main(void *arg)
{
	struct handler *h = arg;
	if (pin_mode)
		pin_self(pin_mode == 1 ? 0 : 1);
	struct pollfd pf[2] = {{.fd = uffd, .events = POLLIN}, {.fd = h->evfd, .events = POLLIN}};
	for (;;) {
		struct uffd_msg msg[16];
		ssize_t n = read(uffd, msg, sizeof msg);
		/* optional busy-poll before sleeping: a sleeping vCPU is slow to wake */
		for (double end = spin_us ? now() + spin_us * 1e-6 : 0;
		     n < 0 && errno == EAGAIN && spin_us && now() < end;)
			n = read(uffd, msg, sizeof msg);
		if (n < 0) {
			if (errno != EAGAIN)
				die("read uffd");
			if (poll(pf, 2, -1) < 0 && errno != EINTR)
				die("poll");
			if (pf[1].revents)
				return NULL;
			if (pf[0].revents & (POLLERR | POLLHUP))
				fail("uffd POLLERR/POLLHUP");
			continue;
		}
		for (ssize_t i = 0; i < n / (ssize_t)sizeof msg[0]; i++) {
			if (msg[i].event != UFFD_EVENT_PAGEFAULT)
				fail("unexpected uffd event");
			uintptr_t a = msg[i].arg.pagefault.address & ~(PG - 1);
			size_t off = (a - (uintptr_t)h->base) & ~(h->win - 1);
			size_t len = h->win < h->len - off ? h->win : h->len - off;
			uintptr_t dst = (uintptr_t)h->base + off;
			h->faults++;
			switch (h->op) {
			case OP_COPY: do_copy(dst, (uintptr_t)h->src + off, len); break;
			case OP_MOVE: do_move(dst, (uintptr_t)h->src + off, len); break;
			case OP_ZERO: do_zero(dst, len); break;
			case OP_CONT:
				memcpy(h->alias + off, h->src + off, len);
				do_continue(dst, len);
				break;
			}
		}
	}
}
static void handler_start(struct handler *h)
{
	h->evfd = eventfd(0, EFD_CLOEXEC);
	if (h->evfd < 0)
		die("eventfd");
	h->faults = 0;
	errno = pthread_create(&h->th, NULL, handler_main, h);
	if (errno)
		die("pthread_create");
}
static void handler_stop(struct handler *h)
{
	uint64_t one = 1;
	if (write(h->evfd, &one, sizeof one) != sizeof one)
		die("eventfd write");
	errno = pthread_join(h->th, NULL);
	if (errno)
		die("pthread_join");
	close(h->evfd);
}

/* ---- measurement driver: one warm-up pass + RUNS passes, median per output ---- */
#define MAXOUT 4
typedef void (*bench_fn)(void *arg, double *out);
struct row {
	const char *id, *name, *unit;
};
static int nprinted;

static void measure(bench_fn fn, void *arg, int nout, const struct row *rows)
{
	double v[MAXOUT][RUNS], out[MAXOUT];
	/* pct() sorts v[k], so v[k][0] / v[k][RUNS-1] are min / max when printed */
	fn(arg, out); /* warm-up */
	for (int r = 0; r < RUNS; r++) {
		fn(arg, out);
		for (int k = 0; k < nout; k++)
			v[k][r] = out[k];
	}
	for (int k = 0; k < nout; k++) {
		double med = pct(v[k], RUNS, 0.5);
		printf("| %-4s | %-66s | %9.3f | %9.3f | %9.3f | %-7s |\n", rows[k].id, rows[k].name, med,
		       v[k][0], v[k][RUNS - 1], rows[k].unit);
		fflush(stdout);
		nprinted++;
	}
}

/* 1. memcpy 1 GiB, pre-faulted */
static void b_memcpy(void *arg, double *out)
{
	char **b = arg;
	double t = now();
	memcpy(b[1], b[0], GIB);
	out[0] = GIB / (now() - t) / 1e9;
}

/* fault-driven tests: touch every page of a registered region, time the faults */
struct ftest {
	struct handler h;
	size_t npages;
	int write;        /* touch by writing (first-touch case) rather than reading */
	int verify;       /* 1: page i holds i^salt; 0: page must read zero */
	uint64_t salt;
	void (*prep)(struct ftest *); /* untimed reset before each pass */
	double *lat;
};
static void b_fault(void *arg, double *out)
{
	struct ftest *f = arg;
	f->prep(f);
	size_t step = f->h.win / PG, nf = 0;
	double t0 = now();
	for (size_t i = 0; i < f->npages; i++) {
		volatile uint64_t *p = (volatile uint64_t *)(f->h.base + i * PG);
		double a = 0;
		if (i % step == 0)
			a = now();
		uint64_t v;
		if (f->write) {
			*p = i;
			v = i;
		} else {
			v = *p;
		}
		if (i % step == 0)
			f->lat[nf++] = now() - a;
		if (!f->write && v != (f->verify ? (i ^ f->salt) : 0))
			fail("fault test read wrong data");
	}
	double total = now() - t0;
	out[0] = pct(f->lat, nf, 0.50) * 1e6;
	out[1] = pct(f->lat, nf, 0.99) * 1e6;
	out[2] = total / f->npages * 1e6;
}
static void prep_empty(struct ftest *f) { dontneed(f->h.base, f->h.len); }
static void prep_move(struct ftest *f)
{
	dontneed(f->h.base, f->h.len);
	fill(f->h.src, f->h.len, f->salt); /* repopulate staging (it was moved out) */
}

static void run_fault(const char *id, enum op op, size_t winpages, int write, const char *label)
{
	if (!want(id))
		return;
	struct ftest f = {.npages = NFAULT, .write = write, .salt = 0x1234};
	f.h.op = op;
	f.h.len = NFAULT * PG;
	f.h.win = winpages * PG;
	f.h.base = map_anon(f.h.len, -1);
	f.lat = malloc(NFAULT * sizeof(double));
	if (!f.lat)
		die("malloc");
	f.verify = (op == OP_COPY || op == OP_MOVE);
	f.prep = op == OP_MOVE ? prep_move : prep_empty;
	if (op != OP_ZERO) {
		f.h.src = map_anon(f.h.len, -1);
		fill(f.h.src, f.h.len, f.salt);
	}
	uffd_register(f.h.base, f.h.len, UFFDIO_REGISTER_MODE_MISSING,
		      op == OP_MOVE ? _UFFDIO_MOVE : op == OP_COPY ? _UFFDIO_COPY : _UFFDIO_ZEROPAGE);
	handler_start(&f.h);
	char n1[128], n2[128], n3[128];
	snprintf(n1, sizeof n1, "%s: per-fault p50", label);
	snprintf(n2, sizeof n2, "%s: per-fault p99", label);
	snprintf(n3, sizeof n3, "%s: per page (total/pages)", label);
	struct row rows[3] = {{id, n1, "us"}, {id, n2, "us"}, {id, n3, "us/page"}};
	measure(b_fault, &f, 3, rows);
	handler_stop(&f.h);
	if (f.h.faults < (long)(NFAULT / winpages))
		fail("fewer faults than expected");
	uffd_unregister(f.h.base, f.h.len);
	unmap(f.h.base, f.h.len);
	if (f.h.src)
		unmap(f.h.src, f.h.len);
	free(f.lat);
}

/* kernel baseline: first-touch write faults on an unregistered region */
static void b_kernel_touch(void *arg, double *out)
{
	char *p = arg;
	dontneed(p, NFAULT * PG);
	double t = now();
	for (size_t i = 0; i < NFAULT; i++)
		*(volatile char *)(p + i * PG) = 1;
	out[0] = (now() - t) / NFAULT * 1e6;
}

/* 5./6. bulk ioctls over 1 GiB in 2 MiB chunks */
struct bulk {
	char *src, *dst;
	enum op op;
};
static void b_bulk(void *arg, double *out)
{
	struct bulk *b = arg;
	dontneed(b->dst, GIB);
	if (b->op == OP_MOVE)
		fill(b->src, GIB, 7);
	double t = now();
	for (size_t off = 0; off < GIB; off += HPG) {
		uintptr_t d = (uintptr_t)b->dst + off, s = (uintptr_t)b->src + off;
		if (b->op == OP_MOVE)
			do_move(d, s, HPG);
		else if (b->op == OP_COPY)
			do_copy(d, s, HPG);
		else
			do_zero(d, HPG);
	}
	out[0] = GIB / (now() - t) / 1e9;
	uint64_t expect = b->op == OP_ZERO ? 0 : (12345 ^ 7);
	if (*(uint64_t *)(b->dst + 12345 * PG) != expect)
		fail("bulk result has wrong data");
}
static void run_bulk(const char *id, enum op op, int src_hint, const char *label)
{
	if (!want(id))
		return;
	struct bulk b = {.op = op};
	b.dst = map_anon(GIB, src_hint);
	if (op != OP_ZERO) {
		b.src = map_anon(GIB, src_hint);
		fill(b.src, GIB, 7);
	}
	uffd_register(b.dst, GIB, UFFDIO_REGISTER_MODE_MISSING, 0);
	struct row r = {id, label, "GB/s"};
	measure(b_bulk, &b, 1, &r);
	uffd_unregister(b.dst, GIB);
	unmap(b.dst, GIB);
	if (b.src)
		unmap(b.src, GIB);
}

/* 6. MADV_DONTNEED of 1 GiB populated memory, one call */
static void b_dontneed(void *arg, double *out)
{
	char *p = arg;
	fill(p, GIB, 1);
	double t = now();
	dontneed(p, GIB);
	out[0] = (now() - t) / (GIB / PG) * 1e6;
}

/* 7. PAGEMAP_SCAN for PAGE_IS_PRESENT over 1 GiB, half populated */
static int pmfd;
static void b_pmscan(void *arg, double *out)
{
	char *p = arg;
	static struct page_region vec[1024];
	size_t present = 0;
	uintptr_t cur = (uintptr_t)p, end = cur + GIB;
	double t = now();
	while (cur < end) {
		struct pm_scan_arg a = {
			.size = sizeof a, .start = cur, .end = end, .vec = (uintptr_t)vec,
			.vec_len = 1024, .category_mask = PAGE_IS_PRESENT, .return_mask = PAGE_IS_PRESENT,
		};
		long n = ioctl(pmfd, PAGEMAP_SCAN, &a);
		if (n < 0)
			die("ioctl(PAGEMAP_SCAN)");
		for (long i = 0; i < n; i++)
			present += (vec[i].end - vec[i].start) / PG;
		if (n < 1024) /* fewer regions than the buffer holds: range complete */
			break;
		cur = vec[n - 1].end;
	}
	out[0] = (now() - t) / (GIB / PG) * 1e9;
	if (present != GIB / PG / 2)
		fail("PAGEMAP_SCAN counted the wrong number of present pages");
}

/* 8. memfd + MINOR fault + UFFDIO_CONTINUE */
static void prep_minor(struct ftest *f) { dontneed(f->h.base, f->h.len); /* zaps PTEs, keeps page cache */ }
static void run_minor(const char *id, size_t winpages, const char *label)
{
	if (!want(id))
		return;
	struct ftest f = {.npages = NFAULT, .verify = 1, .salt = 0x77, .prep = prep_minor};
	size_t len = NFAULT * PG;
	int mfd = memfd_create("uffd_spike", MFD_CLOEXEC);
	if (mfd < 0)
		die("memfd_create");
	if (ftruncate(mfd, len))
		die("ftruncate memfd");
	f.h.op = OP_CONT;
	f.h.len = len;
	f.h.win = winpages * PG;
	f.h.base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
	f.h.alias = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
	if (f.h.base == MAP_FAILED || f.h.alias == MAP_FAILED)
		die("mmap memfd");
	memset(f.h.alias, 0, len); /* page cache populated: registered view takes MINOR faults */
	f.h.src = map_anon(len, -1);
	fill(f.h.src, len, f.salt);
	f.lat = malloc(NFAULT * sizeof(double));
	if (!f.lat)
		die("malloc");
	uffd_register(f.h.base, len, UFFDIO_REGISTER_MODE_MINOR, _UFFDIO_CONTINUE);
	handler_start(&f.h);
	char n1[128], n2[128], n3[128];
	snprintf(n1, sizeof n1, "%s: per-fault p50", label);
	snprintf(n2, sizeof n2, "%s: per-fault p99", label);
	snprintf(n3, sizeof n3, "%s: per page (total/pages)", label);
	struct row rows[3] = {{id, n1, "us"}, {id, n2, "us"}, {id, n3, "us/page"}};
	measure(b_fault, &f, 3, rows);
	handler_stop(&f.h);
	uffd_unregister(f.h.base, len);
	unmap(f.h.base, len);
	unmap(f.h.alias, len);
	unmap(f.h.src, len);
	close(mfd);
	free(f.lat);
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	const char *pin = getenv("SPIKE_PIN");
	pin_mode = !pin ? 0 : !strcmp(pin, "same") ? 1 : !strcmp(pin, "split") ? 2 : -1;
	if (pin_mode < 0)
		fail("SPIKE_PIN must be same or split");
	if (pin_mode)
		pin_self(0);
	if (getenv("SPIKE_SPIN_US"))
		spin_us = atof(getenv("SPIKE_SPIN_US"));
	uffd_open();
	pmfd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (pmfd < 0)
		die("open /proc/self/pagemap");
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	printf("uffd_spike: %ld CPUs, %d runs per row after 1 warm-up; min/max are over those runs; "
	       "threads %s; handler spin %.0f us\n\n", ncpu, RUNS, pin_mode == 1 ? "pinned to one CPU" :
	       pin_mode == 2 ? "pinned to CPUs 0 (faulting) and 1 (handler)" : "not pinned", spin_us);
	printf("| #    | %-66s | %9s | %9s | %9s | %-7s |\n", "measurement", "median", "min", "max", "unit");
	printf("| ---- | %-66s | %9s | %9s | %9s | %-7s |\n", "---", "---", "---", "---", "---");

	if (want("1")) { /* 1 */
		char *b[2] = {map_anon(GIB, 0), map_anon(GIB, 0)};
		fill(b[0], GIB, 0);
		memset(b[1], 1, GIB);
		struct row r = {"1", "memcpy 1 GiB, pre-faulted src+dst, 1 thread", "GB/s"};
		measure(b_memcpy, b, 1, &r);
		unmap(b[0], GIB);
		unmap(b[1], GIB);
	}
	if (want("0")) { /* kernel baseline */
		char *p = map_anon(NFAULT * PG, -1);
		struct row r = {"0", "kernel baseline: first-touch write fault, unregistered, 4 KiB", "us/page"};
		measure(b_kernel_touch, p, 1, &r);
		unmap(p, NFAULT * PG);
	}
	run_fault("2", OP_COPY, 1, 0, "MISSING, UFFDIO_COPY 1 page/fault");
	run_fault("3", OP_COPY, 16, 0, "MISSING, UFFDIO_COPY 16-page window");
	run_fault("3", OP_COPY, 64, 0, "MISSING, UFFDIO_COPY 64-page window");
	run_fault("4", OP_MOVE, 16, 0, "MISSING, UFFDIO_MOVE 16 pages from staging");
	run_fault("4", OP_MOVE, 64, 0, "MISSING, UFFDIO_MOVE 64 pages from staging");
	run_fault("4b", OP_MOVE, 1, 0, "MISSING, UFFDIO_MOVE 1 page from staging");
	run_fault("6b", OP_ZERO, 64, 1, "first-touch write, UFFDIO_ZEROPAGE 64-page window + COW");
	run_bulk("5", OP_MOVE, -1, "bulk UFFDIO_MOVE 1 GiB, 2 MiB chunks, 4 KiB-page source");
	run_bulk("5", OP_MOVE, 1, "bulk UFFDIO_MOVE 1 GiB, 2 MiB chunks, THP source (MADV_HUGEPAGE)");
	run_bulk("5", OP_COPY, -1, "bulk UFFDIO_COPY 1 GiB, 2 MiB chunks");
	run_bulk("6", OP_ZERO, -1, "bulk UFFDIO_ZEROPAGE 1 GiB, 2 MiB chunks");
	if (want("6")) { /* 6 */
		char *p = map_anon(GIB, -1);
		struct row r = {"6", "MADV_DONTNEED 1 GiB populated 4 KiB pages, one call", "us/page"};
		measure(b_dontneed, p, 1, &r);
		unmap(p, GIB);
		p = map_anon(GIB, 1);
		struct row r2 = {"6", "MADV_DONTNEED 1 GiB populated THP (MADV_HUGEPAGE), one call", "us/page"};
		measure(b_dontneed, p, 1, &r2);
		unmap(p, GIB);
	}
	if (want("7")) { /* 7 */
		char *p = map_anon(GIB, -1);
		for (size_t off = 0; off < GIB; off += 2 * PG) /* every other page: worst case */
			p[off] = 1;
		struct row r = {"7", "PAGEMAP_SCAN 1 GiB, every other page present (131072 runs)", "ns/page"};
		measure(b_pmscan, p, 1, &r);
		dontneed(p, GIB);
		memset(p, 1, GIB / 2); /* first half present: one run */
		struct row r2 = {"7", "PAGEMAP_SCAN 1 GiB, first half present (1 run)", "ns/page"};
		measure(b_pmscan, p, 1, &r2);
		unmap(p, GIB);
	}
	run_minor("8", 1, "memfd MINOR, write via alias + UFFDIO_CONTINUE 1 page");
	run_minor("8", 64, "memfd MINOR, write via alias + UFFDIO_CONTINUE 64 pages");
	printf("\n%d rows\n", nprinted);
	return 0;
}
