// Weight-only quantization for the CPU: int8 and int4 weights with one float16 scale per group of columns.
//
// Layout (the same in memory and in saved files; quantize.py documents it and holds the reference in PyTorch):
// - int8: q (rows, cols) int8, value = q * scale, q in [-127, 127].
// - int4: two weights a byte, in blocks of 32 columns: byte j of block b holds column 32b + j in its low nibble and
//   column 32b + 16 + j in its high nibble, each stored as q + 8 with q in [-7, 7]; a row is ceil(cols / 32) * 16
//   bytes, the columns past the end stored as 8 (zero).
// - scales (rows, ceil(cols / group)) float16: the group's largest |w| / 127 (int8) or / 7 (int4), rounded to
//   float16; q = round(w / scale), ties to even, as torch.round.
// A decode step multiplies a few rows of x by the weights as they stream from memory, widening each weight to
// float32 in registers (`gemv_quant`); a prompt multiplies a weight matrix dequantized to bfloat16 (`dequantize`).
#include <math.h>
#include <stdlib.h>

#include "simd.h"

#define QROWS 4  // weight rows per pass
#define QMAX_X 4  // rows of x per pass
// Software prefetch, as in gemv.c: short rows (up to QSHORT_ROW bytes) are fetched one block of rows ahead, long
// ones QPREFETCH bytes ahead.
#define QPREFETCH 512
#define QSHORT_ROW 4608

enum { F32 = 0, F16 = 1, BF16 = 2 };

#if defined(__AVX512F__)
typedef __m512i ivec;
static inline ivec load_u8(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline vec load_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline vec low_nibbles(ivec v) { return _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15))); }
static inline vec high_nibbles(ivec v) { return _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)); }
#else
typedef __m256i ivec;
static inline ivec load_u8(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static inline vec load_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline vec low_nibbles(ivec v) { return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15))); }
static inline vec high_nibbles(ivec v) { return _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)); }
#endif

#if defined(__AVX512BF16__)
// With bfloat16 dot products (AVX512-BF16), an int4 block of 32 columns becomes one vector of 32 bfloat16 values
// without float arithmetic: bfloat16(128 + u) is the bits 0x4300 | u for u < 128, and 128 + u = 136 + q. So the
// group's sum is sum_k (136 + q_k) x_k - 136 sum_k x_k, with x rounded to bfloat16 for the product (a bfloat16
// model's x already is) and float32 sums.
#define INT4_BIAS 136.0f
static inline __m512bh nibbles_bf16(const uint8_t *p) {
    __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));  // 16 bytes -> 16 words
    __m256i lo = _mm256_and_si256(v, _mm256_set1_epi16(15)), hi = _mm256_srli_epi16(v, 4);
    __m512i u = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);  // columns 0..15, then 16..31
    return (__m512bh)_mm512_or_si512(u, _mm512_set1_epi16(0x4300));
}
#else
#define INT4_BIAS 8.0f  // the float path multiplies the stored q + 8 and takes 8 sum_k x_k off
#endif

static inline int64_t row_bytes(int64_t cols, int bits) { return bits == 8 ? cols : (cols + 31) / 32 * 16; }

// The integer weight at column k of a row (q, not q + 8).
static inline int weight_at(const uint8_t *row, int64_t k, int bits) {
    if (bits == 8) return (int8_t)row[k];
    uint8_t byte = row[k / 32 * 16 + k % 16];
    return (k % 32 < 16 ? byte & 15 : byte >> 4) - 8;
}

static inline float read_value(const uint8_t *p, int kind, int64_t i) {
    if (kind == F32) { float f; memcpy(&f, p + 4 * i, 4); return f; }
    uint16_t h;
    memcpy(&h, p + 2 * i, 2);
    return kind == F16 ? scalar_f16(h) : scalar_bf16(h);
}

// Quantizes n_rows rows of cols values of the given kind at src into q and scales (layout above). Returns how many
// values or scales are not finite (a NaN in the source, or a group too large for a float16 scale): 0 when all are.
int64_t quantize_rows(const uint8_t *src, int src_kind, int64_t n_rows, int64_t cols, int bits, int64_t group,
                      uint8_t *q, uint16_t *scales) {
    int64_t n_groups = (cols + group - 1) / group, stride = row_bytes(cols, bits), bad = 0;
    int64_t size = src_kind == F32 ? 4 : 2;
    const float qmax = bits == 8 ? 127.0f : 7.0f;
#pragma omp parallel for reduction(+ : bad) schedule(static)
    for (int64_t r = 0; r < n_rows; r++) {
        const uint8_t *in = src + r * cols * size;
        uint8_t *out = q + r * stride;
        if (bits == 4) memset(out, 0x88, stride);
        for (int64_t g = 0; g < n_groups; g++) {
            int64_t k0 = g * group, k1 = k0 + group < cols ? k0 + group : cols;
            float amax = 0.0f;
            for (int64_t k = k0; k < k1; k++) {
                float v = read_value(in, src_kind, k);
                bad += !isfinite(v);
                amax = fmaxf(amax, fabsf(v));
            }
            uint16_t h = _cvtss_sh(amax / qmax, 0);
            float s = scalar_f16(h);
            scales[r * n_groups + g] = h;
            bad += !isfinite(s);
            for (int64_t k = k0; k < k1; k++) {
                float v = s == 0.0f ? 0.0f : nearbyintf(read_value(in, src_kind, k) / s);
                int qv = (int)fminf(fmaxf(v, -qmax), qmax);
                if (bits == 8) {
                    out[k] = (uint8_t)(int8_t)qv;
                } else {
                    uint8_t *byte = out + k / 32 * 16 + k % 16;
                    *byte = k % 32 < 16 ? (uint8_t)((*byte & 0xF0) | (qv + 8)) : (uint8_t)((*byte & 0x0F) | ((qv + 8) << 4));
                }
            }
        }
    }
    return bad;
}

// dst (n_rows, cols) bfloat16 = the dequantized weights (q * scale in float32, rounded to bfloat16 once): a prompt
// multiplies a matrix at a time in bfloat16, which CPUs do several times faster than anything else.
void dequantize(const uint8_t *q, const uint16_t *scales, uint16_t *dst, int64_t n_rows, int64_t cols, int bits,
                int64_t group) {
    int64_t n_groups = (cols + group - 1) / group, stride = row_bytes(cols, bits);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < n_rows; r++) {
        for (int64_t k = 0; k < cols; k++) {
            float s = scalar_f16(scales[r * n_groups + k / group]);
            dst[r * cols + k] = scalar_to_bf16((float)weight_at(q + r * stride, k, bits) * s);
        }
    }
}

// Adds the products of one weight vector of row i with the nm rows of x at column k into acc[m][i], scaled by scale
// (1 when the group's sum is scaled later).
#define FOR_EACH_X(EXPR) for (int m = 0; m < nm; m++) acc[m][i] = (EXPR)

// One pass over rows [r, r + nr) of one weight for the nm rows of x at x (nm, nr small constants once inlined).
// For one row of x (a batch of one) the integers are multiplied by x as they are within a group, and the group's
// sum is scaled once: y = sum_g s_g (sum_k q_k x_k), at most two float operations per weight vector. For several
// rows of x, which would need a group sum per row in registers, each weight vector is scaled as it comes and shared
// by the rows. int4 multiplies the stored q + 8 (or bfloat16(136 + q), above) and takes s_g * INT4_BIAS * xsum_g
// off, with the sums of x per group, xsum, computed once per call. So the integers stream at memory speed.
static inline __attribute__((always_inline)) void pass_quant(const uint8_t *Q, const uint16_t *S, const float *x,
                                                             const uint16_t *xb, const float *xsum, float *y,
                                                             int64_t rows, int64_t cols, int64_t group, int bits,
                                                             int64_t r, const int nr, const int nm) {
    int64_t stride = row_bytes(cols, bits), n_groups = (cols + group - 1) / group;
    int64_t step = bits == 8 ? WIDTH : 32, body = cols - cols % step;
    int64_t ahead = stride <= QSHORT_ROW ? QROWS * stride : QPREFETCH;
    const int grouped = nm == 1;
    vec total[QMAX_X][QROWS], acc[QMAX_X][QROWS];
    float offset[QMAX_X][QROWS];
    for (int m = 0; m < nm; m++)
        for (int i = 0; i < nr; i++) total[m][i] = zero(), offset[m][i] = 0.0f;
    for (int64_t g0 = 0; g0 < body; g0 += group) {
        int64_t g1 = g0 + group < body ? g0 + group : body;
        float s[QROWS];
        for (int i = 0; i < nr; i++) {
            s[i] = scalar_f16(S[(r + i) * n_groups + g0 / group]);
            for (int m = 0; m < nm; m++) {
                acc[m][i] = grouped ? zero() : total[m][i];
                if (bits == 4) offset[m][i] += s[i] * xsum[m * n_groups + g0 / group];
            }
        }
        for (int64_t k = g0; k < g1; k += step) {
            for (int i = 0; i < nr; i++) {
                const uint8_t *p = Q + (r + i) * stride + (bits == 8 ? k : k / 2);
                _mm_prefetch((const char *)p + ahead, _MM_HINT_T0);
                if (bits == 8) {
                    vec w = grouped ? load_i8((const int8_t *)p) : vmul(load_i8((const int8_t *)p), splat(s[i]));
                    FOR_EACH_X(fmadd(w, load_f32(x + m * cols + k), acc[m][i]));
                    continue;
                }
#if defined(__AVX512BF16__)
                __m512bh w = nibbles_bf16(p);
                if (grouped) FOR_EACH_X(_mm512_dpbf16_ps(acc[m][i], w, (__m512bh)_mm512_loadu_si512(xb + m * cols + k)));
                else FOR_EACH_X(fmadd(_mm512_dpbf16_ps(zero(), w, (__m512bh)_mm512_loadu_si512(xb + m * cols + k)),
                                      splat(s[i]), acc[m][i]));
#else
                for (int b = 0; b < 16; b += WIDTH) {  // bytes b.. give columns k+b.. and k+16+b..
                    ivec v = load_u8(p + b);
                    vec lo = low_nibbles(v), hi = high_nibbles(v);
                    if (!grouped) lo = vmul(lo, splat(s[i])), hi = vmul(hi, splat(s[i]));
                    FOR_EACH_X(fmadd(hi, load_f32(x + m * cols + k + 16 + b),
                                     fmadd(lo, load_f32(x + m * cols + k + b), acc[m][i])));
                }
#endif
            }
        }
        for (int i = 0; i < nr; i++)
            for (int m = 0; m < nm; m++) total[m][i] = grouped ? fmadd(acc[m][i], splat(s[i]), total[m][i]) : acc[m][i];
    }
    for (int m = 0; m < nm; m++)
        for (int i = 0; i < nr; i++) {
            float t = sum(total[m][i]) - INT4_BIAS * offset[m][i];
            for (int64_t k = body; k < cols; k++)
                t += (float)weight_at(Q + (r + i) * stride, k, bits) * scalar_f16(S[(r + i) * n_groups + k / group]) *
                     x[m * cols + k];
            y[m * rows + r + i] = t;
        }
}

// ys[j][m, r] = sum_k x[m, k] * w_j[r, k] for each of the n_w quantized weights (Qs[j], scales Ss[j], rows[j] rows
// of cols columns, `bits` wide, scales per `group` columns) and each of the n_x rows of x (float32); ys[j] is
// (n_x, rows[j]) float32. The threads share out the rows of all the weights together, as gemv.c's gemv does.
void gemv_quant(int64_t n_w, const uint8_t *const *Qs, const uint16_t *const *Ss, float *const *ys,
                const int64_t *rows, const float *x, int64_t n_x, int64_t cols, int64_t group, int bits) {
    int64_t total = 0, n_groups = (cols + group - 1) / group, body = cols - cols % (bits == 8 ? WIDTH : 32);
    for (int64_t j = 0; j < n_w; j++) total += rows[j];
    uint16_t *xb = malloc(sizeof(uint16_t) * n_x * cols);  // x in bfloat16, for the int4 dot products
    float *xsum = malloc(sizeof(float) * n_x * n_groups);  // each x row's sum over each group, for int4's offset
    for (int64_t m = 0; m < n_x; m++)
        for (int64_t g = 0; g < n_groups; g++) {
            float t = 0.0f;
            for (int64_t k = g * group; k < (g + 1) * group && k < cols; k++) {
                xb[m * cols + k] = scalar_to_bf16(x[m * cols + k]);
                if (k < body) t += INT4_BIAS == 8.0f ? x[m * cols + k] : scalar_bf16(xb[m * cols + k]);
            }
            xsum[m * n_groups + g] = t;
        }
#pragma omp parallel
    {
        int64_t begin, end;
        share(total, QROWS, &begin, &end);
        for (int64_t m0 = 0; m0 < n_x; m0 += QMAX_X) {
            int64_t nm = n_x - m0 < QMAX_X ? n_x - m0 : QMAX_X, offset = 0;
            for (int64_t j = 0; j < n_w; offset += rows[j++]) {
                int64_t r = begin > offset ? begin - offset : 0, r1 = end - offset < rows[j] ? end - offset : rows[j];
                const float *xm = x + m0 * cols, *xs = xsum + m0 * n_groups;
                const uint16_t *xbm = xb + m0 * cols;
                float *ym = ys[j] + m0 * rows[j];
#define QPASS(NM)                                                                                                 \
    for (; r + QROWS <= r1; r += QROWS)                                                                           \
        if (bits == 8) pass_quant(Qs[j], Ss[j], xm, xbm, xs, ym, rows[j], cols, group, 8, r, QROWS, NM);        \
        else pass_quant(Qs[j], Ss[j], xm, xbm, xs, ym, rows[j], cols, group, 4, r, QROWS, NM);
                switch (nm) {
                    case 1: QPASS(1) break;
                    case 2: QPASS(2) break;
                    case 3: QPASS(3) break;
                    default: QPASS(4)
                }
                for (; r < r1; r++)
                    pass_quant(Qs[j], Ss[j], xm, xbm, xs, ym, rows[j], cols, group, bits, r, 1, (int)nm);
            }
        }
    }
    free(xb);
    free(xsum);
}

// Whether int4 products round x to bfloat16 (the AVX512-BF16 path above): the tests' reference does the same.
int int4_rounds_x_to_bfloat16(void) { return INT4_BIAS != 8.0f; }
