// The decode step's work besides its matrix products (gemv.c, quant.c), for half-precision hidden states: Gemma's
// RMSNorm, one query position's attention over the KV cache and, around them and the products, a whole decoder
// layer. Each is one call with float32 inside and one rounding at the end of each step PyTorch would round, where
// PyTorch takes dozens of small operations whose dispatch, not their arithmetic, is what costs at one token.
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

#define HEADS 4  // query heads that share a kv head taken together: each key and value is widened once for them

// Attention of nq (1..HEADS, a constant where inlined, so that its sums stay in registers) query heads qf (float32,
// hd each) over the first `end` positions of one kv head's keys k and values v (hd apart), into out (hd apart);
// allowed: the readable positions, none if !any; s: nq rows of `padded` floats of scratch.
static inline __attribute__((always_inline)) void attend_heads(const float *qf, const uint16_t *k, const uint16_t *v,
                                                              const uint8_t *allowed, int any, int64_t end,
                                                              int64_t padded, int64_t hd, float scale, float cap,
                                                              int kind, float *s, void *out, const int nq) {
    int64_t body = hd - hd % WIDTH;
    for (int64_t t = 0; t < end; t++) {  // the scores of the nq heads, each key widened once
        const uint16_t *kt = k + t * hd;
        if (!allowed[t]) {
            for (int h = 0; h < nq; h++) s[h * padded + t] = 0.0f;
            continue;
        }
        vec acc[HEADS];
        for (int h = 0; h < nq; h++) acc[h] = zero();
        for (int64_t d = 0; d < body; d += WIDTH) {
            vec kd = load_kind(kt, kind, d);
            for (int h = 0; h < nq; h++) acc[h] = fmadd(load_f32(qf + h * hd + d), kd, acc[h]);
        }
        for (int h = 0; h < nq; h++) {
            float dot = sum(acc[h]);
            for (int64_t d = body; d < hd; d++) dot += qf[h * hd + d] * read_kind(kt, kind, d);
            s[h * padded + t] = dot * scale;
        }
    }
    for (int h = 0; h < nq; h++) {  // softmax over the first `end` positions
        float *sh = s + h * padded, top = -FLT_MAX, total = 0.0f;
        int64_t n = (end + WIDTH - 1) / WIDTH * WIDTH;
        for (int64_t t = end; t < n; t++) sh[t] = 0.0f;
        if (cap > 0)  // cap * tanh(s / cap), tanh(y) = 1 - 2 / (exp(2y) + 1)
            for (int64_t t = 0; t < n; t += WIDTH) {
                vec e = exp_approx(vmul(load_f32(sh + t), splat(2.0f / cap)));
                store_f32(sh + t, vmul(splat(cap), vsub(splat(1.0f), vdiv(splat(2.0f), vadd(e, splat(1.0f))))));
            }
        for (int64_t t = 0; t < end; t++)
            if (allowed[t] && sh[t] > top) top = sh[t];
        for (int64_t t = 0; t < n; t += WIDTH) store_f32(sh + t, exp_approx(vsub(load_f32(sh + t), splat(top))));
        for (int64_t t = 0; t < end; t++) {
            sh[t] = !any ? 1.0f : allowed[t] ? sh[t] : 0.0f;
            total += sh[t];
        }
        for (int64_t t = 0; t < end; t++) sh[t] /= total;
    }
    for (int64_t d = 0; d < body; d += WIDTH) {  // out = p v, each value widened once for the nq heads
        vec o[HEADS];
        for (int h = 0; h < nq; h++) o[h] = zero();
        for (int64_t t = 0; t < end; t++) {
            if (any && !allowed[t]) continue;
            vec vd = load_kind(v + t * hd, kind, d);
            for (int h = 0; h < nq; h++) o[h] = fmadd(splat(s[h * padded + t]), vd, o[h]);
        }
        for (int h = 0; h < nq; h++) store_kind(out, kind, h * hd + d, o[h]);
    }
    for (int h = 0; h < nq; h++)
        for (int64_t d = body; d < hd; d++) {
            float o = 0.0f;
            for (int64_t t = 0; t < end; t++)
                if (!any || allowed[t]) o += s[h * padded + t] * read_kind(v + t * hd, kind, d);
            write_kind(out, kind, h * hd + d, o);
        }
}

// One query position per row (B rows, n_heads heads of hd values) over T cached positions: query head h reads kv
// head h / (n_heads / n_kv), and out = softmax(q k^T * scale, soft-capped by cap where cap > 0, masked) v. q and
// out are (B, n_heads, hd), contiguous; k and v (B, n_kv, T, hd) with batch and head strides kv_b and kv_h; mask
// (B, T) bytes with batch stride mask_b, nonzero where the query may read a position; all of the half-precision
// kind `kind`. A masked score is float32's minimum, as in transformers' eager attention, so a row with every
// position masked averages them all; masked positions are otherwise never read, nor any past the last readable one.
// The threads share out (row, kv head, up to HEADS of its query heads): a row's numbers never depend on the others.
void attend_one(const void *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask, void *out, int64_t B,
                int64_t n_heads, int64_t n_kv, int64_t T, int64_t hd, int64_t kv_b, int64_t kv_h, int64_t mask_b,
                float scale, float cap, int kind) {
    int64_t group = n_heads / n_kv, per = group < HEADS ? group : HEADS, blocks = (group + per - 1) / per;
    int64_t padded = (T + WIDTH - 1) / WIDTH * WIDTH;
#pragma omp parallel
    {
        float *qf = malloc(HEADS * hd * sizeof(float)), *s = malloc(HEADS * padded * sizeof(float));
#pragma omp for
        for (int64_t item = 0; item < B * n_kv * blocks; item++) {
            int64_t b = item / (n_kv * blocks), j = item / blocks % n_kv, h0 = j * group + item % blocks * per;
            int64_t nq = h0 + per <= (j + 1) * group ? per : (j + 1) * group - h0, end = 0;
            const uint8_t *allowed = mask + b * mask_b;
            for (int64_t t = 0; t < T; t++)
                if (allowed[t]) end = t + 1;
            int any = end > 0;
            for (int64_t i = 0; i < nq * hd; i++) qf[i] = read_kind(q, kind, (b * n_heads + h0) * hd + i);
            const uint16_t *kb = k + b * kv_b + j * kv_h, *vb = v + b * kv_b + j * kv_h;
            void *ob = (uint8_t *)out + (b * n_heads + h0) * hd * sizeof(uint16_t);
            int64_t n = any ? end : T;
            switch (nq) {
                case 1: attend_heads(qf, kb, vb, allowed, any, n, padded, hd, scale, cap, kind, s, ob, 1); break;
                case 2: attend_heads(qf, kb, vb, allowed, any, n, padded, hd, scale, cap, kind, s, ob, 2); break;
                case 3: attend_heads(qf, kb, vb, allowed, any, n, padded, hd, scale, cap, kind, s, ob, 3); break;
                default: attend_heads(qf, kb, vb, allowed, any, n, padded, hd, scale, cap, kind, s, ob, 4);
            }
        }
        free(qf);
        free(s);
    }
}

// v rounded to the half-precision kind `kind`, as floats.
static inline vec round_to(vec v, int kind) {
    uint16_t h[WIDTH];
    store_kind(h, kind, 0, v);
    return load_kind(h, kind, 0);
}
static inline float round_one(float f, int kind) {
    uint16_t h;
    write_kind(&h, kind, 0, f);
    return read_kind(&h, kind, 0);
}

// y = x * cos + rotate_half(x) * sin for one head of hd (even) half-precision values, each product and the sum
// rounded to the kind as PyTorch's three operations round them (modeling_gemma.apply_rope): a product of two
// half-precision values is exact in float32, so one rounding of each gives PyTorch's result.
static void rope_head(const uint16_t *x, const uint16_t *cos, const uint16_t *sin, uint16_t *y, int64_t hd,
                      int kind) {
    int64_t half = hd / 2, d = 0;
    for (; d + WIDTH <= half; d += WIDTH) {
        vec low = load_kind(x, kind, d), high = load_kind(x, kind, d + half);
        vec a = round_to(vmul(low, load_kind(cos, kind, d)), kind);
        vec b = round_to(vmul(vmul(high, splat(-1.0f)), load_kind(sin, kind, d)), kind);
        store_kind(y, kind, d, vadd(a, b));
        a = round_to(vmul(high, load_kind(cos, kind, d + half)), kind);
        b = round_to(vmul(low, load_kind(sin, kind, d + half)), kind);
        store_kind(y, kind, d + half, vadd(a, b));
    }
    for (; d < half; d++) {
        float low = read_kind(x, kind, d), high = read_kind(x, kind, d + half);
        float a = round_one(low * read_kind(cos, kind, d), kind), b = round_one(-high * read_kind(sin, kind, d), kind);
        write_kind(y, kind, d, a + b);
        a = round_one(high * read_kind(cos, kind, d + half), kind);
        b = round_one(low * read_kind(sin, kind, d + half), kind);
        write_kind(y, kind, d + half, a + b);
    }
}

// A decode step's attention for B rows after their q, k, v products (one position each; q (B, n_heads, hd), k and
// v (B, n_kv, hd), contiguous): rotary angles on q and k (cos and sin (B, hd), this step's), k and v written into
// the cache at each row's position pos[b] (k_cache, v_cache: (B, n_kv, > pos[b], hd) with batch and head strides
// kv_b, kv_h), then attend_one over the first T positions into out (B, n_heads, hd). What PyTorch does in some
// thirty operations a layer; the same numbers. q_rot: room for q.
static void attend_step(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *cos,
                        const uint16_t *sin, const int64_t *pos, uint16_t *k_cache, uint16_t *v_cache,
                        const uint8_t *mask, void *out, int64_t B, int64_t n_heads, int64_t n_kv, int64_t T,
                        int64_t hd, int64_t kv_b, int64_t kv_h, int64_t mask_b, float scale, float cap, int kind,
                        uint16_t *q_rot) {
    for (int64_t b = 0; b < B; b++) {
        for (int64_t j = 0; j < n_kv; j++) {
            int64_t at = b * kv_b + j * kv_h + pos[b] * hd, from = (b * n_kv + j) * hd;
            rope_head(k + from, cos + b * hd, sin + b * hd, k_cache + at, hd, kind);
            memcpy(v_cache + at, v + from, hd * sizeof(uint16_t));
        }
        for (int64_t h = 0; h < n_heads; h++)
            rope_head(q + (b * n_heads + h) * hd, cos + b * hd, sin + b * hd, q_rot + (b * n_heads + h) * hd, hd, kind);
    }
    attend_one(q_rot, k_cache, v_cache, mask, out, B, n_heads, n_kv, T, hd, kv_b, kv_h, mask_b, scale, cap, kind);
}

// A decoder layer of half-precision rows (kernels.Decoder describes each once, and where its cache is at each step):
// sizes, numerics, where its weights are (of the kind w_kind, or with bits 8 or 4 quantized tiles and their scales)
// and its KV cache ((rows, n_kv, max_len, hd) with batch and head strides kv_b and kv_h, from the step's first row).
typedef struct {
    int32_t kind, w_kind, norm_kind, bits, gemma2, sliding;
    int64_t hidden, inter, n_heads, n_kv, hd, group;
    float eps, scale, cap;
    const void *norms[4];  // input, post-attention, pre- and post-feedforward (Gemma 2)
    const void *w[7];      // q, k, v, o, gate, up, down
    const uint16_t *s[7];
    uint16_t *k_cache, *v_cache;
    int64_t max_len, kv_b, kv_h;
} Layer;

// The seconds decode_layers has spent in its products in this process: benchmarks/bench_step.py splits a step's
// time by it.
static double product_seconds;
double decode_product_seconds(void) { return product_seconds; }

// ys[i] = x (m, cols) times weights first .. first + n - 1 of the layer transposed, rounded to its kind.
static void layer_product(const Layer *L, int first, int n, const void *x, int64_t m, int64_t cols, void **ys,
                          const int64_t *rows) {
    double start = omp_get_wtime();
    if (L->bits)
        gemv_quant(n, (const uint8_t *const *)(L->w + first), L->s + first, ys, rows, x, m, cols, L->group, L->bits,
                   L->kind, L->kind);
    else
        gemv(n, L->w + first, ys, rows, x, m, cols, L->w_kind, L->kind, L->kind);
    product_seconds += omp_get_wtime() - start;
}

// x += h, n values of the kind, each sum rounded once (PyTorch's half-precision add).
static void add_into(void *x, const void *h, int64_t n, int kind) {
    int64_t i = 0;
    for (; i + WIDTH <= n; i += WIDTH) store_kind(x, kind, i, vadd(load_kind(x, kind, i), load_kind(h, kind, i)));
    for (; i < n; i++) write_kind(x, kind, i, read_kind(x, kind, i) + read_kind(h, kind, i));
}

// x = the layer applied to x (B rows of hidden values, one position each), in place, as modeling_gemma's
// GemmaDecoderLayer computes it with the CPU modules of kernels.py, step by step and rounding for rounding: norm,
// q k v, attend_step (its arguments as there), o, the residual add (Gemma 2: of the normed o), norm, gate and up,
// gelu_tanh(gate) * up, down, the residual add. work: room for B (2 hidden + 3 heads x hd + 2 kv x hd + 2 inter)
// values.
static void decode_layer(const Layer *L, void *x, int64_t B, const uint16_t *cos, const uint16_t *sin,
                         const int64_t *pos, const uint8_t *mask, int64_t T, int64_t mask_b, uint16_t *work) {
    int64_t H = L->hidden, Q = L->n_heads * L->hd, KV = L->n_kv * L->hd, I = L->inter;
    uint16_t *h = work, *q = h + B * H, *k = q + B * Q, *v = k + B * KV, *att = v + B * KV, *o = att + B * Q;
    uint16_t *gate = o + B * H, *up = gate + B * I, *q_rot = up + B * I;
    void *qkv[3] = {q, k, v}, *ys[1] = {o}, *gate_up[2] = {gate, up};
    int64_t qkv_rows[3] = {Q, KV, KV}, h_rows[1] = {H}, i_rows[2] = {I, I};
    rms_norm(x, L->norms[0], h, B, H, L->eps, L->kind, L->norm_kind);
    layer_product(L, 0, 3, h, B, H, qkv, qkv_rows);
    attend_step(q, k, v, cos, sin, pos, L->k_cache, L->v_cache, mask, att, B, L->n_heads, L->n_kv, T, L->hd, L->kv_b,
                L->kv_h, mask_b, L->scale, L->cap, L->kind, q_rot);
    layer_product(L, 3, 1, att, B, Q, ys, h_rows);
    if (L->gemma2) rms_norm(o, L->norms[1], o, B, H, L->eps, L->kind, L->norm_kind);
    add_into(x, o, B * H, L->kind);
    rms_norm(x, L->norms[L->gemma2 ? 2 : 1], h, B, H, L->eps, L->kind, L->norm_kind);
    layer_product(L, 4, 2, h, B, H, gate_up, i_rows);
    gelu_tanh_mul(gate, I, up, I, gate, B, I, L->kind);
    layer_product(L, 6, 1, gate, B, I, ys, h_rows);
    if (L->gemma2) rms_norm(o, L->norms[3], o, B, H, L->eps, L->kind, L->norm_kind);
    add_into(x, o, B * H, L->kind);
}

// out = the n_layers layers applied to x (B rows of one position each) in turn: a decode step's decoder in one call,
// where PyTorch would take some hundred operations and Python calls a layer. cos and sin (B, hd), this step's
// rotary angles; pos (B,), each row's cache position; mask and sliding (B, T) with batch stride mask_b, what full
// and sliding layers may read. Returns 0, or -1 where a position is outside the caches (then no cache was written).
int64_t decode_layers(int64_t n_layers, const Layer *layers, const void *x, void *out, int64_t B,
                      const uint16_t *cos, const uint16_t *sin, const int64_t *pos, const uint8_t *mask,
                      const uint8_t *sliding, int64_t T, int64_t mask_b) {
    for (int64_t i = 0; i < n_layers; i++)
        for (int64_t b = 0; b < B; b++)
            if (pos[b] < 0 || pos[b] >= layers[i].max_len) return -1;
    const Layer *L = layers;
    int64_t Q = L->n_heads * L->hd, KV = L->n_kv * L->hd;
    uint16_t *work = malloc(B * (2 * L->hidden + 3 * Q + 2 * KV + 2 * L->inter) * sizeof(uint16_t));
    memcpy(out, x, B * L->hidden * sizeof(uint16_t));
    for (int64_t i = 0; i < n_layers; i++)
        decode_layer(layers + i, out, B, cos, sin, pos, layers[i].sliding ? sliding : mask, T, mask_b, work);
    free(work);
    return 0;
}
