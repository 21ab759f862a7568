# The tar stream scanner: finds every header in a tar stream fed in arbitrary
# pieces, without looking at file contents, and without the GIL.

cdef class TarScanner:
    cdef int state
    cdef long long pos            # stream offset of the next byte fed
    cdef long long skip           # bytes of file data and padding still to pass
    cdef unsigned char header[512]
    cdef int header_fill
    cdef long long header_offset  # stream offset of the header being collected
    cdef unsigned char *body      # body of a PAX or GNU long-name record
    cdef long long body_len
    cdef long long body_fill
    # What pending extended headers say about the next entry (Go keeps the last
    # PAX header and the last GNU long name, and forgets them at each entry).
    cdef int pax_size_state       # PAX_NONE, PAX_VALUE or PAX_INVALID
    cdef long long pax_size
    cdef int pax_slash            # PAX path ends with '/': 1, 0, or -1 (no path)
    cdef int long_slash           # GNU long name ends with '/': 1, 0, or -1 (none)
    cdef long long archive_end
    cdef unsigned char *records   # packed records, drained by take_records()
    cdef Py_ssize_t records_len
    cdef Py_ssize_t records_cap
    cdef char error[200]
    cdef long long error_offset
    cdef bint error_names_entry   # the error is about the entry in header[]

    cdef int feed(self, const unsigned char *data, Py_ssize_t n) noexcept nogil
    cdef int fail(self, const char *what, long long offset) noexcept nogil
    cdef int fail_entry(self, const char *what, long long offset) noexcept nogil
    cdef void clear_pending(self) noexcept nogil
    cdef int emit(self, long long data_offset, const unsigned char *body, long long body_len) noexcept nogil
    cdef int on_header(self) noexcept nogil
    cdef int end_body(self) noexcept nogil
