/* Random 4 KiB reads from a cached 1 GiB file: pread against a copy out of a
 * shared mapping (rep movsb, as the engine's mapped reads do, and memcpy).
 * Why thinvol copies small reads from a mapping: docs/benchmarks.md, Findings,
 * "Reads from a mapping of the data file".
 *
 *   gcc -O2 -o /tmp/mmap-vs-pread bench/misc/mmap-vs-pread.c && /tmp/mmap-vs-pread [FILE]
 *
 * FILE (default /var/tmp/mmap-vs-pread.img) is created, filled and removed. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static inline void movsb(void *d, const void *s, size_t n) {
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n)::"memory");
}

int main(int argc, char **argv) {
    const char *path = argc > 1 ? argv[1] : "/var/tmp/mmap-vs-pread.img";
    const size_t size = 1ull << 30;
    const int n = 200000;
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || ftruncate(fd, size) != 0) { perror(path); return 1; }
    static char block[65536];
    memset(block, 7, sizeof block);
    for (size_t o = 0; o < size; o += sizeof block)
        if (pwrite(fd, block, sizeof block, o) != sizeof block) { perror("pwrite"); return 1; }
    char *map = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) { perror("mmap"); return 1; }
    uint64_t x = 88172645463325252ull, *offs = malloc(n * sizeof *offs);
    for (int i = 0; i < n; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        offs[i] = (x % (size / 4096)) * 4096;
    }
    char buf[4096];
    volatile long sink = 0;
    for (int round = 0; round < 3; round++) {
        double t = now();
        for (int i = 0; i < n; i++) {
            if (pread(fd, buf, sizeof buf, offs[i]) != sizeof buf) { perror("pread"); return 1; }
            sink += buf[0];
        }
        double a = now() - t;
        t = now();
        for (int i = 0; i < n; i++) { movsb(buf, map + offs[i], sizeof buf); sink += buf[0]; }
        double b = now() - t;
        t = now();
        for (int i = 0; i < n; i++) { memcpy(buf, map + offs[i], sizeof buf); sink += buf[0]; }
        double c = now() - t;
        printf("round %d: pread %.0f ns, rep movsb from the mapping %.0f ns, memcpy %.0f ns per 4 KiB read\n",
               round, a / n * 1e9, b / n * 1e9, c / n * 1e9);
    }
    unlink(path);
    return 0;
}
