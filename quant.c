// Weight-only quantization for the CPU: int8 and int4 weights with one float16 scale per group of columns.
//
// Layout (the same in memory and in saved files; quantization.py documents it and holds the reference in PyTorch):
// - Rows are padded with zeros to a multiple of 4 and columns to a chunk: 64 columns for int8, 128 for int4, so
//   that a row's chunk is 64 bytes, one cache line.
// - int8: q in [-127, 127], one byte each. int4: two a byte, in blocks of 32 columns: byte j of a block holds its
//   column j in the low nibble and column 16 + j in the high one, each as q + 8 with q in [-7, 7].
// - Tiles: the rows of each group of 4 are interleaved chunk by chunk, so that a pass over 4 rows reads memory in
//   one straight line: byte b of row r is at (r / 4) * 4B + (b / 64) * 256 + (r % 4) * 64 + b % 64, B a row's
//   padded bytes. Four short rows read side by side stream at 60 % of the bandwidth one long line does.
// - scales (padded rows, ceil(padded columns / group)) float16: the group's largest |w| / 127 (int8) or / 7
//   (int4), rounded to float16; q = round(w / scale), ties to even, as torch.round. Padding is q = 0, scale 0.
// A decode step multiplies a few rows of x by the weights as they stream from memory (`gemv_quant`); a prompt
// multiplies a piece of a weight matrix dequantized to bfloat16 or float32 (`dequantize`).
#include <math.h>
#include <stdlib.h>

#include "simd.h"

#define TILE 4  // weight rows interleaved
#define CHUNK 64  // bytes of one row in a tile's step
#define QMAX_X 4  // rows of x per pass
#define QPREFETCH 1024  // bytes ahead of the reading position to prefetch

static inline int64_t chunk_cols(int bits) { return bits == 8 ? 64 : 128; }
static inline int64_t padded_cols(int64_t cols, int bits) {
    return (cols + chunk_cols(bits) - 1) / chunk_cols(bits) * chunk_cols(bits);
}
static inline int64_t n_scales(int64_t cols, int bits, int64_t group) { return (padded_cols(cols, bits) + group - 1) / group; }
// Where byte b of row r lies, rows of `row_bytes` padded bytes.
static inline int64_t byte_at(int64_t r, int64_t b, int64_t row_bytes) {
    return r / TILE * TILE * row_bytes + b / CHUNK * (TILE * CHUNK) + r % TILE * CHUNK + b % CHUNK;
}

#if defined(__AVX512F__)
static inline vec load_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline __m512i load_u8(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline vec low_nibbles(__m512i v) { return _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15))); }
static inline vec high_nibbles(__m512i v) { return _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)); }
#else
static inline vec load_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline __m256i load_u8(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static inline vec low_nibbles(__m256i v) { return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15))); }
static inline vec high_nibbles(__m256i v) { return _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)); }
#endif

#if defined(__AVX512BF16__)
// With bfloat16 dot products (AVX512-BF16) a 64-byte int4 chunk becomes four vectors of 32 bfloat16 values without
// float arithmetic: interleaving a nibble u with the byte 0x43 gives the bits 0x43uu, bfloat16(128 + u), and
// 128 + u = 136 + q. Interleaving works within 128-bit lanes, so x is laid out once per call in the order that
// produces (x_order below), and each float lane of a product holds the sums of one block of 32 columns: one
// vector of four scales, each repeated four times, scales them all. The sum is sum_k (136 + q_k) x_k minus
// 136 sum_k x_k, with x rounded to bfloat16 for the product (a bfloat16 model's x already is) and float32 sums.
#define INT4_BF16 1
// Column of a chunk that word w of the chunk's x, laid out for the bfloat16 path, holds: vector w / 32 (low
// nibbles of bytes 0-7, of 8-15, high nibbles of 0-7, of 8-15), lane (block) w % 32 / 8, byte w % 8.
static inline int64_t x_order(int64_t w) { return w % 32 / 8 * 32 + w / 32 % 2 * 8 + w / 64 * 16 + w % 8; }
#else
#define INT4_BF16 0
#endif

// The float16 scale of row `row` (scales of `n_groups` a row) for column k, as a float.
static inline float scale_at(const uint16_t *S, int64_t row, int64_t n_groups, int64_t k, int64_t group) {
    return scalar_f16(S[row * n_groups + k / group]);
}

// Quantizes n_rows rows of cols values of the given kind at src into the tiles at q and the scales (layout above),
// padding to a whole tile. Returns how many values or scales are not finite (a NaN in the source, or a group too
// large for a float16 scale): 0 when all are.
int64_t quantize_rows(const uint8_t *src, int src_kind, int64_t n_rows, int64_t cols, int bits, int64_t group,
                      uint8_t *q, uint16_t *scales) {
    int64_t n_groups = n_scales(cols, bits, group), padded = padded_cols(cols, bits), bad = 0;
    int64_t row_bytes = padded * bits / 8, size = src_kind == F32 ? 4 : 2;
    int64_t tiles = (n_rows + TILE - 1) / TILE;
    const float qmax = bits == 8 ? 127.0f : 7.0f;
    memset(q, bits == 8 ? 0 : 0x88, tiles * TILE * row_bytes);
    memset(scales, 0, tiles * TILE * n_groups * sizeof(uint16_t));
#pragma omp parallel for reduction(+ : bad) schedule(static)
    for (int64_t r = 0; r < n_rows; r++) {
        const uint8_t *in = src + r * cols * size;
        for (int64_t g = 0; g * group < cols; g++) {
            int64_t k0 = g * group, k1 = k0 + group < cols ? k0 + group : cols;
            float amax = 0.0f;
            for (int64_t k = k0; k < k1; k++) {
                float v = read_kind(in, src_kind, k);
                bad += !isfinite(v);
                amax = fmaxf(amax, fabsf(v));
            }
            uint16_t h = _cvtss_sh(amax / qmax, 0);
            float s = scalar_f16(h);
            scales[r * n_groups + g] = h;
            bad += !isfinite(s);
            for (int64_t k = k0; k < k1; k++) {
                float v = s == 0.0f ? 0.0f : nearbyintf(read_kind(in, src_kind, k) / s);
                int qv = (int)fminf(fmaxf(v, -qmax), qmax);
                if (bits == 8) {
                    q[byte_at(r, k, row_bytes)] = (uint8_t)(int8_t)qv;
                } else {
                    uint8_t *byte = q + byte_at(r, k / 32 * 16 + k % 16, row_bytes);
                    *byte = k % 32 < 16 ? (uint8_t)((*byte & 0xF0) | (qv + 8)) : (uint8_t)((*byte & 0x0F) | ((qv + 8) << 4));
                }
            }
        }
    }
    return bad;
}

// The float values of one row's chunk c (64 or 128 columns), p its 64 bytes, into out, in column order.
static inline void chunk_values(const uint8_t *p, const uint16_t *S, int64_t row, int64_t n_groups, int64_t group,
                                int64_t c, int bits, float *out) {
    int64_t k0 = c * chunk_cols(bits);
    if (bits == 8) {
        for (int b = 0; b < CHUNK; b += WIDTH)
            store_f32(out + b, vmul(load_i8((const int8_t *)p + b), splat(scale_at(S, row, n_groups, k0 + b, group))));
        return;
    }
    for (int block = 0; block < 4; block++) {
        vec s = splat(scale_at(S, row, n_groups, k0 + 32 * block, group)), eight = splat(8.0f);
        for (int b = 0; b < 16; b += WIDTH) {
            store_f32(out + 32 * block + b, vmul(vsub(low_nibbles(load_u8(p + 16 * block + b)), eight), s));
            store_f32(out + 32 * block + 16 + b, vmul(vsub(high_nibbles(load_u8(p + 16 * block + b)), eight), s));
        }
    }
}

// dst (n_rows, cols) of dst_kind (bfloat16 or float32) = the dequantized weights, q * scale in float32, rounded
// once: a prompt multiplies a piece of a matrix at a time in the dtype the CPU is fastest at.
void dequantize(const uint8_t *q, const uint16_t *scales, void *dst, int64_t n_rows, int64_t cols, int bits,
                int64_t group, int dst_kind) {
    int64_t n_groups = n_scales(cols, bits, group), width = chunk_cols(bits), row_bytes = padded_cols(cols, bits) * bits / 8;
    int64_t size = dst_kind == F32 ? 4 : 2;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < n_rows; r++) {
        float values[128], out[128];
        for (int64_t c = 0; c * width < cols; c++) {
            chunk_values(q + byte_at(r, c * CHUNK, row_bytes), scales, r, n_groups, group, c, bits, values);
            int64_t n = cols - c * width < width ? cols - c * width : width;
            uint8_t *row = (uint8_t *)dst + (r * cols + c * width) * size;
            void *to = n == width ? (void *)row : (void *)out;
            for (int64_t b = 0; b < width; b += WIDTH) store_kind(to, dst_kind, b, load_f32(values + b));
            if (n < width) memcpy(row, out, n * size);
        }
    }
}

// x as one pass reads it: float32 rows padded with zeros to whole chunks (xp); for the bfloat16 int4 path also
// bfloat16 in the order above (xb) and each float lane's 136 sum x of a chunk (xoff, WIDTH floats a chunk).
typedef struct {
    float *xp, *xoff;
    uint16_t *xb;
    int64_t padded, chunks;
} Inputs;

static Inputs prepare_x(const void *x, int x_kind, int64_t n_x, int64_t cols, int bits) {
    Inputs in = {.padded = padded_cols(cols, bits)};
    in.chunks = in.padded / chunk_cols(bits);
    in.xp = calloc(n_x * in.padded, sizeof(float));
    for (int64_t m = 0; m < n_x; m++)
        for (int64_t k = 0; k < cols; k++) in.xp[m * in.padded + k] = read_kind(x, x_kind, m * cols + k);
#if INT4_BF16
    if (bits == 4) {
        in.xb = malloc(n_x * in.padded * sizeof(uint16_t));
        in.xoff = calloc(n_x * in.chunks * WIDTH, sizeof(float));
        for (int64_t m = 0; m < n_x; m++)
            for (int64_t c = 0; c < in.chunks; c++)
                for (int64_t w = 0; w < 128; w++) {
                    uint16_t b = scalar_to_bf16(in.xp[m * in.padded + c * 128 + x_order(w)]);
                    in.xb[m * in.padded + c * 128 + w] = b;
                    in.xoff[(m * in.chunks + c) * WIDTH + w % 32 / 2] += 136.0f * scalar_bf16(b);
                }
    }
#endif
    return in;
}

// Adds the products of weight row i of a tile (its chunk c at p) with the nm rows of x into total[m][i].
static inline __attribute__((always_inline)) void chunk_products(const uint8_t *p, const uint16_t *S, int64_t row,
                                                                 int64_t n_groups, int64_t group, int64_t c, int bits,
                                                                 const Inputs *in, const int nm, vec *total) {
    int64_t k0 = c * chunk_cols(bits);
    const float *xp = in->xp + k0;
    if (bits == 8) {
        for (int half = 0; half < 2; half++) {  // 32 columns, one group's or part of one
            vec acc[QMAX_X];
            for (int b = 32 * half; b < 32 * half + 32; b += WIDTH) {
                vec w = load_i8((const int8_t *)p + b);
                for (int m = 0; m < nm; m++)
                    acc[m] = b % 32 ? fmadd(w, load_f32(xp + m * in->padded + b), acc[m]) : vmul(w, load_f32(xp + m * in->padded + b));
            }
            vec s = splat(scale_at(S, row, n_groups, k0 + 32 * half, group));
            for (int m = 0; m < nm; m++) total[m] = fmadd(acc[m], s, total[m]);
        }
        return;
    }
#if INT4_BF16
    const __m512i v = _mm512_loadu_si512(p), nibble = _mm512_set1_epi8(15), high = _mm512_set1_epi8(0x43);
    const __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
    const __m512bh w0 = (__m512bh)_mm512_unpacklo_epi8(lo, high), w1 = (__m512bh)_mm512_unpackhi_epi8(lo, high);
    const __m512bh w2 = (__m512bh)_mm512_unpacklo_epi8(hi, high), w3 = (__m512bh)_mm512_unpackhi_epi8(hi, high);
    __m128i h;
    if (group == 32) h = _mm_loadl_epi64((const __m128i *)(S + row * n_groups + k0 / 32));
    else h = _mm_setr_epi16(S[row * n_groups + k0 / group], S[row * n_groups + (k0 + 32) / group],
                            S[row * n_groups + (k0 + 64) / group], S[row * n_groups + (k0 + 96) / group], 0, 0, 0, 0);
    const vec s = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                        _mm512_castps128_ps512(_mm_cvtph_ps(h)));
    for (int m = 0; m < nm; m++) {
        const uint16_t *xb = in->xb + m * in->padded + k0;
        vec acc = _mm512_dpbf16_ps(zero(), w0, (__m512bh)_mm512_loadu_si512(xb));
        acc = _mm512_dpbf16_ps(acc, w1, (__m512bh)_mm512_loadu_si512(xb + 32));
        acc = _mm512_dpbf16_ps(acc, w2, (__m512bh)_mm512_loadu_si512(xb + 64));
        acc = _mm512_dpbf16_ps(acc, w3, (__m512bh)_mm512_loadu_si512(xb + 96));
        total[m] = fmadd(vsub(acc, load_f32(in->xoff + (m * in->chunks + c) * WIDTH)), s, total[m]);
    }
#else
    const vec eight = splat(8.0f);
    for (int block = 0; block < 4; block++) {
        vec acc[QMAX_X];
        for (int b = 0; b < 16; b += WIDTH) {  // bytes b.. give columns b.. and 16 + b..
            __typeof__(load_u8(p)) u = load_u8(p + 16 * block + b);
            vec lo = vsub(low_nibbles(u), eight), hi = vsub(high_nibbles(u), eight);
            for (int m = 0; m < nm; m++) {
                const float *xm = xp + m * in->padded + 32 * block + b;
                acc[m] = fmadd(hi, load_f32(xm + 16), b ? fmadd(lo, load_f32(xm), acc[m]) : vmul(lo, load_f32(xm)));
            }
        }
        vec s = splat(scale_at(S, row, n_groups, k0 + 32 * block, group));
        for (int m = 0; m < nm; m++) total[m] = fmadd(acc[m], s, total[m]);
    }
#endif
}

// One pass over tile t of a weight (rows rows, its tiles at Q, scales at S) for nm rows of x, into y (nm, rows).
static inline __attribute__((always_inline)) void tile_pass(const uint8_t *Q, const uint16_t *S, void *y,
                                                            int y_kind, int64_t rows, int64_t n_groups, int64_t group, int bits,
                                                            const Inputs *in, int64_t t, const int nm) {
    vec total[TILE][QMAX_X];
    for (int i = 0; i < TILE; i++)
        for (int m = 0; m < nm; m++) total[i][m] = zero();
    const uint8_t *tile = Q + t * TILE * in->chunks * CHUNK;
    for (int64_t c = 0; c < in->chunks; c++) {
        const uint8_t *p = tile + c * TILE * CHUNK;
        for (int i = 0; i < TILE; i++) {
            _mm_prefetch((const char *)p + i * CHUNK + QPREFETCH, _MM_HINT_T0);
            chunk_products(p + i * CHUNK, S, t * TILE + i, n_groups, group, c, bits, in, nm, total[i]);
        }
    }
    for (int i = 0; i < TILE && t * TILE + i < rows; i++)
        for (int m = 0; m < nm; m++) write_kind(y, y_kind, m * rows + t * TILE + i, sum(total[i][m]));
}

// ys[j][m, r] = sum_k x[m, k] * w_j[r, k] for each of the n_w quantized weights (tiles Qs[j], scales Ss[j], rows[j]
// rows of cols columns, `bits` wide, scales per `group` columns) and each of the n_x rows of x; x and every ys[j]
// (n_x, rows[j]) are of the kinds x_kind and y_kind (float32 sums, one rounding). The threads share out the tiles
// of all the weights together, as gemv.c's gemv does.
void gemv_quant(int64_t n_w, const uint8_t *const *Qs, const uint16_t *const *Ss, void *const *ys,
                const int64_t *rows, const void *x, int64_t n_x, int64_t cols, int64_t group, int bits, int x_kind,
                int y_kind) {
    int64_t total = 0, n_groups = n_scales(cols, bits, group), size = y_kind == F32 ? 4 : 2;
    for (int64_t j = 0; j < n_w; j++) total += (rows[j] + TILE - 1) / TILE;
    Inputs in = prepare_x(x, x_kind, n_x, cols, bits);
#pragma omp parallel
    {
        int64_t begin, end;
        share(total, 1, &begin, &end);
        for (int64_t m0 = 0; m0 < n_x; m0 += QMAX_X) {
            int64_t nm = n_x - m0 < QMAX_X ? n_x - m0 : QMAX_X, offset = 0;
            Inputs at = in;  // x from row m0 on
            at.xp += m0 * in.padded;
            if (at.xb) at.xb += m0 * in.padded, at.xoff += m0 * in.chunks * WIDTH;
            for (int64_t j = 0; j < n_w; offset += (rows[j++] + TILE - 1) / TILE) {
                int64_t tiles = (rows[j] + TILE - 1) / TILE;
                int64_t t = begin > offset ? begin - offset : 0, t1 = end - offset < tiles ? end - offset : tiles;
                void *ym = (uint8_t *)ys[j] + m0 * rows[j] * size;
#define QPASS(NM)                                                                                                 \
    for (; t < t1; t++)                                                                                           \
        if (bits == 8) tile_pass(Qs[j], Ss[j], ym, y_kind, rows[j], n_groups, group, 8, &at, t, NM);             \
        else tile_pass(Qs[j], Ss[j], ym, y_kind, rows[j], n_groups, group, 4, &at, t, NM);
                switch (nm) {
                    case 1: QPASS(1) break;
                    case 2: QPASS(2) break;
                    case 3: QPASS(3) break;
                    default: QPASS(4)
                }
            }
        }
    }
    free(in.xp);
    free(in.xb);
    free(in.xoff);
}

// Whether int4 products round x to bfloat16 (the AVX512-BF16 path above): the tests' reference does the same.
int int4_rounds_x_to_bfloat16(void) { return INT4_BF16; }
