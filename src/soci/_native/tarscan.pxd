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
    cdef long long pax_size       # size from the pending PAX header, or -1
    cdef long long archive_end
    cdef unsigned char *records   # packed records, drained by take_records()
    cdef Py_ssize_t records_len
    cdef Py_ssize_t records_cap
    cdef char error[200]
    cdef long long error_offset

    cdef int feed(self, const unsigned char *data, Py_ssize_t n) noexcept nogil
    cdef int fail(self, const char *what, long long offset) noexcept nogil
    cdef int emit(self, long long data_offset, const unsigned char *body, long long body_len) noexcept nogil
    cdef int on_header(self) noexcept nogil
    cdef int end_body(self) noexcept nogil
