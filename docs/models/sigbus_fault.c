// A model of a missing-page fault answered in the faulting thread itself:
// a userfaultfd opened with UFFD_FEATURE_SIGBUS makes the kernel raise
// SIGBUS instead of queueing the fault for a handler thread, and the signal
// handler installs the page with UFFDIO_COPY; sigreturn retries the access.
// No handler thread is woken, no IPI is sent, no context is switched: it
// bounds what an in-thread fault path could reach, against uhmm's handler
// threads (docs/budget.md, "Where a fault's time goes"; `uhmm bench`'s
// uffd_round_trip_same_cpu is the handler-thread round trip).
//
// The cost of this path: a system call on such memory fails with EFAULT
// instead of waiting for the page, as with user-mode-only userfaultfd.
//
//   gcc -O2 -o /tmp/sigbus_fault docs/models/sigbus_fault.c
//   /tmp/sigbus_fault [pages=65536] [rounds=3]
//
// Prints, for each round, the time a fault takes (random order over the
// pages, each dropped with MADV_DONTNEED before the round, untimed).
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int uffd;
static char *page_src;
static volatile long faults;

static void on_sigbus(int sig, siginfo_t *si, void *ctx) {
    (void)sig;
    (void)ctx;
    unsigned long addr = (unsigned long)si->si_addr & ~4095UL;
    struct uffdio_copy copy = {.dst = addr, .src = (unsigned long)page_src, .len = 4096, .mode = 0};
    if (ioctl(uffd, UFFDIO_COPY, &copy) && errno != EEXIST) {
        static const char msg[] = "UFFDIO_COPY failed\n";
        write(2, msg, sizeof msg - 1);
        _exit(1);
    }
    faults++;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    long pages = argc > 1 ? atol(argv[1]) : 65536;
    int rounds = argc > 2 ? atoi(argv[2]) : 3;
    uffd = syscall(SYS_userfaultfd, O_CLOEXEC);
    if (uffd < 0) {
        perror("userfaultfd");
        return 1;
    }
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_SIGBUS};
    if (ioctl(uffd, UFFDIO_API, &api)) {
        perror("UFFDIO_API");
        return 1;
    }
    char *mem = mmap(NULL, pages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    page_src = aligned_alloc(4096, 4096);
    memset(page_src, 7, 4096);
    struct uffdio_register reg = {.range = {(unsigned long)mem, pages * 4096}, .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (mem == MAP_FAILED || ioctl(uffd, UFFDIO_REGISTER, &reg)) {
        perror("mmap / UFFDIO_REGISTER");
        return 1;
    }
    struct sigaction sa = {.sa_sigaction = on_sigbus, .sa_flags = SA_SIGINFO};
    sigaction(SIGBUS, &sa, NULL);
    long *order = malloc(pages * sizeof *order);
    for (long i = 0; i < pages; i++)
        order[i] = i;
    srand(1);
    for (long i = pages - 1; i > 0; i--) {
        long j = rand() % (i + 1), t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
    for (int r = 0; r < rounds; r++) {
        madvise(mem, pages * 4096, MADV_DONTNEED);
        long before = faults, sum = 0;
        double t0 = now();
        for (long i = 0; i < pages; i++)
            sum += mem[order[i] * 4096 + 100];
        double t1 = now();
        printf("round %d: %.2f us a fault (%ld faults, sum %ld)\n", r, (t1 - t0) / pages * 1e6, faults - before, sum);
    }
    return 0;
}
