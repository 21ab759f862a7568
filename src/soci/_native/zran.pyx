# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Native gzip random access: build checkpoints in one pass, inflate from them.

``GzipIndexer`` inflates a gzip stream fed in pieces, stopping at every
deflate block boundary (``Z_BLOCK``) to decide whether to record a checkpoint
exactly where upstream SOCI records one: at the end of the first header, and
at the first boundary after more than ``span_size`` bytes of output since the
last checkpoint (never after the final block of a member). Each checkpoint is
written straight into upstream's zinfo v2 packing. The same inflated bytes are
handed to a ``TarScanner`` so the tar headers come out of the same pass.

``inflate_range`` resumes inflation from one checkpoint (inflatePrime +
inflateSetDictionary) and produces a requested uncompressed range, crossing
gzip member boundaries as needed.

All zlib work runs with the GIL released; failures are recorded as a message
and turned into a Python exception in exactly one place per entry point.
"""

from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy, memmove, memset
from libc.stdint cimport int64_t, int32_t, uint8_t, INT32_MAX
from cpython.bytearray cimport (PyByteArray_AS_STRING, PyByteArray_FromStringAndSize,
                               PyByteArray_Resize)

from soci._native.zlib cimport *
from soci._native.tarscan cimport TarScanner

DEF WINSIZE = 32768
DEF OUTCHUNK = 262144
DEF CHECKPOINT_SIZE = 8 + 8 + 1 + WINSIZE
DEF GZIP_TRAILER = 8
DEF AUTO_GZIP = 47    # zlib or gzip header, 32 KiB window
DEF RAW = -15         # raw deflate, 32 KiB window
# zlib counts in unsigned int: longer buffers are handed over in pieces of this.
DEF ZCHUNK = 1 << 30

ZLIB_VERSION = zlibVersion().decode()

# The largest piece of input or output handed to zlib in one call (its counters
# are unsigned int); tests lower it to walk the piecewise paths with small data.
cdef Py_ssize_t zlib_piece = ZCHUNK


def _set_zlib_piece(Py_ssize_t n) -> None:
    """Test hook: hand zlib at most ``n`` bytes at a time (0 restores the default)."""
    global zlib_piece
    zlib_piece = n if 0 < n <= ZCHUNK else ZCHUNK


cdef class GzipIndexer:
    """One streaming pass over a gzip blob: checkpoints plus tar headers."""

    cdef z_stream strm
    cdef bint initialised
    cdef bint member_ended        # a member ended; more input must be a new member
    cdef bint failed
    cdef int64_t span_size
    cdef int64_t total_in
    cdef int64_t total_out
    cdef int64_t last
    cdef unsigned char *out       # [WINSIZE history][OUTCHUNK fresh output]
    cdef Py_ssize_t out_pos
    cdef unsigned char *points    # packed checkpoints (zinfo v2 body)
    cdef Py_ssize_t points_len
    cdef Py_ssize_t points_cap
    cdef int32_t count
    cdef TarScanner scanner
    cdef object error
    cdef int cancelled            # set by cancel() from another thread; polled per OUTCHUNK

    def __cinit__(self, int64_t span_size, TarScanner scanner):
        if span_size <= 0:
            raise ValueError("span size must be positive")
        self.span_size = span_size
        self.scanner = scanner
        memset(&self.strm, 0, sizeof(z_stream))
        if inflateInit2(&self.strm, AUTO_GZIP) != Z_OK:
            raise MemoryError("zlib inflateInit2 failed")
        self.initialised = True
        self.out = <unsigned char *>malloc(WINSIZE + OUTCHUNK)
        self.points_cap = 8 * CHECKPOINT_SIZE
        self.points = <unsigned char *>malloc(self.points_cap)
        if self.out is NULL or self.points is NULL:
            raise MemoryError()
        # Fewer than 32 KiB of output leaves zeros at the front of a window, as upstream.
        memset(self.out, 0, WINSIZE)
        self.out_pos = WINSIZE

    def __dealloc__(self):
        if self.initialised:
            inflateEnd(&self.strm)
        free(self.out)
        free(self.points)

    cdef int add_checkpoint(self, uint8_t bits) noexcept nogil:
        cdef unsigned char *grown
        cdef unsigned char *p
        if self.count == INT32_MAX:
            return -1  # zinfo counts checkpoints in an int32
        if self.points_len + CHECKPOINT_SIZE > self.points_cap:
            self.points_cap *= 2
            grown = <unsigned char *>realloc(self.points, self.points_cap)
            if grown is NULL:
                return -1
            self.points = grown
        p = self.points + self.points_len
        memcpy(p, &self.total_in, 8)
        memcpy(p + 8, &self.total_out, 8)
        p[16] = bits
        memcpy(p + 17, self.out + self.out_pos - WINSIZE, WINSIZE)
        self.points_len += CHECKPOINT_SIZE
        self.count += 1
        self.last = self.total_out
        return 0

    cdef int run(self, const unsigned char *data, Py_ssize_t n, const char **why) noexcept nogil:
        """Inflate all of data; 0, -1 with *why set (NULL: the tar scanner failed), or -2
        when cancelled."""
        cdef int ret
        cdef unsigned int before_in, before_out, produced
        cdef Py_ssize_t room
        self.strm.next_in = data
        self.strm.avail_in = 0
        while self.strm.avail_in > 0 or n > 0:
            if self.cancelled:
                # One int read per 256 KiB of output: a build stops mid-chunk, even on
                # data that inflates a thousandfold.
                why[0] = "cancelled"
                return -2
            if self.strm.avail_in == 0:
                # zlib takes at most an unsigned int of input at a time.
                self.strm.avail_in = <unsigned int>(zlib_piece if n > zlib_piece else n)
                n -= self.strm.avail_in
            if self.member_ended:
                # More bytes after a member: they must start another gzip member.
                inflateReset2(&self.strm, AUTO_GZIP)
                self.member_ended = False
            if self.out_pos == WINSIZE + OUTCHUNK:
                memmove(self.out, self.out + OUTCHUNK, WINSIZE)
                self.out_pos = WINSIZE
            room = WINSIZE + OUTCHUNK - self.out_pos
            self.strm.next_out = self.out + self.out_pos
            self.strm.avail_out = <unsigned int>room
            before_in = self.strm.avail_in
            ret = inflate(&self.strm, Z_BLOCK)
            produced = <unsigned int>room - self.strm.avail_out
            self.total_in += before_in - self.strm.avail_in
            self.total_out += produced
            if produced and self.scanner is not None:
                if self.scanner.feed(self.out + self.out_pos, produced) < 0:
                    why[0] = NULL
                    return -1
            self.out_pos += produced
            if ret == Z_STREAM_END:
                self.member_ended = True
                continue
            if ret == Z_NEED_DICT:
                why[0] = "stream needs a preset dictionary"
                return -1
            if ret != Z_OK and ret != Z_BUF_ERROR:
                why[0] = self.strm.msg
                if why[0] is NULL:
                    why[0] = "inflate failed"
                return -1
            if ((self.strm.data_type & 128) and not (self.strm.data_type & 64)
                    and (self.total_out == 0 or self.total_out - self.last > self.span_size)):
                if self.add_checkpoint(<uint8_t>(self.strm.data_type & 7)) < 0:
                    why[0] = "too many checkpoints (out of memory)"
                    return -1
        return 0

    def feed(self, const unsigned char[:] data) -> list:
        """Inflate the next piece of the blob; return ``[(in, bits), ...]`` of new checkpoints."""
        cdef const char *why = NULL
        cdef int rc = 0
        cdef int32_t first = self.count
        if self.cancelled:
            from soci.cancel import Cancelled
            raise Cancelled()
        if self.failed:
            raise RuntimeError("indexer already failed")
        if data.shape[0]:
            with nogil:
                rc = self.run(&data[0], data.shape[0], &why)
        if rc == -2:
            self.failed = True
            from soci.cancel import Cancelled
            raise Cancelled()
        if rc < 0:
            self.failed = True
            if why is NULL:
                self.scanner.raise_error()
            from soci.errors import LayerFormatError
            raise LayerFormatError(
                f"corrupt gzip data near compressed offset {self.total_in}: {why.decode(errors='replace')}"
            )
        cdef list found = []
        cdef int32_t i
        cdef int64_t at
        for i in range(first, self.count):
            memcpy(&at, self.points + <Py_ssize_t>i * CHECKPOINT_SIZE, 8)
            found.append((at, self.points[<Py_ssize_t>i * CHECKPOINT_SIZE + 16]))
        return found

    def cancel(self) -> None:
        """Make a ``feed`` running in another thread stop soon and raise ``Cancelled``
        (as every later call does)."""
        self.cancelled = 1

    def finish(self) -> None:
        """Require the blob to have ended exactly at the end of a gzip member."""
        from soci.errors import LayerFormatError
        if self.failed:
            raise RuntimeError("indexer already failed")
        if not self.member_ended or self.count == 0:
            raise LayerFormatError(
                f"gzip stream is truncated (ended after {self.total_in} compressed bytes)"
            )

    @property
    def total_in(self) -> int:
        return self.total_in

    @property
    def total_out(self) -> int:
        """Uncompressed bytes produced so far (the whole stream once finished)."""
        return self.total_out

    @property
    def checkpoint_count(self) -> int:
        return self.count

    def zinfo(self) -> bytes:
        """The checkpoints as upstream's zinfo v2 blob (little-endian)."""
        cdef int32_t count = self.count
        cdef int64_t span = self.span_size
        cdef bytes head = (<char *>&count)[:4] + (<char *>&span)[:8]
        return head + self.points[:self.points_len]


cdef int inflate_from(const unsigned char *comp, Py_ssize_t comp_len, int bits,
                      const unsigned char *window, int64_t skip,
                      unsigned char *dest, Py_ssize_t want, Py_ssize_t *got,
                      const char **why) noexcept nogil:
    cdef z_stream strm
    cdef unsigned char discard[WINSIZE]
    cdef int ret
    cdef bint raw = True
    cdef Py_ssize_t pos = 0, room
    cdef unsigned int before
    memset(&strm, 0, sizeof(z_stream))
    got[0] = 0
    if inflateInit2(&strm, RAW) != Z_OK:
        why[0] = "zlib inflateInit2 failed"
        return -1
    if bits:
        if comp_len < 1:
            inflateEnd(&strm)
            why[0] = "compressed data is empty"
            return -1
        inflatePrime(&strm, bits, comp[0] >> (8 - bits))
        pos = 1
    inflateSetDictionary(&strm, window, WINSIZE)
    strm.next_in = comp + pos
    strm.avail_in = 0
    while True:
        if strm.avail_in == 0 and pos < comp_len:
            # zlib takes at most an unsigned int of input at a time.
            strm.next_in = comp + pos
            strm.avail_in = <unsigned int>(zlib_piece if comp_len - pos > zlib_piece
                                           else comp_len - pos)
            pos += strm.avail_in
        if skip > 0:
            strm.next_out = discard
            strm.avail_out = WINSIZE if skip > WINSIZE else <unsigned int>skip
        else:
            room = want - got[0]
            if room == 0:
                break
            strm.next_out = dest + got[0]
            strm.avail_out = <unsigned int>(zlib_piece if room > zlib_piece else room)
        before = strm.avail_out
        ret = inflate(&strm, Z_NO_FLUSH)
        if skip > 0:
            skip -= before - strm.avail_out
        else:
            got[0] += before - strm.avail_out
        if ret == Z_STREAM_END:
            # A member ended inside the range: step over its trailer (raw
            # inflate leaves it; gzip mode eats it) and go on with the next.
            if raw:
                if strm.avail_in + (comp_len - pos) < GZIP_TRAILER:
                    break
                if strm.avail_in < GZIP_TRAILER:
                    # The trailer straddles two input pieces: restart right after it.
                    pos += GZIP_TRAILER - strm.avail_in
                    strm.avail_in = 0
                else:
                    strm.next_in += GZIP_TRAILER
                    strm.avail_in -= GZIP_TRAILER
                raw = False
            if strm.avail_in == 0 and pos == comp_len:
                break
            inflateReset2(&strm, AUTO_GZIP)
            continue
        if ret == Z_BUF_ERROR or (ret == Z_OK and strm.avail_in == 0 and pos == comp_len
                                  and strm.avail_out != 0):
            break
        if ret != Z_OK:
            why[0] = strm.msg
            if why[0] is NULL:
                why[0] = "inflate failed"
            inflateEnd(&strm)
            return -1
    inflateEnd(&strm)
    return 0


def inflate_range(const unsigned char[:] comp, int bits, const unsigned char[:] window,
                  int64_t skip, unsigned char[:] dest) -> int:
    """Inflate from a checkpoint into ``dest`` after discarding ``skip`` bytes.

    ``comp`` starts at the checkpoint's first compressed byte (``in - 1`` when
    the checkpoint has ``bits``); ``window`` is its 32 KiB dictionary. Returns
    the number of bytes written, which is short only if ``comp`` ran out.
    """
    _check_checkpoint(window, bits, skip)
    if comp.shape[0] == 0:
        return 0
    return _inflate_into(comp, bits, window, skip,
                         &dest[0] if dest.shape[0] else NULL, dest.shape[0])


def inflate_new(const unsigned char[:] comp, int bits, const unsigned char[:] window,
                int64_t skip, Py_ssize_t length) -> bytearray:
    """``inflate_range`` into a new bytearray of at most ``length`` bytes: cut to what
    was written when ``comp`` runs out first.

    The buffer is not zeroed before the inflate fills it: zeroing a span's megabytes
    cost a pass over memory with the GIL held, which a reader waiting on the event loop
    felt. No byte of it that the inflate did not write is ever handed out.
    """
    _check_checkpoint(window, bits, skip)
    if length < 0:
        raise ValueError("the length to inflate cannot be negative")
    out = PyByteArray_FromStringAndSize(NULL, length if comp.shape[0] else 0)
    if comp.shape[0] == 0 or length == 0:
        return out
    got = _inflate_into(comp, bits, window, skip,
                        <unsigned char *>PyByteArray_AS_STRING(out), length)
    if got != length:
        PyByteArray_Resize(out, got)
    return out


cdef _check_checkpoint(const unsigned char[:] window, int bits, int64_t skip):
    if window.shape[0] != WINSIZE:
        raise ValueError("a checkpoint window is 32768 bytes")
    if not 0 <= bits <= 7:
        raise ValueError("checkpoint bits must be 0..7")
    if skip < 0:
        raise ValueError("the bytes to skip cannot be negative")


cdef Py_ssize_t _inflate_into(const unsigned char[:] comp, int bits,
                              const unsigned char[:] window, int64_t skip,
                              unsigned char *dest, Py_ssize_t size) except -1:
    """The one place a checkpointed inflate runs (without the GIL) and its failure
    becomes a Python exception; ``comp`` is not empty."""
    cdef const char *why = NULL
    cdef Py_ssize_t got = 0
    cdef int rc
    with nogil:
        rc = inflate_from(&comp[0], comp.shape[0], bits, &window[0], skip, dest, size, &got,
                          &why)
    if rc < 0:
        from soci.errors import LayerFormatError
        raise LayerFormatError(f"corrupt gzip data in span: {why.decode(errors='replace')}")
    return got


def crc32(const unsigned char[:] data, unsigned long crc=0) -> int:
    """The CRC-32 of ``data``, continuing ``crc``: zlib's, vectorised in zlib-ng, so a
    cache file is checked at memory speed. A guard against torn or damaged files, not
    against anyone who can write them (the cache directory is root's alone)."""
    cdef Py_ssize_t n = data.shape[0]
    if n == 0:
        return crc
    with nogil:
        crc = crc32_z(crc, &data[0], <size_t>n)
    return crc
