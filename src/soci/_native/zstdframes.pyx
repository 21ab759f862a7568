# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Native zstd random access: find frame starts in one pass, decode whole frames later.

A zstd frame decodes from its first byte with no earlier state, so a checkpoint is
just a frame start: its compressed offset and the uncompressed offset of its first
byte. ``ZstdIndexer`` decodes a layer fed in pieces with libzstd's streaming decoder,
parses every frame header itself (to refuse dictionary frames, to check the declared
content size, and to step over skippable frames with a bounded length), records a
checkpoint at the first data frame that starts once the open span holds ``span_size``
uncompressed bytes, and hands every decoded byte to a ``TarScanner``.

``decompress_range`` decodes a run of whole frames (skippable frames allowed between
them) from its start, discarding a prefix, into a caller's buffer.

All libzstd work runs with the GIL released; failures are written into one message
buffer and turned into a Python exception in exactly one place per entry point.
"""

from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy
from libc.stdio cimport snprintf
from libc.stdint cimport int64_t, uint32_t, uint64_t, INT32_MAX

from soci._native.tarscan cimport TarScanner


cdef extern from "zstd.h" nogil:
    ctypedef struct ZSTD_DCtx:
        pass
    ctypedef struct ZSTD_inBuffer:
        const void *src
        size_t size
        size_t pos
    ctypedef struct ZSTD_outBuffer:
        void *dst
        size_t size
        size_t pos
    ctypedef enum ZSTD_dParameter:
        ZSTD_d_windowLogMax
    ctypedef enum ZSTD_ResetDirective:
        ZSTD_reset_session_only
    ZSTD_DCtx *ZSTD_createDCtx()
    size_t ZSTD_freeDCtx(ZSTD_DCtx *dctx)
    size_t ZSTD_DCtx_setParameter(ZSTD_DCtx *dctx, ZSTD_dParameter param, int value)
    size_t ZSTD_DCtx_reset(ZSTD_DCtx *dctx, ZSTD_ResetDirective reset)
    size_t ZSTD_decompressStream(ZSTD_DCtx *zds, ZSTD_outBuffer *output, ZSTD_inBuffer *input)
    unsigned ZSTD_isError(size_t code)
    const char *ZSTD_getErrorName(size_t code)
    const char *ZSTD_versionString()


DEF OUTCHUNK = 131072
DEF HEADER_MAX = 18           # magic 4 + descriptor 1 + window 1 + dict id 4 + size 8
DEF CHECKPOINT_SIZE = 16      # int64 compressed offset, int64 uncompressed offset
DEF NO_SIZE = -1

#: Window sizes a frame may ask for: libzstd's default limit (128 MiB), so a hostile frame
#: header cannot make the decoder allocate more. Frames from ``zstd --long=28`` and up are
#: refused.
DEF WINDOW_LOG = 27
WINDOW_LOG_MAX = WINDOW_LOG
#: The longest skippable frame stepped over (zstd:chunked keeps its TOC, at most 50 MiB
#: by containers/storage's own limit, in one); longer ones are refused as absurd.
DEF SKIPPABLE_LIMIT = 64 << 20
MAX_SKIPPABLE = SKIPPABLE_LIMIT

cdef uint32_t MAGIC = 0xFD2FB528U
cdef uint32_t SKIPPABLE = 0x184D2A50U
cdef uint32_t SKIPPABLE_MASK = 0xFFFFFFF0U

ZSTD_VERSION = ZSTD_versionString().decode()

cdef enum:
    S_HEAD = 0    # collecting the first bytes of a frame into hdr[]
    S_SKIP = 1    # stepping over the content of a skippable frame
    S_FRAME = 2   # decoding a data frame
    S_ERROR = 3


cdef inline uint32_t le32(const unsigned char *p) noexcept nogil:
    return (<uint32_t>p[0]) | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline uint64_t le_n(const unsigned char *p, int n) noexcept nogil:
    cdef uint64_t x = 0
    cdef int i
    for i in range(n - 1, -1, -1):
        x = (x << 8) | p[i]
    return x


cdef inline int dict_id_size(int flag) noexcept nogil:
    return 0 if flag == 0 else (1 if flag == 1 else (2 if flag == 2 else 4))


cdef inline int content_size_size(int flag, int single) noexcept nogil:
    if flag == 0:
        return 1 if single else 0
    return 2 if flag == 1 else (4 if flag == 2 else 8)


cdef int header_size(const unsigned char *hdr) noexcept nogil:
    """Bytes of a data frame's header, from its descriptor byte (hdr[4])."""
    cdef unsigned char d = hdr[4]
    cdef int fcs_flag = d >> 6, single = (d >> 5) & 1, dict_flag = d & 3
    return 5 + (0 if single else 1) + dict_id_size(dict_flag) + content_size_size(fcs_flag, single)


cdef int parse_header(const unsigned char *hdr, uint32_t *dict_id, int64_t *content_size,
                      const char **why) noexcept nogil:
    """Dictionary id and declared content size (NO_SIZE if absent) of a complete header."""
    cdef unsigned char d = hdr[4]
    cdef int fcs_flag = d >> 6, single = (d >> 5) & 1, dict_flag = d & 3
    cdef int pos = 5 + (0 if single else 1)
    cdef int dsize = dict_id_size(dict_flag)
    cdef uint64_t fcs
    if d & 0x08:
        why[0] = "frame header has its reserved bit set"
        return -1
    dict_id[0] = <uint32_t>le_n(hdr + pos, dsize) if dsize else 0
    pos += dsize
    if fcs_flag == 0 and not single:
        content_size[0] = NO_SIZE
        return 0
    if fcs_flag == 0:
        fcs = hdr[pos]
    elif fcs_flag == 1:
        fcs = le_n(hdr + pos, 2) + 256
    elif fcs_flag == 2:
        fcs = le_n(hdr + pos, 4)
    else:
        fcs = le_n(hdr + pos, 8)
    if fcs > <uint64_t>0x7FFFFFFFFFFFFFFF:
        why[0] = "frame header declares an impossible content size"
        return -1
    content_size[0] = <int64_t>fcs
    return 0


def _explain(message: str) -> str:
    """libzstd's words for a refused window, made plain."""
    if "too much memory" in message:
        return message + (f" (its window is over {1 << WINDOW_LOG >> 20} MiB, as written by "
                          f"zstd --long=28 and up: not supported)")
    return message


cdef ZSTD_DCtx *new_dctx() noexcept nogil:
    cdef ZSTD_DCtx *d = ZSTD_createDCtx()
    if d is not NULL:
        ZSTD_DCtx_setParameter(d, ZSTD_d_windowLogMax, WINDOW_LOG)
    return d


cdef class ZstdIndexer:
    """One streaming pass over a zstd blob: frame-start checkpoints plus tar headers."""

    cdef ZSTD_DCtx *dctx
    cdef int state
    cdef int64_t span_size
    cdef int64_t total_in         # compressed bytes consumed
    cdef int64_t total_out        # uncompressed bytes produced
    cdef int64_t last             # uncompressed offset of the last checkpoint
    cdef int64_t data_end         # compressed offset just past the last data frame
    cdef int64_t frame_start      # compressed offset of the frame being read
    cdef int64_t frame_out        # bytes the current data frame produced so far
    cdef int64_t frame_size       # its declared content size, or NO_SIZE
    cdef int64_t skip_left        # bytes of a skippable frame still to pass
    cdef int64_t frames           # data frames seen
    cdef unsigned char hdr[HEADER_MAX]
    cdef int hdr_fill
    cdef unsigned char *out
    cdef unsigned char *points    # packed (int64 in, int64 out) per checkpoint
    cdef Py_ssize_t points_len
    cdef Py_ssize_t points_cap
    cdef int64_t count
    cdef TarScanner scanner
    cdef bint scanner_failed
    cdef char error[240]

    def __cinit__(self, int64_t span_size, TarScanner scanner):
        if span_size <= 0:
            raise ValueError("span size must be positive")
        self.span_size = span_size
        self.scanner = scanner
        self.frame_size = NO_SIZE
        self.dctx = new_dctx()
        self.out = <unsigned char *>malloc(OUTCHUNK)
        self.points_cap = 64 * CHECKPOINT_SIZE
        self.points = <unsigned char *>malloc(self.points_cap)
        if self.dctx is NULL or self.out is NULL or self.points is NULL:
            raise MemoryError()

    def __dealloc__(self):
        if self.dctx is not NULL:
            ZSTD_freeDCtx(self.dctx)
        free(self.out)
        free(self.points)

    cdef int fail(self, const char *what) noexcept nogil:
        snprintf(self.error, sizeof(self.error), "%s (frame at compressed offset %lld)",
                 what, <long long>self.frame_start)
        self.state = S_ERROR
        return -1

    cdef int add_checkpoint(self) noexcept nogil:
        cdef unsigned char *grown
        if self.count == INT32_MAX:
            return self.fail("too many spans (the zTOC counts them in an int32)")
        if self.points_len + CHECKPOINT_SIZE > self.points_cap:
            grown = <unsigned char *>realloc(self.points, self.points_cap * 2)
            if grown is NULL:
                return self.fail("out of memory recording checkpoints")
            self.points = grown
            self.points_cap *= 2
        memcpy(self.points + self.points_len, &self.frame_start, 8)
        memcpy(self.points + self.points_len + 8, &self.total_out, 8)
        self.points_len += CHECKPOINT_SIZE
        self.count += 1
        self.last = self.total_out
        return 0

    cdef int start_data_frame(self) noexcept nogil:
        """hdr[] holds a complete data frame header: check it, checkpoint, start decoding."""
        cdef uint32_t dict_id = 0
        cdef int64_t size = NO_SIZE
        cdef const char *why = NULL
        cdef ZSTD_inBuffer inb
        cdef ZSTD_outBuffer outb
        cdef size_t ret
        if parse_header(self.hdr, &dict_id, &size, &why) < 0:
            return self.fail(why)
        if dict_id != 0:
            snprintf(self.error, sizeof(self.error),
                     "frame at compressed offset %lld needs zstd dictionary %u: "
                     "dictionary-compressed layers cannot be indexed",
                     <long long>self.frame_start, dict_id)
            self.state = S_ERROR
            return -1
        if self.count == 0 or self.total_out - self.last >= self.span_size:
            if self.add_checkpoint() < 0:
                return -1
        self.frames += 1
        self.frame_size = size
        self.frame_out = 0
        ZSTD_DCtx_reset(self.dctx, ZSTD_reset_session_only)
        inb.src = self.hdr
        inb.size = self.hdr_fill
        inb.pos = 0
        outb.dst = self.out
        outb.size = OUTCHUNK
        outb.pos = 0
        ret = ZSTD_decompressStream(self.dctx, &outb, &inb)
        if ZSTD_isError(ret):
            return self.fail(ZSTD_getErrorName(ret))
        if inb.pos != inb.size or outb.pos != 0:
            return self.fail("frame header not taken whole by the decoder")
        self.state = S_FRAME
        return 0

    cdef Py_ssize_t head(self, const unsigned char *data, Py_ssize_t n) noexcept nogil:
        """Collect a frame's first bytes; bytes used, or -1."""
        cdef Py_ssize_t used = 0, want
        cdef uint32_t magic
        if self.hdr_fill == 0:
            self.frame_start = self.total_in
        while used < n:
            if self.hdr_fill < 4:
                want = 4
            else:
                magic = le32(self.hdr)
                if (magic & SKIPPABLE_MASK) == SKIPPABLE:
                    want = 8
                elif magic == MAGIC:
                    want = 5 if self.hdr_fill < 5 else header_size(self.hdr)
                else:
                    return self.fail("not a zstd frame (bad magic number)")
            if self.hdr_fill == want:
                break
            self.hdr[self.hdr_fill] = data[used]
            self.hdr_fill += 1
            used += 1
            self.total_in += 1
        # Complete only if a check above broke out, or the last byte completed it.
        if self.hdr_fill >= 4:
            magic = le32(self.hdr)
            if (magic & SKIPPABLE_MASK) == SKIPPABLE:
                if self.hdr_fill < 8:
                    return used
                self.skip_left = le32(self.hdr + 4)
                if self.skip_left > SKIPPABLE_LIMIT:
                    snprintf(self.error, sizeof(self.error),
                             "skippable frame at compressed offset %lld declares %lld bytes "
                             "(limit %lld)", <long long>self.frame_start,
                             <long long>self.skip_left, <long long>SKIPPABLE_LIMIT)
                    self.state = S_ERROR
                    return -1
                self.hdr_fill = 0
                self.state = S_SKIP
                return used
            if magic != MAGIC:
                self.fail("not a zstd frame (bad magic number)")
                return -1
            if self.hdr_fill >= 5 and self.hdr_fill == header_size(self.hdr):
                if self.start_data_frame() < 0:
                    return -1
                self.hdr_fill = 0
        return used

    cdef int decode(self, const unsigned char *data, Py_ssize_t n, Py_ssize_t *used) noexcept nogil:
        """Decode frame bytes until the frame ends or data runs out."""
        cdef ZSTD_inBuffer inb
        cdef ZSTD_outBuffer outb
        cdef size_t ret
        inb.src = data
        inb.size = <size_t>n
        inb.pos = 0
        while True:
            outb.dst = self.out
            outb.size = OUTCHUNK
            outb.pos = 0
            ret = ZSTD_decompressStream(self.dctx, &outb, &inb)
            if ZSTD_isError(ret):
                used[0] = inb.pos
                self.total_in += <int64_t>inb.pos
                return self.fail(ZSTD_getErrorName(ret))
            if outb.pos:
                self.total_out += <int64_t>outb.pos
                self.frame_out += <int64_t>outb.pos
                if self.frame_size != NO_SIZE and self.frame_out > self.frame_size:
                    self.total_in += <int64_t>inb.pos
                    return self.fail("frame decodes to more bytes than its header declares")
                if self.scanner is not None and self.scanner.feed(self.out, outb.pos) < 0:
                    self.scanner_failed = True
                    self.state = S_ERROR
                    return -1
            if ret == 0:
                if self.frame_size != NO_SIZE and self.frame_out != self.frame_size:
                    self.total_in += <int64_t>inb.pos
                    return self.fail("frame decodes to fewer bytes than its header declares")
                self.state = S_HEAD
                self.data_end = self.total_in + <int64_t>inb.pos
                break
            if inb.pos == inb.size and outb.pos < outb.size:
                break
        used[0] = inb.pos
        self.total_in += <int64_t>inb.pos
        return 0

    cdef int run(self, const unsigned char *data, Py_ssize_t n) noexcept nogil:
        cdef Py_ssize_t i = 0, take, used
        while i < n:
            if self.state == S_HEAD:
                used = self.head(data + i, n - i)
                if used < 0:
                    return -1
                i += used
            elif self.state == S_SKIP:
                take = n - i if n - i < self.skip_left else <Py_ssize_t>self.skip_left
                self.skip_left -= take
                self.total_in += take
                i += take
                if self.skip_left == 0:
                    self.state = S_HEAD
            elif self.state == S_FRAME:
                if self.decode(data + i, n - i, &used) < 0:
                    return -1
                i += used
            else:
                return -1
        return 0

    def feed(self, const unsigned char[:] data) -> list:
        """Decode the next piece of the blob; return ``[(in, out), ...]`` of new checkpoints.

        A checkpoint may lie up to 17 bytes before the start of ``data`` (its frame header
        straddled two pieces).
        """
        cdef int rc = 0
        cdef int64_t first = self.count
        if self.state == S_ERROR:
            raise RuntimeError("indexer already failed")
        if data.shape[0]:
            with nogil:
                rc = self.run(&data[0], data.shape[0])
        if rc < 0:
            self.raise_error()
        cdef list found = []
        cdef int64_t i, at, out
        for i in range(first, self.count):
            memcpy(&at, self.points + i * CHECKPOINT_SIZE, 8)
            memcpy(&out, self.points + i * CHECKPOINT_SIZE + 8, 8)
            found.append((at, out))
        return found

    cdef raise_error(self):
        if self.scanner_failed:
            self.scanner.raise_error()
        from soci.errors import LayerFormatError
        message = f"corrupt zstd data: {self.error.decode(errors='replace')}"
        raise LayerFormatError(_explain(message))

    def finish(self) -> None:
        """Require the blob to end after a whole frame, with at least one data frame."""
        from soci.errors import LayerFormatError
        cdef ZSTD_inBuffer inb
        if self.state == S_ERROR:
            raise RuntimeError("indexer already failed")
        if self.state == S_SKIP:
            raise LayerFormatError(
                f"zstd stream is truncated: the skippable frame at compressed offset "
                f"{self.frame_start} runs past the end of the layer ({self.total_in} bytes)")
        if self.state == S_FRAME or self.hdr_fill:
            raise LayerFormatError(
                f"zstd stream is truncated (the frame at compressed offset {self.frame_start}"
                f" is incomplete at {self.total_in} bytes)")
        if self.frames == 0:
            raise LayerFormatError("zstd stream holds no data frame")

    @property
    def total_in(self) -> int:
        return self.total_in

    @property
    def total_out(self) -> int:
        """Uncompressed bytes produced so far (the whole stream once finished)."""
        return self.total_out

    @property
    def data_end(self) -> int:
        """Compressed offset just past the last data frame so far (skippable frames after
        it belong to no span)."""
        return self.data_end

    @property
    def resolved(self) -> int:
        """Compressed offset below which no checkpoint can still be reported (a frame header
        being collected may yet become one)."""
        return self.frame_start if self.state == S_HEAD and self.hdr_fill else self.total_in

    @property
    def open_span(self) -> int:
        """Uncompressed bytes of the span being built so far."""
        return self.total_out - self.last

    @property
    def frame_count(self) -> int:
        return self.frames

    @property
    def checkpoint_count(self) -> int:
        return self.count

    def checkpoints(self) -> bytes:
        """The checkpoints as packed little-endian ``(int64 in, int64 out)`` pairs."""
        return self.points[:self.points_len]


cdef int decode_frames(const unsigned char *comp, Py_ssize_t comp_len, int64_t skip,
                       unsigned char *dest, Py_ssize_t want, Py_ssize_t *got,
                       bint *ended, const char **why) noexcept nogil:
    """Decode whole frames from comp's start, dropping skip bytes, into dest[:want]."""
    cdef ZSTD_DCtx *dctx = new_dctx()
    cdef unsigned char *discard = NULL
    cdef ZSTD_inBuffer inb
    cdef ZSTD_outBuffer outb
    cdef size_t ret = 1
    cdef int rc = 0
    got[0] = 0
    ended[0] = False
    if dctx is NULL:
        why[0] = "out of memory"
        return -1
    if skip > 0:
        discard = <unsigned char *>malloc(OUTCHUNK)
        if discard is NULL:
            ZSTD_freeDCtx(dctx)
            why[0] = "out of memory"
            return -1
    inb.src = comp
    inb.size = <size_t>comp_len
    inb.pos = 0
    while got[0] < want or skip > 0:
        if skip > 0:
            outb.dst = discard
            outb.size = OUTCHUNK if skip > OUTCHUNK else <size_t>skip
        else:
            outb.dst = dest + got[0]
            outb.size = <size_t>(want - got[0])
        outb.pos = 0
        ret = ZSTD_decompressStream(dctx, &outb, &inb)
        if ZSTD_isError(ret):
            why[0] = ZSTD_getErrorName(ret)
            rc = -1
            break
        if skip > 0:
            skip -= <int64_t>outb.pos
        else:
            got[0] += <Py_ssize_t>outb.pos
        if inb.pos == inb.size and outb.pos < outb.size:
            break  # input used up and nothing more buffered
    # Past the last byte wanted, the frame need not be finished; at the end of the input
    # it must be (ret == 0: a frame ended and everything was flushed).
    ended[0] = ret == 0 and inb.pos == inb.size
    free(discard)
    ZSTD_freeDCtx(dctx)
    return rc


def decompress_range(const unsigned char[:] comp, int64_t skip, unsigned char[:] dest) -> int:
    """Decode whole zstd frames from ``comp``'s start into ``dest`` after dropping ``skip`` bytes.

    ``comp`` starts at a frame start (a checkpoint) and may hold skippable frames between
    data frames. Returns the bytes written: ``len(dest)``, or fewer only when ``comp`` ended
    cleanly after a whole frame first. Corrupt or truncated frames raise
    ``LayerFormatError``; so do frames needing a dictionary or a window over 128 MiB.
    """
    cdef const char *why = NULL
    cdef Py_ssize_t got = 0
    cdef bint ended = False
    cdef int rc
    if skip < 0:
        raise ValueError("the bytes to skip cannot be negative")
    if comp.shape[0] == 0:
        return 0
    with nogil:
        rc = decode_frames(&comp[0], comp.shape[0], skip,
                           &dest[0] if dest.shape[0] else NULL, dest.shape[0],
                           &got, &ended, &why)
    from soci.errors import LayerFormatError
    if rc < 0:
        message = f"corrupt zstd data in span: {why.decode(errors='replace')}"
        raise LayerFormatError(_explain(message))
    if got < dest.shape[0] and not ended:
        raise LayerFormatError("zstd data in span ends inside a frame (truncated)")
    return got
