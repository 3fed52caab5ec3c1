// A model of a RAM -> device bulk migration with only the kernel's work and
// the copy: no uhmm, no bookkeeping. It bounds what uhmm's pipeline can reach
// on a machine (docs/decisions.md §16, docs/performance.md).
//
// Per chunk of CHUNK pages of a 1 GiB (by default) small-page region that is
// registered with a userfaultfd (MISSING), as uhmm's regions are:
//   mover:  UFFDIO_MOVE the chunk into a staging slot (or, with mremap=1,
//           mremap(MREMAP_DONTUNMAP), which uhmm cannot use: it moves
//           pinned pages too);
//   copier: stream the slot into "device memory" (SSE2 non-temporal stores,
//           one store fence a chunk), as the sim's DMA thread does;
//   freer:  MADV_DONTNEED the slot, as uhmm's copy helper does.
// Three threads and four slots (threads=3), or the mover also frees
// (threads=2). Prints, for each round, memcpy of the same size (the bench's
// baseline), the migration's wall time a page, their ratio, and each
// thread's CPU time a page.
//
//   gcc -O2 -pthread -o /tmp/ram_to_device docs/models/ram_to_device.c
//   /tmp/ram_to_device [MiB=1024] [chunk pages=2048] [move pages a call=2048]
//                      [threads=3] [mremap=0] [rounds=5]
#define _GNU_SOURCE
#include <emmintrin.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef MREMAP_DONTUNMAP
#define MREMAP_DONTUNMAP 4
#endif
// UFFDIO_MOVE (Linux 6.8), for older headers.
struct move_args { uint64_t dst, src, len, mode; int64_t moved; };
#define MOVE_IOCTL _IOWR(UFFDIO, 0x05, struct move_args)
#define FEATURE_MOVE (1ULL << 16)
#define PAGE 4096UL
#define SLOTS 4

static size_t npages, chunk = 2048, piece = 2048, nchunks;
static int threads = 3, use_mremap, uffd;
static char *region, *staging, *device;
static sem_t free_slots, to_copy, to_free;
static double cpu_mover, cpu_copier, cpu_freer;

static double now(clockid_t c) {
  struct timespec t;
  clock_gettime(c, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static char *slot(size_t c) { return staging + (c % SLOTS) * chunk * PAGE; }

static void stream(char *dst, const char *src, size_t len) {
  for (size_t i = 0; i < len; i += 64)
    for (int k = 0; k < 4; k++)
      _mm_stream_si128((__m128i *)(dst + i) + k, _mm_load_si128((const __m128i *)(src + i) + k));
  _mm_sfence();
}

// Empties the next copied slot and hands it back to the mover.
static void empty_next(size_t *emptied) {
  sem_wait(&to_free);
  madvise(slot(*emptied), chunk * PAGE, MADV_DONTNEED);
  (*emptied)++;
  sem_post(&free_slots);
}

static void *mover(void *arg) {
  double t = now(CLOCK_THREAD_CPUTIME_ID);
  size_t emptied = 0;
  for (size_t c = 0; c < nchunks; c++) {
    if (threads == 2) // Wait for a slot by emptying copied ones.
      while (sem_trywait(&free_slots) != 0) empty_next(&emptied);
    else
      sem_wait(&free_slots);
    char *src = region + c * chunk * PAGE;
    if (use_mremap) {
      if (mremap(src, chunk * PAGE, chunk * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP, slot(c)) ==
          MAP_FAILED)
        perror("mremap"), exit(1);
    } else {
      for (size_t p = 0; p < chunk; p += piece) {
        struct move_args m = {(uintptr_t)slot(c) + p * PAGE, (uintptr_t)src + p * PAGE, piece * PAGE, 0, 0};
        if (ioctl(uffd, MOVE_IOCTL, &m)) perror("UFFDIO_MOVE"), exit(1);
      }
    }
    sem_post(&to_copy);
  }
  if (threads == 2)
    while (emptied < nchunks) empty_next(&emptied);
  cpu_mover = now(CLOCK_THREAD_CPUTIME_ID) - t;
  return arg;
}

static void *copier(void *arg) {
  double t = now(CLOCK_THREAD_CPUTIME_ID);
  for (size_t c = 0; c < nchunks; c++) {
    sem_wait(&to_copy);
    stream(device + c * chunk * PAGE, slot(c), chunk * PAGE);
    sem_post(&to_free);
  }
  cpu_copier = now(CLOCK_THREAD_CPUTIME_ID) - t;
  return arg;
}

static void *freer(void *arg) {
  double t = now(CLOCK_THREAD_CPUTIME_ID);
  size_t emptied = 0;
  while (emptied < nchunks) empty_next(&emptied);
  cpu_freer = now(CLOCK_THREAD_CPUTIME_ID) - t;
  return arg;
}

// Anonymous memory aligned to 2 MiB.
static char *anon(size_t len) {
  char *p = mmap(0, len + (2UL << 20), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) perror("mmap"), exit(1);
  return (char *)(((uintptr_t)p + (2UL << 20) - 1) & ~((2UL << 20) - 1));
}

int main(int argc, char **argv) {
  size_t mib = argc > 1 ? atol(argv[1]) : 1024;
  if (argc > 2) chunk = atol(argv[2]);
  piece = argc > 3 ? (size_t)atol(argv[3]) : chunk;
  if (argc > 4) threads = atoi(argv[4]);
  if (argc > 5) use_mremap = atoi(argv[5]);
  int rounds = argc > 6 ? atoi(argv[6]) : 5;
  size_t len = mib << 20;
  npages = len / PAGE;
  nchunks = npages / chunk;
  if (!chunk || !piece || chunk % piece || npages % chunk || (threads != 2 && threads != 3))
    return fprintf(stderr, "bad arguments\n"), 2;

  uffd = syscall(SYS_userfaultfd, O_CLOEXEC);
  struct uffdio_api api = {.api = UFFD_API, .features = FEATURE_MOVE};
  if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api)) perror("userfaultfd"), exit(1);
  region = anon(len);
  madvise(region, len, MADV_NOHUGEPAGE);
  staging = anon(SLOTS * chunk * PAGE);
  madvise(staging, SLOTS * chunk * PAGE, MADV_NOHUGEPAGE);
  device = anon(len);
  memset(device, 1, len); // device memory exists before it is used
  char *a = malloc(len), *b = malloc(len);
  memset(a, 2, len);
  memset(b, 3, len);
  struct uffdio_register reg = {.range = {(uintptr_t)region, len}, .mode = UFFDIO_REGISTER_MODE_MISSING};
  struct uffdio_register stg = {.range = {(uintptr_t)staging, SLOTS * chunk * PAGE},
                                .mode = UFFDIO_REGISTER_MODE_MISSING};
  if (!use_mremap && ioctl(uffd, UFFDIO_REGISTER, &stg)) perror("register staging"), exit(1);

  for (int r = 0; r < rounds; r++) {
    // Fill the region (unregistered: nobody answers its faults here).
    struct uffdio_range whole = {(uintptr_t)region, len};
    ioctl(uffd, UFFDIO_UNREGISTER, &whole);
    memset(region, 4 + r, len);
    if (ioctl(uffd, UFFDIO_REGISTER, &reg)) perror("register region"), exit(1);

    double m0 = now(CLOCK_MONOTONIC);
    memcpy(b, a, len);
    double copy_s = now(CLOCK_MONOTONIC) - m0;

    sem_init(&free_slots, 0, SLOTS);
    sem_init(&to_copy, 0, 0);
    sem_init(&to_free, 0, 0);
    pthread_t t[3];
    double t0 = now(CLOCK_MONOTONIC);
    pthread_create(&t[0], 0, mover, 0);
    pthread_create(&t[1], 0, copier, 0);
    if (threads == 3) pthread_create(&t[2], 0, freer, 0);
    for (int i = 0; i < threads; i++) pthread_join(t[i], 0);
    double wall_s = now(CLOCK_MONOTONIC) - t0;
    if (device[0] != 4 + r || device[len - 1] != 4 + r) return fprintf(stderr, "data lost\n"), 1;
    printf("memcpy %.0f ns/page, migration %.0f ns/page, ratio %.3f | CPU ns/page: mover %.0f copier %.0f "
           "freer %.0f\n",
           copy_s * 1e9 / npages, wall_s * 1e9 / npages, copy_s / wall_s, cpu_mover * 1e9 / npages,
           cpu_copier * 1e9 / npages, cpu_freer * 1e9 / npages);
    cpu_freer = 0;
  }
  return 0;
}
