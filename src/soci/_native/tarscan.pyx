# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Native tar scanning: find headers in a stream, decode them like Go's archive/tar.

The scanner runs inside the inflate loop with the GIL released, so it only
copies header blocks (and the bodies of PAX / GNU long-name records) into a
packed buffer; decoding those records into Python values happens afterwards,
off the inflate thread, in ``decode_header`` and ``parse_pax``.
"""

from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy, memset, memcmp
from libc.stdio cimport snprintf
from libc.stdint cimport int64_t, uint64_t, int32_t, INT64_MAX

DEF BLOCK = 512
# Go's archive/tar refuses PAX and GNU long-name records larger than this.
DEF MAX_SPECIAL = 1 << 20

cdef enum:
    PAX_NONE = 0     # no pending PAX size: the header's size field stands
    PAX_VALUE = 1
    PAX_INVALID = 2  # a size record Go's strconv.ParseInt refuses

cdef enum:
    S_HEADER = 0
    S_BODY = 1
    S_SKIP = 2
    S_ZERO = 3
    S_END = 4
    S_ERROR = 5

cdef inline bint is_meta(unsigned char t) noexcept nogil:
    return t == b'x' or t == b'g' or t == b'L' or t == b'K'


cdef inline bint is_header_only(unsigned char t) noexcept nogil:
    # Entries whose size field does not count data blocks (Go's isHeaderOnlyType).
    return t == b'1' or t == b'2' or t == b'3' or t == b'4' or t == b'5' or t == b'6'


cdef int parse_octal(const unsigned char *b, int n, int64_t *out) noexcept nogil:
    """Octal as Go parses it: trim NUL/space both ends, stop at a NUL, digits only."""
    cdef int i = 0, j = n
    cdef uint64_t x = 0
    while i < j and (b[i] == 0 or b[i] == 32):
        i += 1
    while j > i and (b[j - 1] == 0 or b[j - 1] == 32):
        j -= 1
    if i == j:
        out[0] = 0
        return 0
    cdef int k
    for k in range(i, j):
        if b[k] == 0:
            break
        if b[k] < 48 or b[k] > 55:
            return -1
        if x >> 61:
            return -1
        x = (x << 3) | (b[k] - 48)
    if i < j and b[i] == 0:
        return -1
    out[0] = <int64_t>x
    return 0


cdef int parse_numeric(const unsigned char *b, int n, int64_t *out) noexcept nogil:
    """A numeric header field: octal, or GNU base-256 when the high bit is set."""
    cdef uint64_t x = 0
    cdef unsigned char inv = 0, c
    cdef int i
    if n > 0 and b[0] & 0x80:
        if b[0] & 0x40:
            inv = 0xff
        for i in range(n):
            c = b[i] ^ inv
            if i == 0:
                c &= 0x7f
            if x >> 56:
                return -1
            x = (x << 8) | c
        if x >> 63:
            return -1
        if inv:
            out[0] = ~(<int64_t>x)
        else:
            out[0] = <int64_t>x
        return 0
    return parse_octal(b, n, out)


cdef bint checksum_ok(const unsigned char *h) noexcept nogil:
    cdef int64_t want
    cdef int64_t unsigned_sum = 0, signed_sum = 0
    cdef int i
    if parse_octal(h + 148, 8, &want) < 0:
        return False
    for i in range(BLOCK):
        if 148 <= i < 156:
            unsigned_sum += 32
            signed_sum += 32
        else:
            unsigned_sum += h[i]
            signed_sum += <signed char>h[i]
    return want == unsigned_sum or want == signed_sum


cdef bint all_zero(const unsigned char *h) noexcept nogil:
    cdef int i
    for i in range(BLOCK):
        if h[i]:
            return False
    return True


cdef int64_t pax_record(const unsigned char *p, int64_t n, int64_t i,
                       int64_t *key, int64_t *key_end) noexcept nogil:
    """One ``"%d %s=%s\\n"`` record starting at p[i], as Go's parsePAXRecord reads it.

    Returns the index of the next record (the value spans ``key_end + 1`` up to
    the returned index minus one), or -1 when the record is malformed.
    """
    cdef int64_t length = 0, j = i, eq
    if j < n and p[j] == 43:
        j += 1  # strconv.ParseInt takes a leading '+'
    if j >= n or p[j] == 32:
        return -1
    while j < n and p[j] != 32:
        if p[j] < 48 or p[j] > 57 or length > 100000000:
            return -1
        length = length * 10 + (p[j] - 48)
        j += 1
    if j >= n or length < 5 or length > n - i or length <= j + 1 - i:
        return -1
    if p[i + length - 1] != 10:
        return -1
    j += 1
    eq = j
    while eq < i + length - 1 and p[eq] != 61:
        eq += 1
    if eq >= i + length - 1 or eq == j:
        return -1
    key[0] = j
    key_end[0] = eq
    return i + length


cdef int parse_go_int(const unsigned char *p, int64_t n, int64_t *out) noexcept nogil:
    """strconv.ParseInt(s, 10, 64): optional sign, at least one digit, int64 range."""
    cdef int64_t i = 0
    cdef uint64_t x = 0, limit = (<uint64_t>1) << 63
    cdef bint neg = False
    if n > 0 and (p[0] == 43 or p[0] == 45):
        neg = p[0] == 45
        i = 1
    if i >= n:
        return -1
    while i < n:
        if p[i] < 48 or p[i] > 57:
            return -1
        if x > (limit - (p[i] - 48)) // 10:
            return -1
        x = x * 10 + (p[i] - 48)
        i += 1
    if not neg and x == limit:
        return -1
    out[0] = -<int64_t>(x - 1) - 1 if neg else <int64_t>x
    return 0


cdef int pax_scan(const unsigned char *p, int64_t n, int *size_state, int64_t *size,
                  int *path_slash) noexcept nogil:
    """What a PAX body tells the scanner: its last ``size`` and ``path`` records.

    Like Go's map of records, a later record replaces an earlier one with the same
    key, and an empty value leaves the header's own field in force. A size that
    does not parse is only an error once it is applied to an entry, as in Go.
    Returns -1 on a malformed body.
    """
    cdef int64_t i = 0, nxt, k, e
    size_state[0] = PAX_NONE
    path_slash[0] = -1
    while i < n:
        nxt = pax_record(p, n, i, &k, &e)
        if nxt < 0:
            return -1
        if e - k == 4 and memcmp(p + k, b"size", 4) == 0:
            if e + 1 == nxt - 1:
                size_state[0] = PAX_NONE
            elif parse_go_int(p + e + 1, nxt - 1 - (e + 1), size) < 0:
                size_state[0] = PAX_INVALID
            else:
                size_state[0] = PAX_VALUE
        elif e - k == 4 and memcmp(p + k, b"path", 4) == 0:
            path_slash[0] = -1 if e + 1 == nxt - 1 else p[nxt - 2] == 47
        i = nxt
    return 0


cdef int c_strlen(const unsigned char *b, int n) noexcept nogil:
    cdef int i = 0
    while i < n and b[i]:
        i += 1
    return i


cdef bint gnu_times_unparsable(const unsigned char *p) noexcept nogil:
    """Go reads a GNU header's atime/ctime and, if either does not parse, takes
    the bytes there as a USTAR prefix instead (files from Go < 1.8)."""
    cdef int64_t t
    if p[345] and parse_numeric(p + 345, 12, &t) < 0:
        return True
    if p[357] and parse_numeric(p + 357, 12, &t) < 0:
        return True
    return False


cdef int header_prefix(const unsigned char *p, const unsigned char **prefix) noexcept nogil:
    """Length of the name prefix Go's readHeader joins to the name (0: none)."""
    cdef int n, i
    if memcmp(p + 257, b"ustar\x00", 6) == 0:
        prefix[0] = p + 345
        # STAR keeps a shorter prefix, followed by access and change times.
        return c_strlen(p + 345, 131 if memcmp(p + 508, b"tar\x00", 4) == 0 else 155)
    if memcmp(p + 257, b"ustar  \x00", 8) == 0 and gnu_times_unparsable(p):
        n = c_strlen(p + 345, 155)
        for i in range(n):
            if p[345 + i] >= 0x80:
                return 0
        prefix[0] = p + 345
        return n
    return 0


cdef int long_name_slash(const unsigned char *b, int64_t n) noexcept nogil:
    """-1 for an empty GNU long name (ignored, as by Go), else whether it ends with '/'."""
    cdef int64_t i = 0
    while i < n and b[i]:
        i += 1
    return -1 if i == 0 else b[i - 1] == 47


cdef int header_name_slash(const unsigned char *p) noexcept nogil:
    """Whether the name Go reads from this header ends with '/'."""
    cdef const unsigned char *prefix = NULL
    cdef int n = c_strlen(p, 100)
    if header_prefix(p, &prefix):
        return n == 0 or p[n - 1] == 47  # prefix + "/" + name
    return n > 0 and p[n - 1] == 47


cdef class TarScanner:
    """Walks a tar stream fed in pieces, collecting its headers.

    Records are packed as ``int64 data_offset, int32 length, bytes[length]``
    (a 512-byte header, followed by the body for PAX and GNU long-name types).
    """

    def __cinit__(self):
        self.state = S_HEADER
        self.clear_pending()
        self.archive_end = -1
        self.records_cap = 1 << 16
        self.records = <unsigned char *>malloc(self.records_cap)
        if self.records is NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.records)
        free(self.body)

    cdef int fail(self, const char *what, long long offset) noexcept nogil:
        snprintf(self.error, sizeof(self.error), "%s", what)
        self.error_offset = offset
        self.error_names_entry = False
        self.state = S_ERROR
        return -1

    cdef int fail_entry(self, const char *what, long long offset) noexcept nogil:
        """Fail on the entry whose header is in self.header; the message names it."""
        self.fail(what, offset)
        self.error_names_entry = True
        return -1

    cdef int emit(self, long long data_offset, const unsigned char *body, long long body_len) noexcept nogil:
        cdef Py_ssize_t need = self.records_len + 12 + BLOCK + body_len
        cdef unsigned char *grown
        cdef int64_t off = data_offset
        cdef int32_t length = <int32_t>(BLOCK + body_len)
        if need > self.records_cap:
            while need > self.records_cap:
                self.records_cap *= 2
            grown = <unsigned char *>realloc(self.records, self.records_cap)
            if grown is NULL:
                return self.fail("out of memory collecting tar headers", data_offset)
            self.records = grown
        memcpy(self.records + self.records_len, &off, 8)
        memcpy(self.records + self.records_len + 8, &length, 4)
        memcpy(self.records + self.records_len + 12, self.header, BLOCK)
        if body_len:
            memcpy(self.records + self.records_len + 12 + BLOCK, body, body_len)
        self.records_len = need
        return 0

    cdef void clear_pending(self) noexcept nogil:
        """Forget what extended headers said: Go keeps them only until the next entry."""
        self.pax_size_state = PAX_NONE
        self.pax_slash = -1
        self.long_slash = -1

    cdef int on_header(self) noexcept nogil:
        """A full 512-byte block sits in self.header, ending at self.pos."""
        cdef unsigned char t
        cdef int64_t size
        cdef int slash
        if all_zero(self.header):
            if self.state == S_ZERO:
                self.state = S_END
                self.archive_end = self.pos
            else:
                self.state = S_ZERO
            return 0
        if self.state == S_ZERO:
            return self.fail("a zero block is followed by a non-zero block", self.header_offset)
        if not checksum_ok(self.header):
            return self.fail("tar header checksum mismatch (not a tar stream, or corrupt)", self.header_offset)
        if parse_numeric(self.header + 124, 12, &size) < 0 or size < 0:
            return self.fail_entry("has an invalid size field", self.header_offset)
        t = self.header[156]
        if is_meta(t):
            if size > MAX_SPECIAL:
                return self.fail("PAX or GNU long-name record larger than 1 MiB", self.header_offset)
            free(self.body)
            self.body = <unsigned char *>malloc(size + 1)
            if self.body is NULL:
                return self.fail("out of memory", self.header_offset)
            self.body_len = size
            self.body_fill = 0
            self.state = S_BODY
            if size == 0:
                return self.end_body()
            return 0
        if t == b'S':
            return self.fail("GNU sparse files are not supported", self.header_offset)
        # The entry as Go's Reader.Next returns it: the last pending PAX header's
        # size, the last long name (else the PAX path) for the V7 directory rule.
        if self.pax_size_state == PAX_INVALID:
            return self.fail_entry("has an invalid PAX size record", self.header_offset)
        if self.pax_size_state == PAX_VALUE:
            size = self.pax_size
        slash = self.long_slash
        if slash < 0:
            slash = self.pax_slash
        if slash < 0:
            slash = header_name_slash(self.header)
        self.clear_pending()
        if size < 0:
            return self.fail_entry("has a negative size", self.header_offset)
        if is_header_only(t) or (t == 0 and slash):
            size = 0  # a V7 name ending in '/' is a directory, which has no data
        # The data and its padding must end inside an int64 stream offset (the
        # zTOC's type), so rounding up to a block can never wrap around.
        if size > INT64_MAX - BLOCK - self.pos:
            return self.fail_entry("has a size larger than any tar stream can hold",
                                   self.header_offset)
        if self.emit(self.pos, NULL, 0) < 0:
            return -1
        self.skip = size + ((BLOCK - size % BLOCK) % BLOCK)
        self.state = S_SKIP if self.skip else S_HEADER
        return 0

    cdef int end_body(self) noexcept nogil:
        cdef unsigned char t = self.header[156]
        cdef int size_state, path_slash
        cdef int64_t size = 0
        if t == b'x' or t == b'g':
            if pax_scan(self.body, self.body_len, &size_state, &size, &path_slash) < 0:
                return self.fail("malformed PAX record", self.header_offset)
        if t == b'x':
            # A PAX header replaces whatever an earlier one said (Go: paxHdrs = parsePAX()).
            self.pax_size_state = size_state
            self.pax_size = size
            self.pax_slash = path_slash
        elif t == b'g':
            # Go returns a global header as an entry of its own, which ends the
            # pending extended headers (we leave it out of the TOC, see tarmeta).
            self.clear_pending()
        elif t == b'L':
            # The last long name counts; an empty one does not override the header.
            self.long_slash = long_name_slash(self.body, self.body_len)
        if self.emit(self.header_offset + BLOCK, self.body, self.body_len) < 0:
            return -1
        self.skip = (BLOCK - self.body_len % BLOCK) % BLOCK
        self.state = S_SKIP if self.skip else S_HEADER
        return 0

    cdef int feed(self, const unsigned char *data, Py_ssize_t n) noexcept nogil:
        cdef Py_ssize_t i = 0, take
        while i < n:
            if self.state == S_SKIP:
                take = n - i if n - i < self.skip else <Py_ssize_t>self.skip
                self.skip -= take
                self.pos += take
                i += take
                if self.skip == 0:
                    self.state = S_HEADER
            elif self.state == S_HEADER or self.state == S_ZERO:
                if self.header_fill == 0:
                    self.header_offset = self.pos
                take = BLOCK - self.header_fill
                if n - i < take:
                    take = n - i
                memcpy(self.header + self.header_fill, data + i, take)
                self.header_fill += take
                self.pos += take
                i += take
                if self.header_fill == BLOCK:
                    self.header_fill = 0
                    if self.on_header() < 0:
                        return -1
            elif self.state == S_BODY:
                take = n - i
                if self.body_len - self.body_fill < take:
                    take = <Py_ssize_t>(self.body_len - self.body_fill)
                memcpy(self.body + self.body_fill, data + i, take)
                self.body_fill += take
                self.pos += take
                i += take
                if self.body_fill == self.body_len:
                    if self.end_body() < 0:
                        return -1
            elif self.state == S_END:
                self.pos += n - i
                return 0
            else:
                return -1
        return 0

    # -- the Python side -------------------------------------------------

    def feed_bytes(self, const unsigned char[:] data) -> None:
        """Scan a piece of a plain (uncompressed) tar stream."""
        cdef int rc
        with nogil:
            rc = self.feed(&data[0], data.shape[0]) if data.shape[0] else 0
        if rc < 0:
            self.raise_error()

    def raise_error(self):
        from soci.errors import LayerFormatError
        what = self.error.decode()
        if self.error_names_entry:
            header = (<unsigned char *>self.header)[:BLOCK]
            try:
                raw_name = decode_header(header)[1]
            except ValueError:  # a numeric field is what is broken: name it by its name field
                raw_name = header[:100].split(b"\0", 1)[0]
            name = raw_name.decode("utf-8", "backslashreplace")
            what = f"tar entry {name!r} {what}"
        raise LayerFormatError(f"{what} at uncompressed offset {self.error_offset}")

    @property
    def failed(self) -> bool:
        return self.state == S_ERROR

    def take_records(self) -> bytes:
        """Return the packed records collected since the last call."""
        cdef bytes out = self.records[:self.records_len]
        self.records_len = 0
        return out

    def finish(self) -> int:
        """Check the stream ended cleanly; return the archive size as Go's tar reader ends it.

        Like Go's archive/tar, the archive ends after two zero blocks, after one
        zero block at end of stream, or at a clean end of stream between entries.
        """
        if self.state == S_ERROR:
            self.raise_error()
        if self.state == S_END:
            return self.archive_end
        if (self.state == S_HEADER or self.state == S_ZERO) and self.header_fill == 0:
            return self.pos
        from soci.errors import LayerFormatError
        raise LayerFormatError(f"tar stream is truncated at uncompressed offset {self.pos}")


# -- decoding collected records (with the GIL, off the inflate thread) ---------

cdef bytes cstring(const unsigned char *b, int n):
    cdef int i = 0
    while i < n and b[i]:
        i += 1
    return b[:i]


def decode_header(const unsigned char[:] h):
    """Decode one 512-byte header the way Go's archive/tar reads it.

    Returns ``(typeflag, name, linkname, size, mode, uid, gid, mtime, uname,
    gname, devmajor, devminor)`` with strings as raw bytes; raises ValueError
    on an unparsable numeric field.
    """
    if h.shape[0] < BLOCK:
        raise ValueError("a tar header is 512 bytes")
    cdef const unsigned char *p = &h[0]
    cdef const unsigned char *prefix = NULL
    cdef int prefix_len
    cdef int64_t size, mode, uid, gid, mtime, devmajor = 0, devminor = 0, t
    cdef bint ustar = memcmp(p + 257, b"ustar\x00", 6) == 0
    cdef bint gnu = memcmp(p + 257, b"ustar  \x00", 8) == 0
    cdef bint star = ustar and memcmp(p + 508, b"tar\x00", 4) == 0
    if (parse_numeric(p + 100, 8, &mode) < 0 or parse_numeric(p + 108, 8, &uid) < 0
            or parse_numeric(p + 116, 8, &gid) < 0 or parse_numeric(p + 124, 12, &size) < 0
            or parse_numeric(p + 136, 12, &mtime) < 0):
        raise ValueError("invalid numeric field in tar header")
    name = cstring(p, 100)
    linkname = cstring(p + 157, 100)
    uname = gname = b""
    if ustar or gnu:
        uname = cstring(p + 265, 32)
        gname = cstring(p + 297, 32)
        if parse_numeric(p + 329, 8, &devmajor) < 0 or parse_numeric(p + 337, 8, &devminor) < 0:
            raise ValueError("invalid device number in tar header")
        if star and (parse_numeric(p + 476, 12, &t) < 0 or parse_numeric(p + 488, 12, &t) < 0):
            raise ValueError("invalid access or change time in tar header")
        prefix_len = header_prefix(p, &prefix)
        if prefix_len:
            name = prefix[:prefix_len] + b"/" + name
    return (p[156], name, linkname, size, mode, uid, gid, mtime, uname, gname, devmajor, devminor)


def parse_pax(const unsigned char[:] body):
    """Parse PAX records (``"%d %s=%s\\n"``) into a list of (key, value) bytes pairs."""
    cdef int64_t i = 0, n = body.shape[0], nxt, k, e
    cdef const unsigned char *p = &body[0] if n else NULL
    out = []
    while i < n:
        nxt = pax_record(p, n, i, &k, &e)
        if nxt < 0:
            raise ValueError("malformed PAX record")
        out.append((p[k:e], p[e + 1:nxt - 1]))
        i = nxt
    return out
