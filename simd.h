// SIMD helpers shared by gemv.c and quant.c: one vector type of WIDTH floats, AVX-512 where the CPU has it,
// else AVX2 with F16C and FMA; loads and stores of float16, bfloat16 and float32; and how threads share work.
#pragma once
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>
#include <omp.h>

// The sum of 8 float lanes, in a fixed order.
static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

#if defined(__AVX512F__)
#define WIDTH 16
typedef __m512 vec;
static inline vec load_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline vec load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline vec load_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline vec fmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec zero(void) { return _mm512_setzero_ps(); }
static inline float sum(vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define WIDTH 8
typedef __m256 vec;
static inline vec load_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline vec load_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline vec load_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline vec fmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec zero(void) { return _mm256_setzero_ps(); }
static inline float sum(vec v) { return sum8(v); }
#else
#error "needs AVX2 with F16C and FMA, or AVX-512"
#endif

static inline float scalar_f16(uint16_t h) { return _cvtsh_ss(h); }
static inline float scalar_bf16(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
// float -> bfloat16 bits, rounded to nearest, ties to even (as torch rounds finite values)
static inline uint16_t scalar_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

#if defined(__AVX512F__)
static inline vec splat(float f) { return _mm512_set1_ps(f); }
static inline vec vmin(vec a, vec b) { return _mm512_min_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
static inline vec vround(vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec pow2i(vec i) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(i), _mm512_set1_epi32(127)), 23));
}
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
static inline void store_f32(float *p, vec v) { _mm512_storeu_ps(p, v); }
static inline void store_f16(uint16_t *p, vec v) {
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
static inline void store_bf16(uint16_t *p, vec v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(u));
}
#else
static inline vec splat(float f) { return _mm256_set1_ps(f); }
static inline vec vmin(vec a, vec b) { return _mm256_min_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
static inline vec vround(vec a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec pow2i(vec i) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(i), _mm256_set1_epi32(127)), 23));
}
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
static inline void store_f32(float *p, vec v) { _mm256_storeu_ps(p, v); }
static inline void store_f16(uint16_t *p, vec v) {
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
static inline void store_bf16(uint16_t *p, vec v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)));
}
#endif

enum { F32 = 0, F16 = 1, BF16 = 2 };  // dtypes, numbered as kernels.py's KINDS

// Value i of an array of the given kind at p, as a float.
static inline float read_kind(const void *p, int kind, int64_t i) {
    const uint8_t *b = p;  // memcpy: a mapped file's tensor need not be aligned
    if (kind == F32) { float f; memcpy(&f, b + 4 * i, 4); return f; }
    uint16_t h;
    memcpy(&h, b + 2 * i, 2);
    return kind == F16 ? scalar_f16(h) : scalar_bf16(h);
}

// Stores f as value i of an array of the given kind at p, rounded to nearest, ties to even.
static inline void write_kind(void *p, int kind, int64_t i, float f) {
    if (kind == F32) ((float *)p)[i] = f;
    else if (kind == F16) ((uint16_t *)p)[i] = _cvtss_sh(f, 0);
    else ((uint16_t *)p)[i] = scalar_to_bf16(f);
}

// WIDTH values i.. of an array of the given kind at p, as floats; and the converse store, rounded as write_kind.
static inline vec load_kind(const void *p, int kind, int64_t i) {
    return kind == F32 ? load_f32((const float *)p + i)
           : kind == F16 ? load_f16((const uint16_t *)p + i) : load_bf16((const uint16_t *)p + i);
}
static inline void store_kind(void *p, int kind, int64_t i, vec v) {
    if (kind == F32) store_f32((float *)p + i, v);
    else if (kind == F16) store_f16((uint16_t *)p + i, v);
    else store_bf16((uint16_t *)p + i, v);
}

// x as float32: x itself, or a copy of its n values (the caller frees it when it is not x).
static inline const float *widen(const void *x, int kind, int64_t n) {
    if (kind == F32) return (const float *)x;
    float *f = malloc(n * sizeof(float));
    for (int64_t i = 0; i < n; i++) f[i] = read_kind(x, kind, i);
    return f;
}

// exp(t) for t in about [-87, 87]: 2^(t log2 e) split into 2^i * 2^f, f in [-0.5, 0.5], and a degree-6 Taylor
// polynomial for 2^f (relative error ~1e-7, well below what a half-precision result keeps).
static inline vec exp_approx(vec t) {
    t = vmin(vmax(t, splat(-87.0f)), splat(87.0f));
    vec y = vmul(t, splat(1.44269504088896341f));  // log2(e)
    vec i = vround(y), f = vsub(y, i);               // y = i + f, |f| <= 0.5
    vec p = splat(1.535336188319500e-4f);            // (ln 2)^k / k!, k = 6 .. 0
    p = fmadd(p, f, splat(1.339887440266574e-3f));
    p = fmadd(p, f, splat(9.618437357674640e-3f));
    p = fmadd(p, f, splat(5.550332471162809e-2f));
    p = fmadd(p, f, splat(2.402264791363012e-1f));
    p = fmadd(p, f, splat(6.931472028550421e-1f));
    p = fmadd(p, f, splat(1.0f));
    return vmul(p, pow2i(i));
}

#define TILE 4  // rows of a quantized weight interleaved (quant.c's layout)
int64_t quantize_piece(const uint8_t *src, int src_kind, int64_t first, int64_t n_rows, int64_t cols, int bits,
                       int64_t group, uint8_t *q, uint16_t *scales);
// The products and the activation that decode.c's decoder layer calls (gemv.c, quant.c).
void gemv(int64_t n_w, const void *const *Ws, void *const *ys, const int64_t *rows, const void *x_in, int64_t n_x,
          int64_t cols, int w_kind, int x_kind, int y_kind);
void gemv_quant(int64_t n_w, const uint8_t *const *Qs, const uint16_t *const *Ss, void *const *ys,
                const int64_t *rows, const void *x, int64_t n_x, int64_t cols, int64_t group, int bits, int x_kind,
                int y_kind);
void gelu_tanh_mul(const void *x, int64_t x_stride, const void *up, int64_t up_stride, void *out, int64_t rows,
                   int64_t cols, int kind);

// The slice [*begin, *end) of [0, n) that this OpenMP thread takes, in multiples of `align`.
static inline void share(int64_t n, int64_t align, int64_t *begin, int64_t *end) {
    int threads = omp_get_num_threads(), t = omp_get_thread_num();
    int64_t step = ((n + threads - 1) / threads + align - 1) / align * align;
    *begin = t * step < n ? t * step : n;
    *end = *begin + step < n ? *begin + step : n;
}

