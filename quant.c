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
// A decode step multiplies a few rows of x, rounded to int8 or int16 in blocks of 32 columns, by the weights in
// integers as they stream from memory (`gemv_quant`); a prompt multiplies a piece of a weight matrix dequantized to
// bfloat16 or float32 (`dequantize`), which also gives a decode step its tokens' embeddings.
#include <math.h>
#include <stdlib.h>

#include "simd.h"

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

// The float16 scale of row `row` (scales of `n_groups` a row) for column k, as a float.
static inline float scale_at(const uint16_t *S, int64_t row, int64_t n_groups, int64_t k, int64_t group) {
    return scalar_f16(S[row * n_groups + k / group]);
}

// Blocks of 32 values, 8 lanes at a time on every build (as x's blocks below): quantizing runs as fast as the
// weights can be read, and 8 lanes keep up with that.
static inline __m256 load8(const uint8_t *p, int kind, int64_t i) {
    if (kind == F32) return _mm256_loadu_ps((const float *)p + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    return kind == F16 ? _mm256_cvtph_ps(h) : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
// The 32 values k.. of a row of the given kind at p into v, zeros past its n < 32 last ones.
static inline void load_block(const uint8_t *p, int kind, int64_t k, int64_t n, __m256 v[4]) {
    if (n >= 32) {
        for (int i = 0; i < 4; i++) v[i] = load8(p, kind, k + 8 * i);
        return;
    }
    float tail[32] = {0};
    for (int64_t j = 0; j < n; j++) tail[j] = read_kind(p, kind, k + j);
    for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(tail + 8 * i);
}
// The largest of 8 lanes (none NaN).
static inline float max8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
// round(v / d) clamped to [-levels, levels], as int32: a true division, as the references (PyTorch's and the scalar
// code before) divide, ties to even; a NaN becomes -levels.
static inline void round_block(const __m256 v[4], float d, float levels, __m256i i32[4]) {
    const __m256 dv = _mm256_set1_ps(d), top = _mm256_set1_ps(levels), bottom = _mm256_set1_ps(-levels);
    for (int i = 0; i < 4; i++) {
        __m256 r = _mm256_round_ps(_mm256_div_ps(v[i], dv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        i32[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, bottom), top));
    }
}
// 32 int32 within [-127, 127] as 32 int8 in column order (packs interleaves the 128-bit lanes; the permute undoes it).
static inline __m256i pack_int8(const __m256i i32[4]) {
    __m256i low = _mm256_packs_epi32(i32[0], i32[1]), high = _mm256_packs_epi32(i32[2], i32[3]);
    return _mm256_permutevar8x32_epi32(_mm256_packs_epi16(low, high), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// Quantizes rows first .. first + n_rows - 1 of a weight of cols columns (first a multiple of TILE), their values of
// the given kind at src, into the weight's tiles at q and its scales (layout above), padding the last tile. Returns
// how many values or scales are not finite (a NaN in the source, or a group too large for a float16 scale): 0 when
// all are. A group (a multiple of 32 columns) is read twice from the cache: once for its largest |w|, once to round
// it a block of 32 at a time, each block one store (a block never straddles a chunk); only a row's last block, past
// cols, is gathered value by value. One thread: convert_shard (gemv.c) gives each thread its own piece.
int64_t quantize_piece(const uint8_t *src, int src_kind, int64_t first, int64_t n_rows, int64_t cols, int bits,
                       int64_t group, uint8_t *q, uint16_t *scales) {
    int64_t n_groups = n_scales(cols, bits, group), row_bytes = padded_cols(cols, bits) * bits / 8, bad = 0;
    int64_t size = src_kind == F32 ? 4 : 2, padded_rows = (n_rows + TILE - 1) / TILE * TILE;
    const float qmax = bits == 8 ? 127.0f : 7.0f;
    q += first * row_bytes, scales += first * n_groups;
    memset(q, bits == 8 ? 0 : 0x88, padded_rows * row_bytes);  // what a group of scale 0 and padding hold
    memset(scales, 0, padded_rows * n_groups * sizeof(uint16_t));
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)), inf = _mm256_set1_ps(INFINITY);
    for (int64_t r = 0; r < n_rows; r++) {
        const uint8_t *in = src + r * cols * size;
        for (int64_t k0 = 0; k0 < cols; k0 += group) {
            int64_t k1 = k0 + group < cols ? k0 + group : cols;
            __m256 v[4], amax = _mm256_setzero_ps();
            for (int64_t k = k0; k < k1; k += 32) {
                load_block(in, src_kind, k, k1 - k, v);
                for (int i = 0; i < 4; i++) {
                    __m256 a = _mm256_and_ps(v[i], magnitude);
                    bad += __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(a, inf, _CMP_NLT_UQ)));  // NaN, inf
                    amax = _mm256_max_ps(a, amax);  // max_ps gives its second operand for a NaN: passed over
                }
            }
            uint16_t h = _cvtss_sh(max8(amax) / qmax, 0);
            float s = scalar_f16(h);
            scales[r * n_groups + k0 / group] = h;
            bad += !isfinite(s);
            for (int64_t k = k0; s != 0.0f && k < k1; k += 32) {
                __m256i i32[4];
                load_block(in, src_kind, k, k1 - k, v);
                round_block(v, s, qmax, i32);
                __m256i q8 = pack_int8(i32);
                if (bits == 8) {
                    _mm256_storeu_si256((__m256i *)(q + byte_at(r, k, row_bytes)), q8);
                } else {  // q + 8: columns 0-15 in the low nibbles, 16-31 in the high ones (bytes <= 15: the
                          // 16-bit shift moves no bit across a byte)
                    __m256i u = _mm256_add_epi8(q8, _mm256_set1_epi8(8));
                    __m128i both = _mm_or_si128(_mm256_castsi256_si128(u),
                                                _mm_slli_epi16(_mm256_extracti128_si256(u, 1), 4));
                    _mm_storeu_si128((__m128i *)(q + byte_at(r, k / 2, row_bytes)), both);
                }
            }
        }
    }
    return bad;
}

// quantize_piece for n_rows rows at src, in memory, by all threads a tile at a time.
int64_t quantize_rows(const uint8_t *src, int src_kind, int64_t n_rows, int64_t cols, int bits, int64_t group,
                      uint8_t *q, uint16_t *scales) {
    int64_t bad = 0, size = src_kind == F32 ? 4 : 2;
#pragma omp parallel for reduction(+ : bad) schedule(static)
    for (int64_t first = 0; first < n_rows; first += TILE) {
        int64_t n = n_rows - first < TILE ? n_rows - first : TILE;
        bad += quantize_piece(src + first * cols * size, src_kind, first, n, cols, bits, group, q, scales);
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

// dst (n_rows, cols) of dst_kind (float32, bfloat16 or float16) = the dequantized weights, q * scale in float32,
// rounded once: a prompt multiplies a piece of a matrix at a time in the dtype the CPU is fastest at, and a decode
// step embeds its tokens a row at a time.
void dequantize(const uint8_t *q, const uint16_t *scales, void *dst, int64_t n_rows, int64_t cols, int bits,
                int64_t group, int dst_kind) {
    int64_t n_groups = n_scales(cols, bits, group), width = chunk_cols(bits), row_bytes = padded_cols(cols, bits) * bits / 8;
    int64_t size = dst_kind == F32 ? 4 : 2;
#pragma omp parallel for schedule(static) if (n_rows > 1)
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

// A decode step multiplies integers, as llama.cpp does on CPUs: each row of x is cut into blocks of 32 columns and
// each block rounded to integers with one float32 scale: int8 (its largest |x| / 127) for int4 weights, int16 (/ 32767)
// for int8 weights, whose products cost the same either way (ties to even; a block of zeros has scale 0, one holding
// a NaN or an infinity scale NaN). A block of weights times a block of x is then summed as integers, in partial sums
// of 32 (int4: the whole block) or 16 columns (int8) that are exact in int32, and those are converted to float32
// (exactly for int4), scaled by the weight's and x's scales and summed in float32. Each row of x is rounded and
// summed alone: its result never depends on its neighbours.
//
// VNNI (AVX512-VNNI with VL, or AVX-VNNI) does a 4-byte (u8 x s8) or 2-word (s16 x s16) dot product and its
// accumulation in one instruction; AVX2 takes maddubs (pairs to int16, 4 of which add to at most 4 x 2 x 15 x 127,
// short of int16's limit) or madd, then an add. The integers are the same either way: nothing here saturates or
// wraps.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPBUSD _mm256_dpbusd_epi32
#define DPWSSD _mm256_dpwssd_epi32
#elif defined(__AVXVNNI__)
#define DPBUSD _mm256_dpbusd_avx_epi32
#define DPWSSD _mm256_dpwssd_avx_epi32
#endif
// acc + the sums of pairs of int16 products a b (8 int32 lanes, lane j columns 2j and 2j + 1).
static inline __m256i madd16_add(__m256i acc, __m256i a, __m256i b) {
#ifdef DPWSSD
    return DPWSSD(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}
static inline __m256i load_i256(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

// A chunk's sums land in 8 int32 lanes, each lane the sum of some columns of one block, so that one vector of
// scales (x's and the weight's, laid out alike) scales them all.
// - int4 (4 blocks of 32 columns a chunk): the chunk's two 32-byte halves (blocks 0-1, then 2-3) are interleaved by
//   8 bytes (unpacklo/hi_epi64), so that each of the 4 vectors of nibbles (the low nibbles of the first interleave,
//   its high ones, then the second's) holds 8 columns of every block, in the same lanes: blocks 0, 0, 2, 2, 1, 1,
//   3, 3. Their 4 products then sum into one accumulator. x is stored in the matching order (int4_x_at).
// - int8 (2 blocks a chunk), x in column order, 16 columns a vector: lanes 0, 0, 1, 1, 0, 0, 1, 1.
static inline int lane_block(int lane, int bits) { return bits == 4 ? lane % 4 / 2 * 2 + lane / 4 : lane % 4 / 2; }
// Where column k of a chunk's x is stored in the int4 order above: the vector of nibbles that holds it (columns
// 0-7 of a block: low nibbles of the first interleave, 16-23 its high ones, 8-15 and 24-31 the second's), then
// its byte there (block b at 16 (b % 2) + 8 (b / 2)).
static inline int int4_x_at(int k) {
    int b = k / 32, c = k % 32;
    return 32 * (c / 16 + c % 16 / 8 * 2) + 16 * (b % 2) + 8 * (b / 2) + c % 8;
}

// start + the sums of an int4 chunk (u: its 4 vectors of nibbles) times x (its 4 vectors in the int4 order). On AVX2
// the 4 products add in int16 (at most 4 x 2 x 15 x 127) before one madd.
static inline __m256i int4_sums(__m256i start, const __m256i u[4], const __m256i x[4]) {
#ifdef DPBUSD
    for (int v = 0; v < 4; v++) start = DPBUSD(start, u[v], x[v]);
    return start;
#else
    __m256i s = _mm256_add_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(u[0], x[0]), _mm256_maddubs_epi16(u[1], x[1])),
                                 _mm256_add_epi16(_mm256_maddubs_epi16(u[2], x[2]), _mm256_maddubs_epi16(u[3], x[3])));
    return _mm256_add_epi32(start, _mm256_madd_epi16(s, _mm256_set1_epi16(1)));
#endif
}

// x as a pass reads it, chunk by chunk (all rows of a chunk side by side, so that a pass steps through x with one
// stride): the blocks' integers (rows padded with zeros to whole chunks), the x scales in the lanes above, and for
// int4, whose weights are stored as u = q + 8, minus the lanes' 8 sum x: the sums start from it.
typedef struct {
    uint8_t *xq;  // chunk c of row m at (c n_x + m) 128: 128 int8 (int4 weights) or 64 int16 (int8 weights)
    float *scale;  // at (c n_x + m) 8
    int32_t *offset;  // at (c n_x + m) 8
    int64_t n_x, chunks;
} Inputs;

// Rounds one block of 32 values v to i32 within [-127, 127] (wide = 0) or [-32767, 32767] (wide = 1); returns its
// scale (a block of zeros: 0, integers 0; a NaN or an infinity: NaN, integers 0).
static inline float quantize_block(const __m256 v[4], int wide, __m256i i32[4]) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 amax = _mm256_setzero_ps(), nan_check = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        amax = _mm256_max_ps(amax, _mm256_and_ps(v[i], magnitude));
        nan_check = _mm256_add_ps(nan_check, _mm256_mul_ps(v[i], _mm256_setzero_ps()));  // NaN if any is not finite
        i32[i] = _mm256_setzero_si256();
    }
    if (_mm256_movemask_ps(_mm256_cmp_ps(nan_check, nan_check, _CMP_UNORD_Q))) return NAN;
    const float levels = wide ? 32767.0f : 127.0f, d = max8(amax) / levels;
    if (d != 0.0f) round_block(v, d, levels, i32);
    return d;
}

// bytes of memory from the start of a cache line, so that no 32-byte load of it straddles two lines.
static void *on_lines(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

// Allocates x as a pass reads it, for n_x rows of cols columns (prepare_chunk fills it).
static Inputs inputs_for(int64_t n_x, int64_t cols, int bits) {
    Inputs in = {.n_x = n_x, .chunks = padded_cols(cols, bits) / chunk_cols(bits)};
    in.xq = on_lines(n_x * in.chunks * 128);
    in.scale = on_lines(n_x * in.chunks * 8 * sizeof(float));
    in.offset = bits == 4 ? on_lines(n_x * in.chunks * 8 * sizeof(int32_t)) : NULL;
    return in;
}

// Rounds chunk c of row m of x (n_x rows of cols values of x_kind) into in: its blocks' integers (128 bytes either
// way), in the order above, its scales in their lanes, and for int4 the offsets.
static void prepare_chunk(const void *x, int x_kind, int64_t cols, int bits, const Inputs *in, int64_t m, int64_t c) {
    const uint8_t *row = (const uint8_t *)x + m * cols * (x_kind == F32 ? 4 : 2);
    int64_t at = c * in->n_x + m;
    int8_t *xq = (int8_t *)in->xq + at * 128;
    float d[4];
    for (int b = 0; b < chunk_cols(bits) / 32; b++) {
        int64_t k = c * chunk_cols(bits) + 32 * b;
        __m256 v[4];
        __m256i i32[4];
        load_block(row, x_kind, k, cols - k, v);
        d[b] = quantize_block(v, bits == 8, i32);
        if (bits == 8) {  // packs interleaves the 128-bit lanes; the permutes undo it
            for (int half = 0; half < 2; half++) {
                __m256i packed = _mm256_packs_epi32(i32[2 * half], i32[2 * half + 1]);
                _mm256_storeu_si256((__m256i *)(xq + 64 * b + 32 * half), _mm256_permute4x64_epi64(packed, 0xD8));
            }
        } else {  // columns 0-7, 8-15, 16-23 and 24-31 of block b where int4_x_at puts them
            __m256i q8 = pack_int8(i32);
            __m128i low = _mm256_castsi256_si128(q8), high = _mm256_extracti128_si256(q8, 1);
            _mm_storel_epi64((__m128i *)(xq + int4_x_at(32 * b)), low);
            _mm_storel_epi64((__m128i *)(xq + int4_x_at(32 * b + 8)), _mm_unpackhi_epi64(low, low));
            _mm_storel_epi64((__m128i *)(xq + int4_x_at(32 * b + 16)), high);
            _mm_storel_epi64((__m128i *)(xq + int4_x_at(32 * b + 24)), _mm_unpackhi_epi64(high, high));
        }
    }
    for (int lane = 0; lane < 8; lane++) in->scale[at * 8 + lane] = d[lane_block(lane, bits)];
    if (bits == 4) {
        const __m256i eight = _mm256_set1_epi8(8), u[4] = {eight, eight, eight, eight};
        __m256i xv[4];
        for (int v = 0; v < 4; v++) xv[v] = load_i256(xq + 32 * v);
        _mm256_storeu_si256((__m256i *)(in->offset + at * 8),
                            _mm256_sub_epi32(_mm256_setzero_si256(), int4_sums(_mm256_setzero_si256(), u, xv)));
    }
}

// The scales of one row's chunk starting at column k0 (S: the row's scales), in the lanes above (pair_scales reads
// a scale a block, group 32, faster).
static inline __m256 weight_scales(const uint16_t *S, int64_t k0, int64_t group, int bits) {
    if (group % chunk_cols(bits) == 0) return _mm256_set1_ps(scalar_f16(S[k0 / group]));  // one group a chunk
    int64_t at[8];
    for (int lane = 0; lane < 8; lane++) at[lane] = (k0 + 32 * lane_block(lane, bits)) / group;
    return _mm256_cvtph_ps(
        _mm_setr_epi16(S[at[0]], S[at[1]], S[at[2]], S[at[3]], S[at[4]], S[at[5]], S[at[6]], S[at[7]]));
}

// A row's chunk of weights as integer vectors, ready to multiply x: int4, its 4 vectors of nibbles (as above); int8,
// its 64 weights as int16, 16 a vector.
static inline void chunk_weights(const uint8_t *p, const int bits, __m256i w[4]) {
    if (bits == 8) {
        for (int v = 0; v < 4; v++) w[v] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 16 * v)));
        return;
    }
    const __m256i nibble = _mm256_set1_epi8(15), a = load_i256(p), b = load_i256(p + 32);
    const __m256i first = _mm256_unpacklo_epi64(a, b), second = _mm256_unpackhi_epi64(a, b);
    w[0] = _mm256_and_si256(first, nibble), w[1] = _mm256_and_si256(_mm256_srli_epi16(first, 4), nibble);
    w[2] = _mm256_and_si256(second, nibble), w[3] = _mm256_and_si256(_mm256_srli_epi16(second, 4), nibble);
}

// The integer sums of a chunk of weights w times a row's chunk of x (its 4 vectors; int4: start = less its offset),
// lanes as above.
static inline __m256i chunk_sums(const __m256i w[4], const int bits, const __m256i x[4], __m256i start) {
    if (bits == 4) return int4_sums(start, w, x);
    __m256i b0 = madd16_add(_mm256_madd_epi16(w[0], x[0]), w[1], x[1]);
    __m256i b1 = madd16_add(_mm256_madd_epi16(w[2], x[2]), w[3], x[3]);
    return _mm256_hadd_epi32(b0, b1);
}

// Two rows' sums s0 and s1 in one vector, each lane's pair (2j, 2j + 1) of the same block added: lane 2j of row 0,
// lane 2j + 1 of row 1. The float work after it then serves two weight rows at once.
static inline __m256i pair_sums(__m256i s0, __m256i s1) {
#ifdef __AVX512VL__
    __m256i a = _mm256_mask_shuffle_epi32(s0, 0xAA, s1, _MM_PERM_CDAB);  // s0[2j], s1[2j]
    __m256i b = _mm256_mask_shuffle_epi32(s1, 0x55, s0, _MM_PERM_CDAB);  // s0[2j + 1], s1[2j + 1]
#else
    __m256i a = _mm256_blend_epi32(s0, _mm256_shuffle_epi32(s1, 0xB1), 0xAA);
    __m256i b = _mm256_blend_epi32(_mm256_shuffle_epi32(s0, 0xB1), s1, 0xAA);
#endif
    return _mm256_add_epi32(a, b);
}

// The scales of two rows' chunks from column k0 on (S0, S1: the rows' scales) in the lanes of pair_sums: lane 2j,
// the first row's scale for lane j's block, lane 2j + 1 the second's.
static inline __m256 pair_scales(const uint16_t *S0, const uint16_t *S1, int64_t k0, int64_t group, int bits) {
    if (group != 32)
        return _mm256_blend_ps(weight_scales(S0, k0, group, bits), weight_scales(S1, k0, group, bits), 0xAA);
    // A scale a block: each row's 4 (int4) or 2 (int8) side by side, interleaved, then moved into their lanes.
    __m128i r0 = _mm_setzero_si128(), r1 = r0;
    memcpy(&r0, S0 + k0 / 32, bits == 4 ? 8 : 4);
    memcpy(&r1, S1 + k0 / 32, bits == 4 ? 8 : 4);
    __m128i both = _mm_unpacklo_epi16(r0, r1);  // 32 bits a block: the first row's scale, then the second's
    return _mm256_cvtph_ps(bits == 4 ? _mm_shuffle_epi32(both, 0xD8) : _mm_shuffle_epi32(both, 0x44));
}

// One pass over tile t of a weight (rows rows, its tiles at Q, scales at S) for nm rows of x from row m0 on, into y
// (nm, rows): the tile's 4 rows a chunk at a time, one straight line of memory, two rows' sums scaled and added in
// float32 together (pair_sums). by_block: the weight has a scale a block (group 32), which the compiler then reads
// without a branch. (Fewer rows at a time measured slower: the extra passes over a tile cost more than the
// accumulators' registers.)
static inline __attribute__((always_inline)) void tile_pass(const uint8_t *Q, const uint16_t *S, void *y,
                                                            int y_kind, int64_t rows, int64_t n_groups, int64_t group,
                                                            const int by_block, const int bits, const Inputs *in,
                                                            int64_t m0, int64_t t, const int nm) {
    const uint8_t *tile = Q + t * TILE * in->chunks * CHUNK;
    const uint16_t *S0 = S + t * TILE * n_groups;
    __m256 total[TILE / 2][QMAX_X];  // lanes 2j: the pair's first row, 2j + 1: its second
    for (int pair = 0; pair < TILE / 2; pair++)
        for (int m = 0; m < nm; m++) total[pair][m] = _mm256_setzero_ps();
    for (int64_t c = 0; c < in->chunks; c++) {
        const int64_t at = c * in->n_x + m0;  // x's chunk c from row m0 on
        const uint8_t *xq = in->xq + at * 128, *p = tile + c * TILE * CHUNK;
        const float *xs = in->scale + at * 8;
        const int32_t *offset = bits == 4 ? in->offset + at * 8 : NULL;
        for (int i = 0; i < TILE; i++) _mm_prefetch((const char *)p + i * CHUNK + QPREFETCH, _MM_HINT_T0);
#pragma GCC unroll 2
        for (int pair = 0; pair < TILE / 2; pair++) {
            const __m256 ws = pair_scales(S0 + 2 * pair * n_groups, S0 + (2 * pair + 1) * n_groups,
                                          c * chunk_cols(bits), by_block ? 32 : group, bits);
            __m256i w0[4], w1[4];
            chunk_weights(p + 2 * pair * CHUNK, bits, w0);
            chunk_weights(p + (2 * pair + 1) * CHUNK, bits, w1);
            for (int m = 0; m < nm; m++) {  // x's vectors read once for both rows
                __m256i x[4], start = bits == 4 ? load_i256(offset + 8 * m) : _mm256_setzero_si256();
                for (int v = 0; v < 4; v++) x[v] = load_i256(xq + 128 * m + 32 * v);
                __m256i s = pair_sums(chunk_sums(w0, bits, x, start), chunk_sums(w1, bits, x, start));
                total[pair][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(ws, _mm256_loadu_ps(xs + 8 * m)),
                                                 total[pair][m]);
            }
        }
    }
    for (int pair = 0; pair < TILE / 2; pair++)
        for (int m = 0; m < nm; m++) {  // the even lanes' sum, then the odd ones'
            __m128 four = _mm_add_ps(_mm256_castps256_ps128(total[pair][m]), _mm256_extractf128_ps(total[pair][m], 1));
            __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
            int64_t r = t * TILE + 2 * pair;
            if (r < rows) write_kind(y, y_kind, m * rows + r, _mm_cvtss_f32(two));
            if (r + 1 < rows) write_kind(y, y_kind, m * rows + r + 1, _mm_cvtss_f32(_mm_movehdup_ps(two)));
        }
}

// ys[j][m, r] = sum_k x[m, k] * w_j[r, k] for each of the n_w quantized weights (tiles Qs[j], scales Ss[j], rows[j]
// rows of cols columns, `bits` wide, scales per `group` columns) and each of the n_x rows of x, x rounded in blocks
// as above; x and every ys[j] (n_x, rows[j]) are of the kinds x_kind and y_kind (float32 sums, one rounding).
// The threads share out the tiles of all the weights together, as gemv.c's gemv does.
void gemv_quant(int64_t n_w, const uint8_t *const *Qs, const uint16_t *const *Ss, void *const *ys,
                const int64_t *rows, const void *x, int64_t n_x, int64_t cols, int64_t group, int bits, int x_kind,
                int y_kind) {
    int64_t total = 0, n_groups = n_scales(cols, bits, group), size = y_kind == F32 ? 4 : 2;
    for (int64_t j = 0; j < n_w; j++) total += (rows[j] + TILE - 1) / TILE;
    Inputs in = inputs_for(n_x, cols, bits);
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n_x * in.chunks; i++)
            prepare_chunk(x, x_kind, cols, bits, &in, i / in.chunks, i % in.chunks);
        int64_t begin, end;  // (the for's barrier: every row of x is ready)
        share(total, 1, &begin, &end);
        for (int64_t m0 = 0; m0 < n_x; m0 += QMAX_X) {
            int64_t nm = n_x - m0 < QMAX_X ? n_x - m0 : QMAX_X, offset = 0;
            for (int64_t j = 0; j < n_w; offset += (rows[j++] + TILE - 1) / TILE) {
                int64_t tiles = (rows[j] + TILE - 1) / TILE;
                int64_t t = begin > offset ? begin - offset : 0, t1 = end - offset < tiles ? end - offset : tiles;
                void *ym = (uint8_t *)ys[j] + m0 * rows[j] * size;
#define QPASS(BY_BLOCK, BITS, NM) \
    for (; t < t1; t++) tile_pass(Qs[j], Ss[j], ym, y_kind, rows[j], n_groups, group, BY_BLOCK, BITS, &in, m0, t, NM);
#define QPASS_NM(BY_BLOCK, BITS)          \
    switch (nm) {                         \
        case 1: QPASS(BY_BLOCK, BITS, 1) break; \
        case 2: QPASS(BY_BLOCK, BITS, 2) break; \
        case 3: QPASS(BY_BLOCK, BITS, 3) break; \
        default: QPASS(BY_BLOCK, BITS, 4)       \
    }
                if (bits == 8) {
                    if (group == 32) QPASS_NM(1, 8) else QPASS_NM(0, 8)
                } else {
                    if (group == 32) QPASS_NM(1, 4) else QPASS_NM(0, 4)
                }
            }
        }
    }
    free(in.xq);
    free(in.scale);
    free(in.offset);
}
