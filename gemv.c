// Matrix-vector products for the CPU decode step (half-precision or float32 weights): y = x W^T for a few rows of x.
//
// One decode step reads every decoder weight once, so its speed is the speed at which weights stream from memory.
// PyTorch's float16 and bfloat16 matrix-vector kernels convert too slowly to keep up on many CPUs; these widen
// each weight to float32 in registers as it arrives and accumulate in float32. Built by kernels.py with
// `-O3 -march=native` for the machine it runs on; kernels.py falls back to PyTorch when no compiler is there.
#include <math.h>
#include <fcntl.h>
#include <unistd.h>

#include "simd.h"

#define ROWS 8  // weight rows per pass: enough independent accumulators to hide the FMA latency
#define MAX_X 4  // rows of x per pass over the weights
// With several rows of x a pass keeps nm x nr accumulators and nr weight vectors in registers: fewer weight rows
// a pass, so that they fit in AVX2's 16 vector registers (AVX-512's 32), rather than spill to memory.
#if WIDTH == 16
#define ROWS_2 8
#define ROWS_3 7
#define ROWS_4 6
#else
#define ROWS_2 4
#define ROWS_3 3
#define ROWS_4 3
#endif
// Software prefetch, as the hardware prefetcher falls behind on 8 streams and stops at every 4 KiB page: short
// rows (up to SHORT_ROW elements) are fetched one block of rows ahead, long ones PREFETCH elements ahead.
#define PREFETCH 256
#define SHORT_ROW 4608

// One pass: y[m, r..r+nr) for the nm rows of x at x_m (nm, nr small constants once inlined, so that the
// accumulators live in registers).
#define PASS(NAME, TYPE, LOAD, SCALAR)                                                                             \
    static inline __attribute__((always_inline)) void NAME(const TYPE *W, const float *x, void *y,               \
                                                           int y_kind, int64_t rows, int64_t cols, int64_t r,    \
                                                           const int nr, const int nm) {                         \
        int64_t body = cols - cols % WIDTH, ahead = cols <= SHORT_ROW ? ROWS * cols : PREFETCH;                \
        vec acc[MAX_X][ROWS];                                                                                     \
        for (int m = 0; m < nm; m++)                                                                              \
            for (int i = 0; i < nr; i++) acc[m][i] = zero();                                                      \
        for (int64_t k = 0; k < body; k += WIDTH) {                                                               \
            vec w[ROWS];                                                                                          \
            for (int i = 0; i < nr; i++) {                                                                        \
                _mm_prefetch((const char *)(W + (r + i) * cols + k + ahead), _MM_HINT_T0);                        \
                w[i] = LOAD(W + (r + i) * cols + k);                                                              \
            }                                                                                                     \
            for (int m = 0; m < nm; m++) {                                                                        \
                vec xv = load_f32(x + m * cols + k);                                                              \
                for (int i = 0; i < nr; i++) acc[m][i] = fmadd(w[i], xv, acc[m][i]);                              \
            }                                                                                                     \
        }                                                                                                         \
        for (int m = 0; m < nm; m++)                                                                              \
            for (int i = 0; i < nr; i++) {                                                                        \
                float s = sum(acc[m][i]);                                                                         \
                for (int64_t k = body; k < cols; k++) s += SCALAR(W[(r + i) * cols + k]) * x[m * cols + k];      \
                write_kind(y, y_kind, m * rows + r + i, s);                                                       \
            }                                                                                                     \
    }

static inline float scalar_f32(float f) { return f; }
PASS(pass_f16, uint16_t, load_f16, scalar_f16)
PASS(pass_bf16, uint16_t, load_bf16, scalar_bf16)
PASS(pass_f32, float, load_f32, scalar_f32)

// One pass of weight kind w_kind over nr weight rows for nm rows of x, each a constant once inlined: every row of x
// has its own accumulators, summed in the same order whatever nm is, so a row's result never depends on how many
// rows share the pass (a server's batch).
#define PASS_ANY(W, x, y, y_kind, rows, cols, r, nr, nm)                                                         \
    (w_kind == F16    ? pass_f16((const uint16_t *)(W), x, y, y_kind, rows, cols, r, nr, nm)                    \
     : w_kind == BF16 ? pass_bf16((const uint16_t *)(W), x, y, y_kind, rows, cols, r, nr, nm)                   \
                      : pass_f32((const float *)(W), x, y, y_kind, rows, cols, r, nr, nm))

// ys[j][m, r] = sum_k x[m, k] * Ws[j][r, k] for each of the n_w weights (rows[j], cols), all of the kind w_kind,
// and each of the n_x rows of x; x and every ys[j] (n_x, rows[j]) are row-major, of the kinds x_kind and
// y_kind (float32 sums, one rounding). The threads share out the rows of all the weights together, so small
// matrices cost no extra round of threads.
void gemv(int64_t n_w, const void *const *Ws, void *const *ys, const int64_t *rows, const void *x_in,
          int64_t n_x, int64_t cols, int w_kind, int x_kind, int y_kind) {
    int64_t total = 0, size = y_kind == F32 ? 4 : 2;
    for (int64_t j = 0; j < n_w; j++) total += rows[j];
    const float *x = widen(x_in, x_kind, n_x * cols);
#pragma omp parallel
    {
        int64_t begin, end;
        share(total, ROWS, &begin, &end);
        for (int64_t m0 = 0; m0 < n_x; m0 += MAX_X) {
            int64_t nm = n_x - m0 < MAX_X ? n_x - m0 : MAX_X, offset = 0;
            for (int64_t j = 0; j < n_w; offset += rows[j++]) {
                int64_t r = begin > offset ? begin - offset : 0, r1 = end - offset < rows[j] ? end - offset : rows[j];
                const float *xm = x + m0 * cols;
                void *ym = (uint8_t *)ys[j] + m0 * rows[j] * size;
                int64_t step = nm == 1 ? ROWS : nm == 2 ? ROWS_2 : nm == 3 ? ROWS_3 : ROWS_4;
                for (; r + step <= r1; r += step) {
                    switch (nm) {
                        case 1: PASS_ANY(Ws[j], xm, ym, y_kind, rows[j], cols, r, ROWS, 1); break;
                        case 2: PASS_ANY(Ws[j], xm, ym, y_kind, rows[j], cols, r, ROWS_2, 2); break;
                        case 3: PASS_ANY(Ws[j], xm, ym, y_kind, rows[j], cols, r, ROWS_3, 3); break;
                        default: PASS_ANY(Ws[j], xm, ym, y_kind, rows[j], cols, r, ROWS_4, 4);
                    }
                }
                for (; r < r1; r++) PASS_ANY(Ws[j], xm, ym, y_kind, rows[j], cols, r, 1, (int)nm);
            }
        }
    }
    if (x != x_in) free((void *)x);
}

// gelu_tanh(x) = 0.5 x (1 + tanh(z)) = x / (1 + exp(-2z)), z = sqrt(2 / pi) (x + 0.044715 x^3).
static inline vec gelu(vec x) {
    vec z2 = vmul(vmul(x, splat(-1.5957691216057308f)), fmadd(vmul(x, x), splat(0.044715f), splat(1.0f)));
    return vdiv(x, vadd(splat(1.0f), exp_approx(z2)));
}

static inline float gelu_scalar(float x) {
    float z = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.0f + tanhf(z));
}

// out[r, c] = gelu_tanh(x[r, c]) * (up ? up[r, c] : 1) for (rows, cols) matrices of one kind whose rows start
// x_stride, up_stride and cols elements apart (x and up may be column slices of a wider product); float32 inside,
// one rounding at the end. The MLPs' activation in one pass instead of torch's three.
void gelu_tanh_mul(const void *x, int64_t x_stride, const void *up, int64_t up_stride, void *out, int64_t rows,
                   int64_t cols, int kind) {
    int64_t size = kind == F32 ? 4 : 2;
#pragma omp parallel
    {
        int64_t begin, end;
        share(rows * cols, WIDTH, &begin, &end);
        for (int64_t i = begin; i < end;) {
            int64_t r = i / cols, c = i % cols, n = (end - i < cols - c) ? end - i : cols - c;
            const uint8_t *xr = (const uint8_t *)x + (r * x_stride + c) * size;
            const uint8_t *ur = up ? (const uint8_t *)up + (r * up_stride + c) * size : 0;
            uint8_t *o = (uint8_t *)out + (r * cols + c) * size;
            int64_t j = 0;
            for (; j + WIDTH <= n; j += WIDTH) {
                vec g = gelu(load_kind(xr, kind, j));
                if (ur) g = vmul(g, load_kind(ur, kind, j));
                store_kind(o, kind, j, g);
            }
            for (; j < n; j++) {
                float g = gelu_scalar(read_kind(xr, kind, j));
                if (ur) g *= read_kind(ur, kind, j);
                write_kind(o, kind, j, g);
            }
            i += n;
        }
    }
}

// Loading: convert tensors from a safetensors shard into parameters, or quantize them (quant.c), read a block at a
// time into a buffer that stays in the cache: no page of the file is ever mapped into the process, so nothing is
// left to drop, and the page cache keeps the file. One call does a whole shard without the GIL, so that Python can
// load the tokenizer meanwhile.
typedef struct {
    int64_t src_offset;  // bytes from the start of the file
    void *dst;  // the converted values, or a quantized weight's tiles
    int64_t n;  // elements
    int32_t src_kind, dst_kind;
    int32_t bits;  // 8 or 4 to quantize n / cols rows of cols columns into dst and scales (dst_kind unused), else 0
    int64_t cols, group;
    uint16_t *scales;
} convert_job;

static void convert_slice(const uint8_t *src, int src_kind, uint8_t *dst, int dst_kind, int64_t i, int64_t end) {
    int64_t size[] = {4, 2, 2};
    if (src_kind == dst_kind) {
        memcpy(dst + i * size[dst_kind], src + i * size[src_kind], (end - i) * size[src_kind]);
        return;
    }
    for (; i + WIDTH <= end; i += WIDTH) store_kind(dst, dst_kind, i, load_kind(src, src_kind, i));
    for (; i < end; i++) write_kind(dst, dst_kind, i, read_kind(src, src_kind, i));
}

// dst = n values of src converted from one kind to another (rounded to nearest, ties to even), by all threads: a
// prompt multiplies a piece of a weight at a time in the dtype the CPU is fastest at, and torch's own conversions
// between half precisions are slow.
void convert(const void *src, int src_kind, void *dst, int dst_kind, int64_t n) {
#pragma omp parallel
    {
        int64_t begin, end;
        share(n, 64, &begin, &end);
        convert_slice((const uint8_t *)src, src_kind, (uint8_t *)dst, dst_kind, begin, end);
    }
}

// How many of the values [i, end) of the given kind at p are not finite (NaN or infinite): all exponent bits set.
static int64_t count_nonfinite(const uint8_t *p, int kind, int64_t i, int64_t end) {
    int64_t bad = 0;
    if (kind == F32) {
        const uint32_t *q = (const uint32_t *)p;
        for (; i < end; i++) bad += (q[i] & 0x7F800000u) == 0x7F800000u;
    } else {
        const uint16_t *q = (const uint16_t *)p;
        const uint16_t mask = kind == F16 ? 0x7C00 : 0x7F80;
        for (; i < end; i++) bad += (q[i] & mask) == mask;
    }
    return bad;
}

// Non-finite values among n of the given kind at p, counted by `threads` threads (0: all of torch's).
int64_t nonfinite(const void *p, int64_t n, int kind, int threads) {
    int64_t bad = 0;
    if (threads <= 0) threads = omp_get_max_threads();
#pragma omp parallel num_threads(threads) reduction(+ : bad)
    {
        int64_t begin, end;
        share(n, 64, &begin, &end);
        bad = count_nonfinite((const uint8_t *)p, kind, begin, end);
    }
    return bad;
}

// Ask the kernel to read bytes [offset, offset + length) of a mapped file in now, in large requests: read a page
// fault at a time, a cold file came in at 5-12 MB/s where the disk gives 700 MB/s.
#define READ_BLOCK (1 << 20)  // bytes read and converted at a time: 1 MiB ran faster than 256 KiB and 4 MiB blocks

// Runs the jobs in order, each a block at a time by all threads; *done counts the source bytes converted so far.
// Every converted value is checked to be finite (a NaN in the file, or a float32 beyond float16's range, is not),
// and every quantized one and its scale. Returns -1 when all are; the index j of the first job with a value that is
// not; or -2 - j where the file could not be read (it ended early, or the disk failed).
int64_t convert_shard(int fd, const convert_job *jobs, int64_t n_jobs, int64_t *done) {
    int64_t size[] = {4, 2, 2};
    posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);  // a larger read-ahead window from a cold page cache
    for (int64_t j = 0; j < n_jobs; j++) {
        const convert_job *job = jobs + j;
        int64_t per_block = READ_BLOCK / size[job->src_kind], bad = 0, unread = 0;
        if (job->bits) {  // whole tiles of rows, so that each block fills tiles of its own
            int64_t tile = TILE * job->cols;
            per_block = (per_block / tile > 1 ? per_block / tile : 1) * tile;
        }
        int64_t blocks = (job->n + per_block - 1) / per_block;
#pragma omp parallel reduction(+ : bad, unread)
        {
            uint8_t *buffer = aligned_alloc(64, (per_block * size[job->src_kind] + 63) / 64 * 64);
            // Blocks handed out as threads come free: one that loses its core to the tokenizer, loading beside it,
            // leaves its share to the others instead of keeping them waiting.
#pragma omp for schedule(dynamic)
            for (int64_t k = 0; k < blocks; k++) {
                int64_t first = k * per_block, count = job->n - first < per_block ? job->n - first : per_block;
                int64_t bytes = count * size[job->src_kind], got = 0;
                uint8_t *dst = (uint8_t *)job->dst + first * size[job->dst_kind];
                while (!unread && got < bytes) {
                    ssize_t r = pread(fd, buffer + got, bytes - got, job->src_offset + first * size[job->src_kind] + got);
                    if (r <= 0) unread = 1;
                    else got += r;
                }
                if (unread) continue;
                if (job->bits) {
                    bad += quantize_piece(buffer, job->src_kind, first / job->cols, count / job->cols, job->cols,
                                          job->bits, job->group, job->dst, job->scales);
                } else {
                    convert_slice(buffer, job->src_kind, dst, job->dst_kind, 0, count);
                    bad += count_nonfinite(dst, job->dst_kind, 0, count);  // while still in the cache
                }
                __atomic_add_fetch(done, bytes, __ATOMIC_RELAXED);
            }
            free(buffer);
        }
        if (unread) return -2 - j;
        if (bad) return j;
    }
    return -1;
}


// The first lane of x equal to v, or -1.
static inline int first_equal(vec x, float v) {
#if defined(__AVX512F__)
    unsigned mask = _mm512_cmp_ps_mask(x, splat(v), _CMP_EQ_OQ);
#else
    unsigned mask = _mm256_movemask_ps(_mm256_cmp_ps(x, splat(v), _CMP_EQ_OQ));
#endif
    return mask ? __builtin_ctz(mask) : -1;
}

// The largest of the values [i, end) of a row of the given kind, or -inf; *bad becomes NaN if one is not finite.
static float largest(const uint8_t *row, int kind, int64_t i, int64_t end, vec *bad) {
    vec m = splat(-INFINITY);
    float tail = -INFINITY;
    for (; i + WIDTH <= end; i += WIDTH) {
        vec x = load_kind(row, kind, i);
        m = vmax(m, x), *bad = vadd(*bad, vmul(x, zero()));  // x * 0 is NaN for NaN and infinities
    }
    for (; i < end; i++) {
        float x = read_kind(row, kind, i);
        tail = x > tail ? x : tail;
        *bad = vadd(*bad, splat(x * 0.0f));
    }
    float lanes[WIDTH];
    store_f32(lanes, m);
    for (int l = 0; l < WIDTH; l++) tail = lanes[l] > tail ? lanes[l] : tail;
    return tail;
}

// Sampling's view of logits: for each of n_rows rows of cols values of the given kind at p, the first column of the
// largest value among its first vocab columns (top), and over all its columns the largest value (peak) and
// log(sum exp(x - peak)) (logsum): log_softmax(x) = x - peak - logsum, as torch computes it. All threads read a row
// in pieces of SCAN_PIECE columns whose results are combined in order: the same numbers whatever the threads.
// Returns how many rows hold a value that is not finite (their outputs are then unspecified).
#define SCAN_PIECE 8192
int64_t scan_logits(const void *p, int kind, int64_t n_rows, int64_t cols, int64_t vocab, int64_t *top, float *peak,
                    float *logsum) {
    int64_t pieces = (cols + SCAN_PIECE - 1) / SCAN_PIECE, bad_rows = 0, size = kind == F32 ? 4 : 2;
    float *chosen = malloc(pieces * 3 * sizeof(float)), *high = chosen + pieces, *sums = high + pieces;
    for (int64_t r = 0; r < n_rows; r++) {
        const uint8_t *row = (const uint8_t *)p + r * cols * size;
        int bad = 0;
#pragma omp parallel for schedule(static) reduction(| : bad)
        for (int64_t k = 0; k < pieces; k++) {  // each piece's largest value, and that of its columns below vocab
            int64_t i = k * SCAN_PIECE, end = i + SCAN_PIECE < cols ? i + SCAN_PIECE : cols;
            int64_t votes = vocab < i ? i : vocab < end ? vocab : end;
            vec nan = zero();
            chosen[k] = largest(row, kind, i, votes, &nan);
            float rest = largest(row, kind, votes, end, &nan);
            high[k] = chosen[k] > rest ? chosen[k] : rest;
            bad |= sum(nan) != 0.0f;
        }
        float best = -INFINITY, h = -INFINITY;
        int64_t k_best = 0;
        for (int64_t k = 0; k < pieces; k++) {
            if (chosen[k] > best) best = chosen[k], k_best = k;
            h = high[k] > h ? high[k] : h;
        }
        if (bad) {
            bad_rows++;
            continue;
        }
        int64_t i = k_best * SCAN_PIECE;  // the first column holding the best value
        for (; i + WIDTH <= cols; i += WIDTH)
            if (first_equal(load_kind(row, kind, i), best) >= 0) break;
        while (read_kind(row, kind, i) != best) i++;
        top[r] = i, peak[r] = h;
#pragma omp parallel for schedule(static)
        for (int64_t k = 0; k < pieces; k++) {
            int64_t j = k * SCAN_PIECE, end = j + SCAN_PIECE < cols ? j + SCAN_PIECE : cols;
            vec s = zero();
            float tail = 0.0f;
            for (; j + WIDTH <= end; j += WIDTH) s = vadd(s, exp_approx(vsub(load_kind(row, kind, j), splat(h))));
            for (; j < end; j++) tail += expf(read_kind(row, kind, j) - h);
            sums[k] = sum(s) + tail;
        }
        double total = 0.0;
        for (int64_t k = 0; k < pieces; k++) total += sums[k];
        logsum[r] = (float)log(total);
    }
    free(chosen);
    return bad_rows;
}
