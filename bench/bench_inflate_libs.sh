#!/usr/bin/env bash
# Is ISA-L's inflate worth a second inflate backend for serving spans? Inflate the first gzip
# member of a layer with the static zlib-ng the native core links (.build/zlib-ng) and with
# ISA-L (built from the PyPI "isal" sdist by the same recipe: needs nasm), both in C, into the
# same reused output buffer, alternating which goes first, and print each run's thread-CPU
# MB/s and the ISA-L/zlib-ng ratio (median and spread). CPU time, not wall time: the machine
# is shared, and steal time would drown a 10% difference.
#   bench/bench_inflate_libs.sh [layer.tar.gz] [runs] [output piece bytes]
set -euo pipefail
cd "$(dirname "$0")/.."
layer=${1:-bench/.data/usrlib.tar.gz}
runs=${2:-5}
piece=${3:-4194304}
PY_ISAL=${PY_ISAL:-1.9.1}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
zprefix=$(PYTHON=$PYTHON bash ci/build-zlib-ng.sh)
root=$PWD/.build/isal
if [ ! -f "$root/isa-l.a" ]; then
  command -v nasm >/dev/null || { echo "$0: needs nasm (apt-get install nasm)" >&2; exit 1; }
  rm -rf "$root" && mkdir -p "$root"
  "$PYTHON" -m pip download -q --no-binary :all: --no-deps -d "$root" "isal==$PY_ISAL" >&2
  tar -xzf "$root"/isal-*.tar.gz -C "$root"
  src=$(echo "$root"/isal-*/src/isal/isa-l)
  make -s -C "$src" -f Makefile.unx -j "$(nproc)" units="igzip crc" bin/isa-l.a >&2
  cp "$src/bin/isa-l.a" "$root/isa-l.a"
  cp "$src/include/igzip_lib.h" "$root/"
fi
cat > "$root/inflate_libs.c" <<'C'
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <zlib.h>
#include "igzip_lib.h"

static double cpu(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Bytes of the gzip header at p (flags per RFC 1952), or 0 when it is not one. */
static size_t header_len(const unsigned char *p, size_t n) {
    size_t at = 10;
    if (n < 10 || p[0] != 0x1f || p[1] != 0x8b || p[2] != 8) return 0;
    if (p[3] & 4) { if (n < 12) return 0; at += 2 + (p[10] | p[11] << 8); }
    for (int flag = 8; flag <= 16; flag <<= 1)
        if (p[3] & flag) { while (at < n && p[at]) at++; at++; }
    if (p[3] & 2) at += 2;
    return at < n ? at : 0;
}

static double zlib_ng(const unsigned char *in, size_t n, unsigned char *out, size_t piece,
                      size_t *total) {
    double t = cpu();
    z_stream s;
    memset(&s, 0, sizeof s);
    inflateInit2(&s, -15);
    int rc;
    *total = 0;
    s.next_in = (unsigned char *)in;
    do {  /* zlib counts in unsigned int */
        if (s.avail_in == 0) { size_t k = n > (1u << 30) ? (1u << 30) : n; s.avail_in = k; n -= k; }
        s.next_out = out; s.avail_out = piece;
        rc = inflate(&s, Z_NO_FLUSH);
        *total += piece - s.avail_out;
    } while (rc == Z_OK);
    inflateEnd(&s);
    return cpu() - t;
}

static double isal(const unsigned char *in, size_t n, unsigned char *out, size_t piece,
                   size_t *total) {
    double t = cpu();
    struct inflate_state *st = malloc(sizeof *st);
    isal_inflate_init(st);
    st->crc_flag = ISAL_DEFLATE;
    st->next_in = (unsigned char *)in;
    int rc;
    *total = 0;
    do {
        if (st->avail_in == 0) { size_t k = n > (1u << 30) ? (1u << 30) : n; st->avail_in = k; n -= k; }
        st->next_out = out; st->avail_out = piece;
        rc = isal_inflate(st);
        *total += piece - st->avail_out;
    } while (rc == ISAL_DECOMP_OK && st->block_state != ISAL_BLOCK_FINISH);
    free(st);
    return cpu() - t;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    int fd = open(argv[1], O_RDONLY);
    struct stat sb;
    if (fd < 0 || fstat(fd, &sb) < 0) { perror(argv[1]); return 1; }
    int runs = atoi(argv[2]);
    size_t piece = strtoul(argv[3], NULL, 10), n = sb.st_size;
    const unsigned char *map = mmap(NULL, n, PROT_READ, MAP_PRIVATE, fd, 0);
    size_t h = map == MAP_FAILED ? 0 : header_len(map, n);
    unsigned char *out = malloc(piece);
    if (!h || !out || runs < 1 || runs > 99 || piece < 65536 || piece > (1u << 30)) {
        fprintf(stderr, "usage: layer.tar.gz runs(1-99) piece(64 KiB-1 GiB)\n");
        return 1;
    }
    memset(out, 0, piece);
    double ratio[99];
    for (int r = 0; r < runs; r++) {
        size_t zt, it;
        double tz, ti;
        if (r % 2) { ti = isal(map + h, n - h, out, piece, &it); tz = zlib_ng(map + h, n - h, out, piece, &zt); }
        else { tz = zlib_ng(map + h, n - h, out, piece, &zt); ti = isal(map + h, n - h, out, piece, &it); }
        if (zt != it) { fprintf(stderr, "outputs differ: %zu vs %zu bytes\n", zt, it); return 1; }
        ratio[r] = (it / ti) / (zt / tz);
        printf("run %d: %zu bytes out; zlib-ng %.0f MB/s, ISA-L %.0f MB/s, ratio %.2fx\n",
               r + 1, zt, zt / tz / 1e6, it / ti / 1e6, ratio[r]);
    }
    qsort(ratio, runs, sizeof ratio[0], cmp);
    printf("ISA-L / zlib-ng inflate, thread CPU time: median %.2fx (%.2f-%.2fx) over %d runs\n",
           ratio[runs / 2], ratio[0], ratio[runs - 1], runs);
    return 0;
}
C
cc -O2 -o "$root/inflate_libs" "$root/inflate_libs.c" -I"$zprefix/include" -I"$root" \
  "$zprefix/lib/libz.a" "$root/isa-l.a"
"$root/inflate_libs" "$layer" "$runs" "$piece"
