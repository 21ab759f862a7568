# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The zTOC FlatBuffer, encoded and decoded natively.

Encoding replays the exact sequence of builder calls upstream SOCI makes with
the Go FlatBuffers runtime, on a builder that follows the Go runtime's layout
rules (back-to-front, the same alignment and padding, and the same vtable
deduplication, which compares field offsets only). The output is therefore
byte-identical to upstream's for the same zTOC.

Decoding walks the buffer with every offset bounds-checked, so a hostile or
truncated zTOC raises ``ValueError`` instead of reading outside the buffer.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy, memset
from libc.stdint cimport int8_t, int32_t, int64_t, uint16_t, uint32_t, uint64_t

DEF MAX_FIELDS = 16


cdef class Builder:
    """A FlatBuffers builder with the Go runtime's layout rules."""

    cdef unsigned char *buf
    cdef Py_ssize_t cap
    cdef Py_ssize_t head
    cdef Py_ssize_t minalign
    cdef uint32_t vtable[MAX_FIELDS]
    cdef int vtable_len
    cdef uint32_t object_end
    cdef uint32_t *vtables
    cdef Py_ssize_t n_vtables
    cdef Py_ssize_t vtables_cap

    def __cinit__(self, Py_ssize_t initial=1024):
        self.cap = initial if initial > 64 else 64
        self.buf = <unsigned char *>malloc(self.cap)
        self.head = self.cap
        self.minalign = 1
        self.vtables_cap = 64
        self.vtables = <uint32_t *>malloc(self.vtables_cap * sizeof(uint32_t))
        if self.buf is NULL or self.vtables is NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.buf)
        free(self.vtables)

    cdef inline uint32_t offset(self) noexcept:
        return <uint32_t>(self.cap - self.head)

    cdef int grow(self, Py_ssize_t needed) except -1:
        cdef Py_ssize_t new_cap = self.cap
        cdef Py_ssize_t used = self.cap - self.head
        cdef unsigned char *grown
        while new_cap - used < needed + used // 2 + 64:
            new_cap *= 2
        grown = <unsigned char *>malloc(new_cap)
        if grown is NULL:
            raise MemoryError()
        memcpy(grown + new_cap - used, self.buf + self.head, used)
        free(self.buf)
        self.buf = grown
        self.head = new_cap - used
        self.cap = new_cap
        return 0

    cdef int prep(self, Py_ssize_t size, Py_ssize_t additional) except -1:
        cdef Py_ssize_t align
        if size > self.minalign:
            self.minalign = size
        align = (-(<Py_ssize_t>self.offset() + additional)) & (size - 1)
        # uoffsets are 32-bit and FlatBuffers cap a buffer at 2 GiB: refuse to go past it.
        if additional > 0x7FFFFFFF or self.cap - self.head + align + size + additional > 0x7FFFFFFF:
            raise ValueError("a zTOC cannot exceed the 2 GiB a FlatBuffer can address")
        if self.head < align + size + additional:
            self.grow(align + size + additional)
        self.head -= align
        memset(self.buf + self.head, 0, align)
        return 0

    cdef inline void place_u32(self, uint32_t x) noexcept:
        self.head -= 4
        memcpy(self.buf + self.head, &x, 4)

    cdef inline void place_u16(self, uint16_t x) noexcept:
        self.head -= 2
        memcpy(self.buf + self.head, &x, 2)

    cdef int prepend_uoffset(self, uint32_t off) except -1:
        self.prep(4, 0)
        self.place_u32(self.offset() - off + 4)
        return 0

    cdef uint32_t create_bytes(self, const unsigned char *s, Py_ssize_t n, bint nul) except? 0:
        self.prep(4, n + (1 if nul else 0))
        if nul:
            self.head -= 1
            self.buf[self.head] = 0
        self.head -= n
        memcpy(self.buf + self.head, s, n)
        self.place_u32(<uint32_t>n)
        return self.offset()

    cdef uint32_t create_string(self, bytes s) except? 0:
        return self.create_bytes(<const unsigned char *>s, len(s), True)

    cdef uint32_t offset_vector(self, uint32_t *offs, Py_ssize_t n) except? 0:
        cdef Py_ssize_t i
        self.prep(4, 4 * n)
        for i in range(n - 1, -1, -1):
            self.prepend_uoffset(offs[i])
        self.place_u32(<uint32_t>n)
        return self.offset()

    cdef void start_object(self, int nfields) noexcept:
        self.vtable_len = nfields
        memset(self.vtable, 0, sizeof(self.vtable))
        self.object_end = self.offset()

    cdef int add_i64(self, int slot, int64_t x) except -1:
        if x != 0:
            self.prep(8, 0)
            self.head -= 8
            memcpy(self.buf + self.head, &x, 8)
            self.vtable[slot] = self.offset()
        return 0

    cdef int add_i32(self, int slot, int32_t x) except -1:
        if x != 0:
            self.prep(4, 0)
            self.place_u32(<uint32_t>x)
            self.vtable[slot] = self.offset()
        return 0

    cdef int add_i8(self, int slot, int8_t x, int8_t default) except -1:
        if x != default:
            self.prep(1, 0)
            self.head -= 1
            self.buf[self.head] = <unsigned char>x
            self.vtable[slot] = self.offset()
        return 0

    cdef int add_offset(self, int slot, uint32_t off) except -1:
        if off != 0:
            self.prepend_uoffset(off)
            self.vtable[slot] = self.offset()
        return 0

    cdef bint vtable_equal(self, int n, uint32_t object_offset, uint32_t existing) noexcept:
        # Go's vtableEqual: field entries only, the object size is not compared.
        cdef Py_ssize_t start = self.cap - existing
        cdef uint16_t vlen, x
        cdef int i
        memcpy(&vlen, self.buf + start, 2)
        if vlen != (n + 2) * 2:
            return False
        for i in range(n):
            memcpy(&x, self.buf + start + 4 + 2 * i, 2)
            if x == 0 and self.vtable[i] == 0:
                continue
            if <int64_t>x != <int64_t>object_offset - <int64_t>self.vtable[i]:
                return False
        return True

    cdef uint32_t end_object(self) except? 0:
        cdef uint32_t object_offset, existing = 0
        cdef int n = self.vtable_len, i
        cdef int32_t rel
        cdef Py_ssize_t k
        cdef uint32_t *grown
        self.prep(4, 0)
        self.place_u32(0)
        object_offset = self.offset()
        while n > 0 and self.vtable[n - 1] == 0:
            n -= 1
        for k in range(self.n_vtables - 1, -1, -1):
            if self.vtable_equal(n, object_offset, self.vtables[k]):
                existing = self.vtables[k]
                break
        if existing == 0:
            for i in range(n - 1, -1, -1):
                self.prep(2, 0)
                self.place_u16(<uint16_t>(object_offset - self.vtable[i]) if self.vtable[i] else 0)
            self.prep(2, 0)
            self.place_u16(<uint16_t>(object_offset - self.object_end))
            self.prep(2, 0)
            self.place_u16(<uint16_t>((n + 2) * 2))
            rel = <int32_t>(<int64_t>self.offset() - <int64_t>object_offset)
            memcpy(self.buf + self.cap - object_offset, &rel, 4)
            if self.n_vtables == self.vtables_cap:
                self.vtables_cap *= 2
                grown = <uint32_t *>realloc(self.vtables, self.vtables_cap * sizeof(uint32_t))
                if grown is NULL:
                    raise MemoryError()
                self.vtables = grown
            self.vtables[self.n_vtables] = self.offset()
            self.n_vtables += 1
        else:
            self.head = self.cap - object_offset
            rel = <int32_t>(<int64_t>existing - <int64_t>object_offset)
            memcpy(self.buf + self.head, &rel, 4)
        self.vtable_len = 0
        return object_offset

    cdef bytes finish(self, uint32_t root):
        self.prep(self.minalign, 4)
        self.prepend_uoffset(root)
        return PyBytes_FromStringAndSize(<char *>self.buf + self.head, self.cap - self.head)


cdef inline bytes enc(str s):
    return s.encode("utf-8", "surrogateescape")


cdef uint32_t encode_entry(Builder b, object me) except? 0:
    cdef uint32_t name, typ, linkname, uname, gname, mtime, xattrs
    cdef uint32_t *pairs
    cdef Py_ssize_t n, i
    name = b.create_string(enc(me.name))
    typ = b.create_string(enc(me.type))
    linkname = b.create_string(enc(me.linkname))
    uname = b.create_string(enc(me.uname))
    gname = b.create_string(enc(me.gname))
    mtime = b.create_string(enc(me.mod_time))
    items = sorted((enc(k), enc(v)) for k, v in me.pax_records.items()) if me.pax_records else ()
    n = len(items)
    pairs = <uint32_t *>malloc((n if n else 1) * sizeof(uint32_t))
    if pairs is NULL:
        raise MemoryError()
    try:
        for i in range(n):
            key = b.create_string(items[i][0])
            value = b.create_string(items[i][1])
            b.start_object(2)
            b.add_offset(0, key)
            b.add_offset(1, value)
            pairs[i] = b.end_object()
        xattrs = b.offset_vector(pairs, n)
    finally:
        free(pairs)
    b.start_object(14)
    b.add_offset(0, name)
    b.add_offset(1, typ)
    b.add_i64(2, me.offset)
    b.add_i64(3, me.size)
    b.add_offset(4, linkname)
    b.add_i64(5, me.mode)
    b.add_i32(6, <int32_t><uint32_t>me.uid)
    b.add_i32(7, <int32_t><uint32_t>me.gid)
    b.add_offset(8, uname)
    b.add_offset(9, gname)
    b.add_offset(10, mtime)
    b.add_i64(11, me.devmajor)
    b.add_i64(12, me.devminor)
    b.add_offset(13, xattrs)
    return b.end_object()


def encode_ztoc(str version, str build_tool, int64_t compressed_size, int64_t uncompressed_size,
                list entries, int algorithm, int32_t max_span_id, list span_digests,
                const unsigned char[:] checkpoints) -> bytes:
    """Serialize a zTOC exactly as upstream's ``ztocToFlatbuffer`` does.

    ``algorithm`` is the CompressionAlgorithm enum value (1 gzip, 2 uncompressed),
    or 0 to leave the field out as upstream does for an empty algorithm name.
    """
    cdef Builder b = Builder(1 << 20)
    cdef Py_ssize_t n = len(entries), i
    cdef uint32_t *offs = <uint32_t *>malloc((max(n, len(span_digests)) + 1) * sizeof(uint32_t))
    cdef uint32_t v_version, v_tool, toc, meta, cps, digests, info
    if offs is NULL:
        raise MemoryError()
    try:
        v_version = b.create_string(enc(version))
        v_tool = b.create_string(enc(build_tool))
        for i in range(n - 1, -1, -1):
            offs[i] = encode_entry(b, entries[i])
        meta = b.offset_vector(offs, n)
        b.start_object(1)
        b.add_offset(0, meta)
        toc = b.end_object()
        cps = b.create_bytes(&checkpoints[0] if checkpoints.shape[0] else NULL,
                             checkpoints.shape[0], False)
        for i in range(len(span_digests)):
            offs[i] = b.create_string(enc(span_digests[i]))
        digests = b.offset_vector(offs, len(span_digests))
    finally:
        free(offs)
    b.start_object(4)
    b.add_i32(1, max_span_id)
    b.add_offset(2, digests)
    b.add_offset(3, cps)
    if algorithm:
        b.add_i8(0, <int8_t>algorithm, 1)
    info = b.end_object()
    b.start_object(6)
    b.add_offset(0, v_version)
    b.add_offset(1, v_tool)
    b.add_offset(4, toc)
    b.add_i64(2, compressed_size)
    b.add_i64(3, uncompressed_size)
    b.add_offset(5, info)
    return b.finish(b.end_object())


# -- decoding ------------------------------------------------------------------

# What an entry, a PAX record and a string take at least in a buffer written by upstream's
# builder (or ours), beyond their string bytes: an entry is its vector slot, its table's
# vtable offset, seven offsets (six strings and the PAX record vector) and that vector's
# length; a PAX record is its slot, vtable offset and two offsets; a string is its length
# and its NUL. Charging these for every use, shared or not, makes the total charge of an
# honest zTOC (which shares no table and no string) at most its own size.
DEF ENTRY_COST = 40
DEF RECORD_COST = 16
DEF STRING_COST = 5


cdef class Reader:
    """Bounds-checked access to tables, vectors and strings in a FlatBuffer.

    ``budget`` is how many bytes decoding may still charge: FlatBuffer offsets may point
    many times at one table or string, so what a buffer decodes to is only bounded by
    what the decoder counts as it goes.
    """

    cdef const unsigned char *p
    cdef Py_ssize_t n
    cdef object keep
    cdef int64_t budget
    cdef int64_t allowed
    cdef uint32_t last_len  # bytes in the string string_at decoded last

    def __cinit__(self, const unsigned char[:] data, object keep, int64_t budget=-1):
        self.n = data.shape[0]
        self.p = &data[0] if self.n else NULL
        self.keep = keep
        self.budget = self.allowed = budget

    cdef int check(self, Py_ssize_t pos, Py_ssize_t size) except -1:
        # Written so that nothing can overflow: pos is checked before size is compared.
        if pos < 0 or size < 0 or pos > self.n or size > self.n - pos:
            raise ValueError(f"offset {pos}+{size} is outside the {self.n}-byte buffer")
        return 0

    cdef int charge(self, int64_t cost) except -1:
        if self.allowed < 0:
            return 0
        if cost > self.budget:
            raise ValueError(
                f"its {self.n} bytes decode to over {self.allowed} bytes of entries and "
                "strings (tables or strings are shared)"
            )
        self.budget -= cost
        return 0

    cdef uint32_t u32(self, Py_ssize_t pos) except? 0xFFFFFFFF:
        cdef uint32_t x
        self.check(pos, 4)
        memcpy(&x, self.p + pos, 4)
        return x

    cdef Py_ssize_t deref(self, Py_ssize_t pos) except -1:
        """Follow the uoffset stored at pos."""
        cdef uint32_t off = self.u32(pos)
        if off > <uint64_t>(self.n - pos):
            raise ValueError(f"offset {pos}+{off} is outside the {self.n}-byte buffer")
        self.check(pos + <Py_ssize_t>off, 4)
        return pos + <Py_ssize_t>off

    cdef Py_ssize_t field(self, Py_ssize_t table, int slot, Py_ssize_t size) except -2:
        """Position of a table's ``size``-byte field, or -1 when absent."""
        cdef int32_t rel
        cdef uint16_t vlen, tlen, off
        cdef int64_t vt
        self.check(table, 4)
        memcpy(&rel, self.p + table, 4)
        vt = <int64_t>table - <int64_t>rel
        if vt < 0 or vt > self.n:
            raise ValueError(f"vtable at {vt} is outside the {self.n}-byte buffer")
        self.check(<Py_ssize_t>vt, 4)
        memcpy(&vlen, self.p + vt, 2)
        memcpy(&tlen, self.p + vt + 2, 2)
        if vlen < 4 or vlen & 1:
            raise ValueError("malformed vtable")
        self.check(<Py_ssize_t>vt, vlen)
        self.check(table, tlen)
        if 4 + 2 * slot + 2 > vlen:
            return -1
        memcpy(&off, self.p + vt + 4 + 2 * slot, 2)
        if off == 0:
            return -1
        self.check(table + off, size)
        return table + off

    cdef Py_ssize_t table(self, Py_ssize_t table, int slot) except -2:
        cdef Py_ssize_t pos = self.field(table, slot, 4)
        return -1 if pos < 0 else self.deref(pos)

    cdef int64_t i64(self, Py_ssize_t table, int slot, int64_t default) except? -0x7fffffffffffffff:
        cdef Py_ssize_t pos = self.field(table, slot, 8)
        cdef int64_t x
        if pos < 0:
            return default
        memcpy(&x, self.p + pos, 8)
        return x

    cdef int64_t i32(self, Py_ssize_t table, int slot, int64_t default) except? -0x7fffffffffffffff:
        cdef Py_ssize_t pos = self.field(table, slot, 4)
        cdef int32_t x
        if pos < 0:
            return default
        memcpy(&x, self.p + pos, 4)
        return x

    cdef int64_t u32f(self, Py_ssize_t table, int slot) except? -1:
        cdef Py_ssize_t pos = self.field(table, slot, 4)
        if pos < 0:
            return 0
        return self.u32(pos)

    cdef int64_t i8(self, Py_ssize_t table, int slot, int64_t default) except? -129:
        cdef Py_ssize_t pos = self.field(table, slot, 1)
        if pos < 0:
            return default
        return <int8_t>self.p[pos]

    cdef Py_ssize_t vector(self, Py_ssize_t table, int slot, Py_ssize_t elem, Py_ssize_t *count) except -2:
        """Start of a vector's elements (and its length), or -1 when absent."""
        cdef Py_ssize_t pos = self.field(table, slot, 4)
        cdef uint32_t n
        if pos < 0:
            count[0] = 0
            return -1
        pos = self.deref(pos)
        n = self.u32(pos)
        # Divide rather than multiply: n * elem must not overflow before the check.
        if n > <uint64_t>((self.n - pos - 4) // elem):
            raise ValueError(f"{n}-element vector at {pos} overruns the {self.n}-byte buffer")
        count[0] = n
        return pos + 4

    cdef str string_at(self, Py_ssize_t pos, Py_ssize_t limit, str what):
        """The string at pos, refused before decoding if longer than limit bytes."""
        cdef uint32_t n = self.u32(pos)
        if n > <uint64_t>limit:
            raise ValueError(f"{what} is {n} bytes long (limit {limit})")
        self.check(pos + 4, n)
        self.charge(<int64_t>n + STRING_COST)
        self.last_len = n
        return PyUnicode_DecodeUTF8(<const char *>self.p + pos + 4, n, "surrogateescape")

    cdef str string(self, Py_ssize_t table, int slot, Py_ssize_t limit, str what):
        cdef Py_ssize_t pos = self.field(table, slot, 4)
        if pos < 0:
            return ""
        return self.string_at(self.deref(pos), limit, what)


def decode_ztoc(const unsigned char[:] data, object make_entry, *, int64_t budget,
                Py_ssize_t max_entries, Py_ssize_t max_name, Py_ssize_t max_pax):
    """Parse a zTOC FlatBuffer, refusing it as soon as it decodes to more than it may.

    Returns ``(version, build_tool, compressed_size, uncompressed_size,
    entries, algorithm, max_span_id, span_digests, checkpoints)`` where each
    entry is ``make_entry(name, type, offset, size, linkname, mode, uid, gid,
    uname, gname, mod_time, devmajor, devminor, xattrs)``.

    Every entry, PAX record and string is charged against ``budget`` each time it is
    decoded (see ENTRY_COST), so sharing cannot multiply memory; no more than
    ``max_entries`` entries, no string of an entry longer than ``max_name`` bytes and
    no more than ``max_pax`` bytes of PAX records per entry are decoded.
    """
    cdef Reader r = Reader(data, data, budget)
    cdef Py_ssize_t root, toc, info, vec, count, i, me, xvec, xcount, j, x, cps
    cdef int64_t pax
    if data.shape[0] < 8:
        raise ValueError("buffer too small for a FlatBuffer")
    root = r.deref(0)
    version = r.string(root, 0, max_name, "version")
    build_tool = r.string(root, 1, max_name, "build tool")
    compressed_size = r.i64(root, 2, 0)
    uncompressed_size = r.i64(root, 3, 0)
    entries = []
    toc = r.table(root, 4)
    if toc >= 0:
        vec = r.vector(toc, 0, 4, &count)
        if count > max_entries:
            raise ValueError(f"it lists {count} entries (limit {max_entries})")
        for i in range(count):
            r.charge(ENTRY_COST)
            me = r.deref(vec + 4 * i)
            xattrs = {}
            xvec = r.vector(me, 13, 4, &xcount)
            pax = max_pax
            for j in range(xcount):
                r.charge(RECORD_COST)
                x = r.deref(xvec + 4 * j)
                r.last_len = 0
                key = r.string(x, 0, max_pax, "a PAX record key")
                pax -= r.last_len
                r.last_len = 0
                value = r.string(x, 1, max_pax, "a PAX record value")
                pax -= r.last_len
                if pax < 0:
                    raise ValueError(f"an entry has over {max_pax} bytes of PAX records")
                xattrs[key] = value
            entries.append(make_entry(
                r.string(me, 0, max_name, "an entry name"), r.string(me, 1, max_name, "a type"),
                r.i64(me, 2, 0), r.i64(me, 3, 0),
                r.string(me, 4, max_name, "a link name"), r.i64(me, 5, 0),
                r.u32f(me, 6), r.u32f(me, 7),
                r.string(me, 8, max_name, "a user name"), r.string(me, 9, max_name, "a group name"),
                r.string(me, 10, max_name, "a modification time"),
                r.i64(me, 11, 0), r.i64(me, 12, 0), xattrs,
            ))
    algorithm = 1
    max_span_id = 0
    digests = []
    checkpoints = b""
    info = r.table(root, 5)
    if info >= 0:
        algorithm = r.i8(info, 0, 1)
        max_span_id = r.i32(info, 1, 0)
        vec = r.vector(info, 2, 4, &count)
        for i in range(count):
            r.charge(4)
            digests.append(r.string_at(r.deref(vec + 4 * i), max_name, "a span digest"))
        cps = r.vector(info, 3, 1, &count)
        if cps >= 0:
            r.charge(count)
            checkpoints = PyBytes_FromStringAndSize(<const char *>r.p + cps, count)
    return (version, build_tool, compressed_size, uncompressed_size, entries,
            algorithm, max_span_id, digests, checkpoints)


def encode_tar_zinfo(int32_t version, int64_t span_size, int64_t size) -> bytes:
    """upstream's TarZinfo table (ztoc/compression/fbs/zinfo.fbs)."""
    cdef Builder b = Builder(64)
    b.start_object(3)
    b.add_i32(0, version)
    b.add_i64(1, span_size)
    b.add_i64(2, size)
    return b.finish(b.end_object())


def decode_tar_zinfo(const unsigned char[:] data):
    """Return ``(version, span_size, size)`` from a TarZinfo FlatBuffer."""
    cdef Reader r = Reader(data, data)
    cdef Py_ssize_t root
    if data.shape[0] < 8:
        raise ValueError("buffer too small for a FlatBuffer")
    root = r.deref(0)
    return (r.i32(root, 0, 0), r.i64(root, 1, 0), r.i64(root, 2, 0))
