/* Compiled loops of the ingest, called through ctypes (ctr_ad/native.py): plain C, no Python API,
 * so that calls release the GIL and the block threads run them side by side.
 *
 * Strings arrive as Arrow string views, the layout polars keeps them in: 16 bytes a value, a
 * 32-bit length, then the value itself when it is 12 bytes or shorter, else its first 4 bytes, the
 * index of the data buffer holding it and its offset there. Bytes past a short value inside its
 * view are masked off before hashing or comparing, so nothing depends on how a writer padded them.
 */
#include <stdint.h>
#include <string.h>

/* The view masks and the 8-byte loads read little-endian words; elsewhere the build fails, which the
 * install treats as "no kernels" (the extension is optional) and ingest keeps its polars path. */
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "ctr_ad/_kernels.c assumes a little-endian machine"
#endif

static inline uint64_t mix(uint64_t z) {
    /* splitmix64's finalizer: every input bit reaches every output bit */
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static inline uint32_t view_len(const uint64_t *v) { return (uint32_t)(v[0] & 0xFFFFFFFFULL); }

/* The two words of an inline view with the bytes past the value cleared. */
static inline void inline_words(const uint64_t *v, uint64_t *w0, uint64_t *w1) {
    uint32_t n = view_len(v);
    if (n < 4) {
        *w0 = v[0] & ((1ULL << (32 + 8 * n)) - 1);
        *w1 = 0;
    } else if (n < 12) {
        *w0 = v[0];
        *w1 = v[1] & ((1ULL << (8 * (n - 4))) - 1);
    } else {
        *w0 = v[0];
        *w1 = v[1];
    }
}

static inline const uint8_t *long_bytes(const uint64_t *v, const uint8_t *const *buffers) {
    return buffers[(uint32_t)(v[1] & 0xFFFFFFFFULL)] + (uint32_t)(v[1] >> 32);
}

static inline uint64_t hash_view(const uint64_t *v, const uint8_t *const *buffers) {
    uint32_t n = view_len(v);
    if (n <= 12) {
        uint64_t w0, w1;
        inline_words(v, &w0, &w1);
        return mix(w0 * 0x9E3779B97F4A7C15ULL ^ mix(w1 + 0x9E3779B97F4A7C15ULL));
    }
    const uint8_t *p = long_bytes(v, buffers);
    uint64_t h = (uint64_t)n * 0x9E3779B97F4A7C15ULL;
    uint32_t k = 0;
    for (; k + 8 <= n; k += 8) {
        uint64_t w;
        memcpy(&w, p + k, 8);
        h = mix(h ^ w);
    }
    uint64_t tail = 0;
    memcpy(&tail, p + k, n - k);
    return mix(h ^ tail);
}

static inline int same_value(const uint64_t *a, const uint8_t *const *abuf, const uint64_t *b,
                             const uint8_t *const *bbuf) {
    uint32_t n = view_len(a);
    if (n != view_len(b)) return 0;
    if (n <= 12) {
        uint64_t a0, a1, b0, b1;
        inline_words(a, &a0, &a1);
        inline_words(b, &b0, &b1);
        return a0 == b0 && a1 == b1;
    }
    if (a[0] != b[0]) return 0; /* length and first 4 bytes */
    return memcmp(long_bytes(a, abuf), long_bytes(b, bbuf), n) == 0;
}

/* A table of n distinct strings: open addressing with linear probing, slot -> position (-1 empty).
 * n_slots is a power of two above n. */
void ctr_index_build(const uint64_t *views, int64_t n, const uint8_t *const *buffers, int32_t *slots,
                     int64_t n_slots) {
    uint64_t mask = (uint64_t)n_slots - 1;
    for (int64_t s = 0; s < n_slots; s++) slots[s] = -1;
    for (int64_t i = 0; i < n; i++) {
        uint64_t j = hash_view(views + 2 * i, buffers) & mask;
        while (slots[j] != -1) j = (j + 1) & mask;
        slots[j] = (int32_t)i;
    }
}

/* Codes of n values: first + position for a value in the table, missing for a null (validity bit
 * clear; validity may be NULL), unknown for any other value. */
void ctr_index_probe(const int32_t *slots, int64_t n_slots, const uint64_t *table_views,
                     const uint8_t *const *table_buffers, const uint64_t *views, const uint8_t *validity,
                     int64_t validity_offset, int64_t n, const uint8_t *const *buffers, int32_t *out,
                     int32_t first, int32_t missing, int32_t unknown) {
    uint64_t mask = (uint64_t)n_slots - 1;
    for (int64_t i = 0; i < n; i++) {
        if (validity != NULL) {
            int64_t bit = validity_offset + i;
            if (!((validity[bit >> 3] >> (bit & 7)) & 1)) {
                out[i] = missing;
                continue;
            }
        }
        const uint64_t *v = views + 2 * i;
        uint64_t j = hash_view(v, buffers) & mask;
        int32_t code = unknown;
        for (;;) {
            int32_t t = slots[j];
            if (t == -1) break;
            if (same_value(v, buffers, table_views + 2 * (int64_t)t, table_buffers)) {
                code = first + t;
                break;
            }
            j = (j + 1) & mask;
        }
        out[i] = code;
    }
}

/* Per line of a block: start offset, end offset (its newline or the block's end) and number of
 * separator-delimited fields. The caller sizes the outputs to the block's newlines + 1. */
void ctr_line_spans(const uint8_t *data, int64_t n, uint8_t separator, int64_t *starts, int64_t *ends,
                    int64_t *fields) {
    int64_t line = 0, start = 0;
    for (;;) {
        const uint8_t *nl = memchr(data + start, '\n', (size_t)(n - start));
        int64_t end = nl != NULL ? nl - data : n;
        int64_t count = 1;
        for (int64_t i = start; i < end; i++) count += data[i] == separator; /* vectorized by -O3 */
        starts[line] = start;
        ends[line] = end;
        fields[line] = count;
        line++;
        if (nl == NULL) break;
        start = end + 1;
    }
}

/* Dictionary-encodes n values: the k-th distinct non-null value first occurs at row first[k],
 * codes[i] is row i's k (-1 for a null), and counts[k] counts its occurrences among the rows whose
 * counted flag is set (all rows when counted is NULL), so one pass both encodes a block and counts
 * its training rows. slots (n_slots, a power of two above n) is scratch space. Returns the number
 * of distinct values. */
int64_t ctr_encode_values(const uint64_t *views, const uint8_t *validity, int64_t validity_offset, int64_t n,
                          const uint8_t *const *buffers, const uint8_t *counted, int32_t *slots, int64_t n_slots,
                          int32_t *first, int64_t *counts, int32_t *codes) {
    uint64_t mask = (uint64_t)n_slots - 1;
    int64_t distinct = 0;
    for (int64_t s = 0; s < n_slots; s++) slots[s] = -1;
    for (int64_t i = 0; i < n; i++) {
        if (validity != NULL) {
            int64_t bit = validity_offset + i;
            if (!((validity[bit >> 3] >> (bit & 7)) & 1)) {
                codes[i] = -1;
                continue;
            }
        }
        const uint64_t *v = views + 2 * i;
        uint64_t j = hash_view(v, buffers) & mask;
        int32_t k;
        for (;;) {
            k = slots[j];
            if (k == -1) {
                k = (int32_t)distinct++;
                slots[j] = k;
                first[k] = (int32_t)i;
                counts[k] = 0;
                break;
            }
            if (same_value(v, buffers, views + 2 * (int64_t)first[k], buffers)) break;
            j = (j + 1) & mask;
        }
        codes[i] = k;
        if (counted == NULL || counted[i]) counts[k]++;
    }
    return distinct;
}

/* The view of the len bytes at f; limit is the end of the block (no load reads past it). */
static inline void put_view(uint64_t *v, const uint8_t *f, int64_t len, int64_t offset, const uint8_t *limit) {
    uint64_t w0 = (uint64_t)(uint32_t)len, w1;
    if (len > 12) {
        uint32_t prefix;
        memcpy(&prefix, f, 4);
        w0 |= (uint64_t)prefix << 32;
        w1 = (uint64_t)(uint32_t)offset << 32; /* data buffer 0 */
    } else if (f + 12 <= limit) { /* two overlapping loads, masked to the value */
        uint64_t a, b;
        memcpy(&a, f, 8);
        memcpy(&b, f + 4, 8);
        if (len < 4) {
            w0 |= (a & ((1ULL << (8 * len)) - 1)) << 32;
            w1 = 0;
        } else {
            w0 |= a << 32;
            w1 = len == 12 ? b : b & ((1ULL << (8 * (len - 4))) - 1);
        }
    } else { /* the last bytes of the block */
        uint8_t bytes[12] = {0};
        memcpy(bytes, f, (size_t)len);
        uint32_t first4;
        memcpy(&first4, bytes, 4);
        memcpy(&w1, bytes + 4, 8);
        w0 |= (uint64_t)first4 << 32;
    }
    v[0] = w0;
    v[1] = w1;
}

/* Splits a block of ASCII lines into n_cols string-view columns, as polars' CSV reader does with
 * every field read as text, no quoting and ragged lines allowed: an empty field is null, fields past
 * n_cols are ignored, a short line's missing fields are null. Column c's views go to
 * views[c * n_lines * 2 ...], its validity bits to validity[c * validity_stride ...] (zeroed by the
 * caller), its null count to nulls[c] and the bytes of its values over 12 bytes to long_bytes[c];
 * each line's number of fields goes to fields. Long values point into the block itself (data
 * buffer 0) until ctr_compact_views moves them. Returns the number of lines, or -1 when the block
 * holds a byte over 127 or an empty line: the caller then keeps the general path. */
int64_t ctr_split_fields(const uint8_t *data, int64_t n, uint8_t separator, int64_t n_cols, int64_t n_lines,
                         uint64_t *views, uint8_t *validity, int64_t validity_stride, int64_t *nulls,
                         int64_t *long_bytes, int64_t *fields) {
    uint8_t high = 0;
    for (int64_t i = 0; i < n; i++) high |= data[i]; /* vectorized: any byte over 127? */
    if (high & 0x80) return -1;
    const uint8_t *limit = data + n;
    for (int64_t c = 0; c < n_cols; c++) nulls[c] = long_bytes[c] = 0;
    int64_t line = 0;
    const uint8_t *p = data;
    for (;;) {
        if (line >= n_lines) return -1; /* more lines than the caller counted: cannot happen */
        const uint8_t *nl = memchr(p, '\n', (size_t)(limit - p));
        const uint8_t *e = nl != NULL ? nl : limit;
        if (e == p) return -1;
        int64_t col = 0;
        for (;;) {
            const uint8_t *f = p;
            while (p < e && *p != separator) p++;
            if (col < n_cols) {
                uint64_t *v = views + 2 * (col * n_lines + line);
                int64_t len = p - f;
                if (len == 0) {
                    v[0] = 0;
                    v[1] = 0;
                    nulls[col]++;
                } else {
                    put_view(v, f, len, f - data, limit);
                    if (len > 12) long_bytes[col] += len;
                    validity[col * validity_stride + (line >> 3)] |= (uint8_t)(1u << (line & 7));
                }
            }
            col++;
            if (p >= e) break;
            p++; /* the separator */
        }
        fields[line] = col;
        for (; col < n_cols; col++) { /* a short line: its missing fields are null */
            uint64_t *v = views + 2 * (col * n_lines + line);
            v[0] = 0;
            v[1] = 0;
            nulls[col]++;
        }
        line++;
        if (nl == NULL) break;
        p = e + 1;
    }
    return line;
}

/* Copies the long values of n views, which point into data, to out (their total size) and points
 * the views there: a column then holds its own values, not the whole block (which an Arrow writer
 * would otherwise copy once per column). */
void ctr_compact_views(uint64_t *views, int64_t n, const uint8_t *data, uint8_t *out) {
    uint64_t at = 0;
    for (int64_t i = 0; i < n; i++) {
        uint64_t *v = views + 2 * i;
        uint32_t len = (uint32_t)(v[0] & 0xFFFFFFFFULL);
        if (len <= 12) continue;
        memcpy(out + at, data + (uint32_t)(v[1] >> 32), len);
        v[1] = at << 32; /* data buffer 0 of the column */
        at += len;
    }
}
