# Declarations of the parts of the system zlib that the native core calls.

cdef extern from "zlib.h" nogil:
    ctypedef unsigned char Bytef
    ctypedef unsigned int uInt
    ctypedef unsigned long uLong

    ctypedef struct z_stream:
        const Bytef *next_in
        uInt avail_in
        uLong total_in
        Bytef *next_out
        uInt avail_out
        uLong total_out
        const char *msg
        void *zalloc
        void *zfree
        void *opaque
        int data_type

    ctypedef z_stream *z_streamp

    int Z_OK
    int Z_STREAM_END
    int Z_NEED_DICT
    int Z_STREAM_ERROR
    int Z_DATA_ERROR
    int Z_MEM_ERROR
    int Z_BUF_ERROR
    int Z_NO_FLUSH
    int Z_BLOCK

    const char *zlibVersion()
    int inflateInit2(z_streamp strm, int window_bits)
    int inflate(z_streamp strm, int flush)
    int inflateEnd(z_streamp strm)
    int inflateReset2(z_streamp strm, int window_bits)
    uLong crc32_z(uLong crc, const unsigned char *buf, size_t len)
    int inflatePrime(z_streamp strm, int bits, int value)
    int inflateSetDictionary(z_streamp strm, const Bytef *dictionary, uInt length)
