// The decode step's work besides its matrix products (gemv.c, quant.c), for half-precision hidden states: Gemma's
// RMSNorm and one query position's attention over the KV cache. Each is one call with float32 inside and one
// rounding at the end, where PyTorch takes a dozen small operations whose dispatch, not their arithmetic, is what
// costs at one token.
#include <float.h>
#include <math.h>

#include "simd.h"

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * (1 + w) for each of the rows of x; x and out are of the kind x_kind,
// w of w_kind. Gemma's RMSNorm, its products in the order transformers takes them.
void rms_norm(const void *x, const void *w, void *out, int64_t rows, int64_t cols, float eps, int x_kind,
              int w_kind) {
    int64_t body = cols - cols % WIDTH;
#pragma omp parallel for if (rows > 16)
    for (int64_t r = 0; r < rows; r++) {
        int64_t at = r * cols, k;
        vec squares = zero();
        for (k = 0; k < body; k += WIDTH) {
            vec v = load_kind(x, x_kind, at + k);
            squares = fmadd(v, v, squares);
        }
        float total = sum(squares);
        for (; k < cols; k++) total += read_kind(x, x_kind, at + k) * read_kind(x, x_kind, at + k);
        float inv = 1.0f / sqrtf(total / cols + eps);
        for (k = 0; k < body; k += WIDTH)
            store_kind(out, x_kind, at + k, vmul(vmul(load_kind(x, x_kind, at + k), splat(inv)),
                                                 vadd(splat(1.0f), load_kind(w, w_kind, k))));
        for (; k < cols; k++)
            write_kind(out, x_kind, at + k, read_kind(x, x_kind, at + k) * inv * (1.0f + read_kind(w, w_kind, k)));
    }
}

// sum_d a[d] b[d] for float32 a and n values of the given half-precision kind at b.
static inline float dot(const float *a, const uint16_t *b, int64_t n, int kind) {
    int64_t d = 0;
    vec acc = zero();
    for (; d + WIDTH <= n; d += WIDTH) acc = fmadd(load_f32(a + d), load_kind(b, kind, d), acc);
    float s = sum(acc);
    for (; d < n; d++) s += a[d] * read_kind(b, kind, d);
    return s;
}

// One query position per row (B rows, n_heads heads of hd values) over T cached positions: query head h reads kv
// head h / (n_heads / n_kv), and out = softmax(q k^T * scale, soft-capped by cap where cap > 0, masked) v. q and
// out are (B, n_heads, hd), contiguous; k and v (B, n_kv, T, hd) with batch and head strides kv_b and kv_h; mask
// (B, T) bytes with batch stride mask_b, nonzero where the query may read a position; all of the half-precision
// kind `kind`. A masked score is float32's minimum, as in transformers' eager attention, so a row with every
// position masked averages them all; masked positions are otherwise never read.
void attend_one(const void *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask, void *out, int64_t B,
                int64_t n_heads, int64_t n_kv, int64_t T, int64_t hd, int64_t kv_b, int64_t kv_h, int64_t mask_b,
                float scale, float cap, int kind) {
    int64_t group = n_heads / n_kv, padded = (T + WIDTH - 1) / WIDTH * WIDTH;
#pragma omp parallel
    {
        float *qf = malloc(hd * sizeof(float)), *acc = malloc(hd * sizeof(float));
        float *s = malloc(padded * sizeof(float));
#pragma omp for
        for (int64_t i = 0; i < B * n_heads; i++) {
            int64_t b = i / n_heads, at = b * kv_b + i % n_heads / group * kv_h;
            const uint8_t *allowed = mask + b * mask_b;
            for (int64_t d = 0; d < hd; d++) qf[d] = read_kind(q, kind, i * hd + d);
            int any = 0;
            for (int64_t t = 0; t < T; t++) {
                s[t] = allowed[t] ? dot(qf, k + at + t * hd, hd, kind) * scale : 0.0f;
                any |= allowed[t];
            }
            for (int64_t t = T; t < padded; t++) s[t] = 0.0f;
            if (cap > 0)  // cap * tanh(s / cap), tanh(y) = 1 - 2 / (exp(2y) + 1)
                for (int64_t t = 0; t < padded; t += WIDTH) {
                    vec e = exp_approx(vmul(load_f32(s + t), splat(2.0f / cap)));
                    store_f32(s + t, vmul(splat(cap), vsub(splat(1.0f), vdiv(splat(2.0f), vadd(e, splat(1.0f))))));
                }
            float top = -FLT_MAX, total = 0.0f;
            for (int64_t t = 0; t < T; t++)
                if (allowed[t] && s[t] > top) top = s[t];
            for (int64_t t = 0; t < padded; t += WIDTH) store_f32(s + t, exp_approx(vsub(load_f32(s + t), splat(top))));
            for (int64_t t = 0; t < T; t++) {
                s[t] = !any ? 1.0f : allowed[t] ? s[t] : 0.0f;
                total += s[t];
            }
            for (int64_t d = 0; d < hd; d++) acc[d] = 0.0f;
            for (int64_t t = 0; t < T; t++) {
                if (s[t] == 0.0f) continue;
                float p = s[t] / total;
                const uint16_t *vt = v + at + t * hd;
                int64_t d = 0;
                for (; d + WIDTH <= hd; d += WIDTH) store_f32(acc + d, fmadd(splat(p), load_kind(vt, kind, d), load_f32(acc + d)));
                for (; d < hd; d++) acc[d] += p * read_kind(vt, kind, d);
            }
            for (int64_t d = 0; d < hd; d++) write_kind(out, kind, i * hd + d, acc[d]);
        }
        free(qf);
        free(acc);
        free(s);
    }
}
