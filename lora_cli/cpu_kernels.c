/* CPU kernels for the bf16 training step that PyTorch runs as many small passes (see cpu_kernels.py).
 *
 * Plain C with no PyTorch headers, so that it compiles in under a second. bf16 values are handled as
 * their 16 bits: widening to fp32 is a shift, narrowing rounds to nearest even as PyTorch does. Each
 * kernel loops over rows in parallel with OpenMP; loaded into a process where PyTorch already runs,
 * that is PyTorch's own OpenMP runtime and threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static inline float widen(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}

static inline uint16_t narrow(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    uint16_t rounded = (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    return value != value ? (uint16_t)0x7FC0 : rounded; /* a NaN stays a NaN (rounding could carry it to inf) */
}

/* Sums in LANES independent partial sums, which the compiler turns into vector registers without being
 * allowed to reorder float additions itself. */
#define LANES 16

/* transformers' LlamaRMSNorm for bf16 x and weight: out = bf16(weight * bf16(x * r)), r = 1/sqrt(mean(x^2) + eps)
 * in fp32. inverse_rms (one float per row) is kept for the backward. */
void rms_norm_forward(const uint16_t *x, const uint16_t *weight, uint16_t *out, float *inverse_rms,
                      int64_t rows, int64_t width, float eps, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t row = 0; row < rows; row++) {
        const uint16_t *in = x + row * width;
        uint16_t *result = out + row * width;
        float partial[LANES] = {0};
        int64_t i = 0;
        for (; i + LANES <= width; i += LANES)
            for (int lane = 0; lane < LANES; lane++) {
                float value = widen(in[i + lane]);
                partial[lane] += value * value;
            }
        float sum = 0.0f;
        for (; i < width; i++)
            sum += widen(in[i]) * widen(in[i]);
        for (int lane = 0; lane < LANES; lane++)
            sum += partial[lane];
        float r = 1.0f / sqrtf(sum / (float)width + eps);
        inverse_rms[row] = r;
        for (int64_t j = 0; j < width; j++)
            result[j] = narrow(widen(weight[j]) * widen(narrow(widen(in[j]) * r)));
    }
}

/* Its input gradient, in fp32 from the bf16 input: with g' = grad * weight and n = x * r,
 * grad_x = r * (g' - n * mean(g' * n)). */
void rms_norm_backward(const uint16_t *grad, const uint16_t *x, const float *inverse_rms, const uint16_t *weight,
                       uint16_t *grad_x, int64_t rows, int64_t width, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t row = 0; row < rows; row++) {
        const uint16_t *g = grad + row * width, *in = x + row * width;
        uint16_t *result = grad_x + row * width;
        float r = inverse_rms[row];
        float partial[LANES] = {0};
        int64_t i = 0;
        for (; i + LANES <= width; i += LANES)
            for (int lane = 0; lane < LANES; lane++)
                partial[lane] += widen(g[i + lane]) * widen(weight[i + lane]) * (widen(in[i + lane]) * r);
        float sum = 0.0f;
        for (; i < width; i++)
            sum += widen(g[i]) * widen(weight[i]) * (widen(in[i]) * r);
        for (int lane = 0; lane < LANES; lane++)
            sum += partial[lane];
        float mean = sum / (float)width;
        for (int64_t j = 0; j < width; j++) {
            float scaled = widen(g[j]) * widen(weight[j]);
            result[j] = narrow((scaled - widen(in[j]) * r * mean) * r);
        }
    }
}

/* e^x written so that the compiler can vectorize it (a call to expf stops it, short of -ffast-math):
 * Cephes' expf, x = n ln2 + r with a degree-5 polynomial for e^r, within 2 ulp of expf. Above 88.72 it is
 * inf and below -87.34 it is 0, as expf; 2^n is applied as two factors, each a normal float. */
static inline float exp_vectorizable(float x) {
    float clamped = x < -87.3365479f ? -87.3365479f : (x > 88.7228394f ? 88.7228394f : x);
    float shifted = clamped * 1.44269504088896341f + 12582912.0f; /* adding 1.5 * 2^23 rounds to an integer */
    float n = shifted - 12582912.0f;
    int32_t shifted_bits;
    memcpy(&shifted_bits, &shifted, sizeof shifted_bits);
    int32_t exponent = shifted_bits - 0x4B400000; /* n as an integer, from the low bits: -126 to 128 */
    float r = clamped - n * 0.693359375f - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * r * r + r + 1.0f;
    int32_t first = exponent / 2, second = exponent - first;
    uint32_t first_bits = (uint32_t)(first + 127) << 23, second_bits = (uint32_t)(second + 127) << 23;
    float first_scale, second_scale;
    memcpy(&first_scale, &first_bits, sizeof first_scale);
    memcpy(&second_scale, &second_bits, sizeof second_scale);
    y = y * first_scale * second_scale;
    return x > 88.7228394f ? INFINITY : (x < -87.3365479f ? 0.0f : y);
}

/* Elements per OpenMP work item for the elementwise kernels: large enough to vectorize, small enough to share. */
#define BLOCK 4096

/* LlamaMLP's act_fn(gate) * up for SiLU, in bf16 as PyTorch rounds it: out = bf16(bf16(silu(gate)) * up). */
void swiglu_forward(const uint16_t *gate, const uint16_t *up, uint16_t *out, int64_t count, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t start = 0; start < count; start += BLOCK) {
        int64_t end = start + BLOCK < count ? start + BLOCK : count;
        for (int64_t i = start; i < end; i++) {
            float g = widen(gate[i]);
            out[i] = narrow(widen(narrow(g / (1.0f + exp_vectorizable(-g)))) * widen(up[i]));
        }
    }
}

/* Its gradients as PyTorch's autograd computes them: grad_up = bf16(grad * bf16(silu(gate))), and
 * grad_gate = silu'(gate) * bf16(grad * up), with silu'(g) = s (1 + g (1 - s)), s = sigmoid(g), in fp32. */
void swiglu_backward(const uint16_t *grad, const uint16_t *gate, const uint16_t *up, uint16_t *grad_gate,
                     uint16_t *grad_up, int64_t count, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t start = 0; start < count; start += BLOCK) {
        int64_t end = start + BLOCK < count ? start + BLOCK : count;
        for (int64_t i = start; i < end; i++) {
            float g = widen(gate[i]), d = widen(grad[i]);
            float e = exp_vectorizable(-g);
            float sigmoid = 1.0f / (1.0f + e);
            grad_up[i] = narrow(d * widen(narrow(g / (1.0f + e))));
            /* in PyTorch's order: (dy * s) * (1 + g (1 - s)) */
            grad_gate[i] = narrow(widen(narrow(d * widen(up[i]))) * sigmoid * (1.0f + g * (1.0f - sigmoid)));
        }
    }
}

/* The rotary embedding as lora_cli/fused_layers.py writes it: out = x * cos + roll(x) * sin, roll swapping
 * the two halves of the last dim (rotate_half's sign folded into sin by the caller), x * cos rounded to
 * bf16 first as PyTorch's `addcmul(x * cos, roll(x), sin)` does. x and out are (batch, heads, length, dim)
 * with any strides but a contiguous last dim (the projections' (batch, length, heads, dim) layout seen
 * transposed); cos and sin are contiguous (length, dim) blocks, one per batch row or one shared
 * (cos_batch_stride 0). */
void rotary(const uint16_t *x, int64_t x_batch, int64_t x_head, int64_t x_position, const uint16_t *cos,
            const uint16_t *sin, int64_t cos_batch_stride, uint16_t *out, int64_t out_batch, int64_t out_head,
            int64_t out_position, int64_t batch, int64_t heads, int64_t length, int64_t dim, int threads) {
    int64_t half = dim / 2;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t item = 0; item < batch * length; item++) {
        int64_t b = item / length, position = item % length;
        const uint16_t *c = cos + b * cos_batch_stride + position * dim;
        const uint16_t *s = sin + b * cos_batch_stride + position * dim;
        for (int64_t h = 0; h < heads; h++) {
            const uint16_t *in = x + b * x_batch + h * x_head + position * x_position;
            uint16_t *result = out + b * out_batch + h * out_head + position * out_position;
            for (int64_t d = 0; d < half; d++)
                result[d] = narrow(widen(narrow(widen(in[d]) * widen(c[d]))) + widen(in[d + half]) * widen(s[d]));
            for (int64_t d = half; d < dim; d++)
                result[d] = narrow(widen(narrow(widen(in[d]) * widen(c[d]))) + widen(in[d - half]) * widen(s[d]));
        }
    }
}

/* ---- Attention within the examples of a packed row -------------------------------------------------------
 *
 * PyTorch runs each example's causal attention as batched matmuls over the whole square of scores (half of it
 * masked), a softmax and their backwards: a dozen kernels per example and layer, each paying oneDNN's set-up on
 * 64-wide heads. Here one call does a packed row's forward and one its backward, causal blocks only, in fp32 from
 * the bf16 inputs (PyTorch rounds the scores and probabilities to bf16 between its kernels). The backward
 * recomputes the probabilities from the forward's log-sum-exp, as FlashAttention does, so only the output and one
 * float per row and head are kept.
 *
 * The products are register-blocked for the compiler's vectors (GCC's vector extension, so no intrinsics):
 * 8 query rows x 32 keys for the scores, 6 rows x 64 dims for the weighted sums; keys are copied once into
 * panels of 32 transposed keys so that a block reads them in order. Only this section contracts a * b + c into
 * fused multiply-adds: the kernels above keep PyTorch's roundings. */
#if defined(__clang__)
#pragma clang fp contract(fast)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=fast")
#endif

typedef float vec __attribute__((vector_size(64)));
#define VW 16     /* floats in a vec */
#define KEYS 32   /* keys in a score block: two vecs, and the width of a key panel */
#define SROWS 8   /* query rows in a score block */
#define WROWS 6   /* rows in a weighted-sum block */
#define TILE 24   /* query rows (or keys) in one work item: a multiple of SROWS and of WROWS */
#define CHUNK 64  /* head dims in a weighted-sum block: four vecs */

static inline vec vload(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vec v) { memcpy(p, &v, sizeof v); }
static inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }
static inline int64_t smaller(int64_t a, int64_t b) { return a < b ? a : b; }

/* This thread's number in an OpenMP team (0 where the kernels were built without OpenMP). */
static inline int thread_number(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* The largest of n floats, and their sum, in LANES partial results the compiler can keep in a vector. */
static float row_max(const float *x, int64_t n) {
    float partial[LANES];
    for (int lane = 0; lane < LANES; lane++)
        partial[lane] = -INFINITY;
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int lane = 0; lane < LANES; lane++)
            partial[lane] = x[i + lane] > partial[lane] ? x[i + lane] : partial[lane];
    float result = -INFINITY;
    for (; i < n; i++)
        result = x[i] > result ? x[i] : result;
    for (int lane = 0; lane < LANES; lane++)
        result = partial[lane] > result ? partial[lane] : result;
    return result;
}

static float row_sum(const float *x, int64_t n) {
    float partial[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int lane = 0; lane < LANES; lane++)
            partial[lane] += x[i + lane];
    float result = 0.0f;
    for (; i < n; i++)
        result += x[i];
    for (int lane = 0; lane < LANES; lane++)
        result += partial[lane];
    return result;
}

/* scores[r][j] = sum_d rows[r][d] * key_j[d] for SROWS rows (row stride dim) and keys 0..keys-1, keys a
 * multiple of KEYS, from key panels: [keys / KEYS][dim][KEYS], each block of KEYS keys transposed. */
static void score_block(const float *rows, int64_t dim, const float *panels, int64_t keys, float *scores,
                        int64_t score_stride) {
    for (int64_t j = 0; j < keys; j += KEYS) {
        const float *panel = panels + j * dim;
        vec a[SROWS][2];
        for (int r = 0; r < SROWS; r++)
            a[r][0] = a[r][1] = (vec){0};
        for (int64_t d = 0; d < dim; d++) {
            vec c0 = vload(panel + d * KEYS), c1 = vload(panel + d * KEYS + VW);
            for (int r = 0; r < SROWS; r++) {
                float x = rows[r * dim + d];
                a[r][0] += x * c0;
                a[r][1] += x * c1;
            }
        }
        for (int r = 0; r < SROWS; r++) {
            vstore(scores + r * score_stride + j, a[r][0]);
            vstore(scores + r * score_stride + j + VW, a[r][1]);
        }
    }
}

/* out[r] = sum_{j < count} weights[j * weight_step + r * weight_stride] * values[j] for WROWS rows r of out
 * (each a row of dim floats), added to what out holds where `accumulate`. With weight_step 1, the weights of
 * out row r are row r of a matrix (P v); with weight_stride 1, its column r (P^T v). */
static void weighted_sum(const float *weights, int64_t weight_step, int64_t weight_stride, const float *values,
                         int64_t value_stride, int64_t count, int64_t dim, float *out, int64_t out_stride,
                         int accumulate) {
    for (int64_t c = 0; c < dim; c += CHUNK) {
        vec a[WROWS][4];
        for (int r = 0; r < WROWS; r++)
            for (int k = 0; k < 4; k++)
                a[r][k] = accumulate ? vload(out + r * out_stride + c + k * VW) : (vec){0};
        for (int64_t j = 0; j < count; j++) {
            const float *v = values + j * value_stride + c;
            vec v0 = vload(v), v1 = vload(v + VW), v2 = vload(v + 2 * VW), v3 = vload(v + 3 * VW);
            const float *w = weights + j * weight_step;
            for (int r = 0; r < WROWS; r++) {
                float x = w[r * weight_stride];
                a[r][0] += x * v0;
                a[r][1] += x * v1;
                a[r][2] += x * v2;
                a[r][3] += x * v3;
            }
        }
        for (int r = 0; r < WROWS; r++)
            for (int k = 0; k < 4; k++)
                vstore(out + r * out_stride + c + k * VW, a[r][k]);
    }
}

/* Key panels for score_block, one set per example and kv head: panels[kv][example's first panel + j / KEYS][d][j % KEYS],
 * zero past each example's end. panel_starts[e]: example e's first key slot (a multiple of KEYS). */
static void make_panels(const uint16_t *x, int64_t x_token, int64_t x_head, const int64_t *starts,
                        const int64_t *panel_starts, int64_t examples, int64_t kv_heads, int64_t dim, float *panels,
                        int threads) {
    int64_t slots = panel_starts[examples];
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t block = 0; block < kv_heads * (slots / KEYS); block++) {
        int64_t kv = block / (slots / KEYS), slot = (block % (slots / KEYS)) * KEYS, e = 0;
        while (panel_starts[e + 1] <= slot)
            e++;
        float *panel = panels + (kv * slots + slot) * dim;
        for (int64_t j = 0; j < KEYS; j++) {
            int64_t position = slot - panel_starts[e] + j;
            if (position >= starts[e + 1] - starts[e]) {  /* past the example's end */
                for (int64_t d = 0; d < dim; d++)
                    panel[d * KEYS + j] = 0.0f;
                continue;
            }
            const uint16_t *row = x + (starts[e] + position) * x_token + kv * x_head;
            for (int64_t d = 0; d < dim; d++)
                panel[d * KEYS + j] = widen(row[d]);
        }
    }
}

/* A work item's rows: TILE rows of (tokens, heads, dim)-strided bf16 from `first`, times scale, zero past `count`. */
static void load_rows(const uint16_t *x, int64_t x_token, int64_t x_head, int64_t first, int64_t count, int64_t head,
                      int64_t dim, float scale, float *rows) {
    for (int64_t r = 0; r < count; r++)
        for (int64_t d = 0; d < dim; d++)
            rows[r * dim + d] = widen(x[(first + r) * x_token + head * x_head + d]) * scale;
    memset(rows + count * dim, 0, (size_t)((TILE - count) * dim) * sizeof(float));
}

/* Each example's first key slot in the panels (its length rounded up to KEYS); returns the slots in all. */
static int64_t panel_offsets(const int64_t *starts, int64_t examples, int64_t *panel_starts) {
    panel_starts[0] = 0;
    for (int64_t e = 0; e < examples; e++)
        panel_starts[e + 1] = panel_starts[e] + round_up(starts[e + 1] - starts[e], KEYS);
    return panel_starts[examples];
}

/* One work item: TILE query rows (or keys) from `first` of one example, for one head (or kv head). */
typedef struct {
    int64_t example, head, first, cost;
} work_item;

static int costlier_first(const void *a, const void *b) {
    int64_t x = ((const work_item *)a)->cost, y = ((const work_item *)b)->cost;
    return (x < y) - (x > y);
}

/* The row's work items for `heads` heads, the costliest first, so that the threads finish together:
 * a query tile costs the keys it sees, a key tile the queries that see it (keys_side). */
static int64_t list_items(const int64_t *starts, int64_t examples, int64_t heads, int keys_side, work_item *items) {
    int64_t count = 0;
    for (int64_t e = 0; e < examples; e++) {
        int64_t length = starts[e + 1] - starts[e];
        for (int64_t first = 0; first < length; first += TILE)
            for (int64_t h = 0; h < heads; h++) {
                int64_t rows = smaller(length - first, TILE);
                items[count++] = (work_item){e, h, first, rows * (keys_side ? length - first : first + rows)};
            }
    }
    qsort(items, (size_t)count, sizeof(work_item), costlier_first);
    return count;
}

static int64_t most_items(const int64_t *starts, int64_t examples, int64_t heads) {
    return (starts[examples] / TILE + examples) * heads;
}

static int64_t longest_example(const int64_t *starts, int64_t examples) {
    int64_t longest = 0;
    for (int64_t e = 0; e < examples; e++)
        longest = starts[e + 1] - starts[e] > longest ? starts[e + 1] - starts[e] : longest;
    return longest;
}

/* A row of scores turned into probabilities in place: softmax over keys 0..visible-1, zero from there to `end`;
 * returns the log-sum-exp. */
static float softmax_row(float *s, int64_t visible, int64_t end) {
    float peak = row_max(s, visible), partial[LANES] = {0}, sum = 0.0f;
    int64_t j = 0;
    for (; j + LANES <= visible; j += LANES)
        for (int lane = 0; lane < LANES; lane++) {
            s[j + lane] = exp_vectorizable(s[j + lane] - peak);
            partial[lane] += s[j + lane];
        }
    for (; j < visible; j++) {
        s[j] = exp_vectorizable(s[j] - peak);
        sum += s[j];
    }
    for (int lane = 0; lane < LANES; lane++)
        sum += partial[lane];
    float inverse = 1.0f / sum;
    for (j = 0; j < visible; j++)
        s[j] *= inverse;
    for (j = visible; j < end; j++)
        s[j] = 0.0f;
    return peak + logf(sum);
}

/* Causal attention within each example of a packed row: softmax(scale * q k^T) v, in fp32 from bf16.
 * q: (tokens, heads, dim) at strides q_token, q_head (dim contiguous); k, v likewise with kv_heads (query head
 * h reads kv head h / (heads / kv_heads)). starts: the examples' first tokens and the row's end (examples + 1).
 * out: (tokens, heads, dim) contiguous bf16; lse: (heads, tokens), each row's log-sum-exp, for the backward.
 * dim a multiple of CHUNK. Returns 0, or -1 where memory for its buffers ran out. */
int attention_forward(const uint16_t *q, int64_t q_token, int64_t q_head, const uint16_t *k, int64_t k_token,
                      int64_t k_head, const uint16_t *v, int64_t v_token, int64_t v_head, const int64_t *starts,
                      int64_t examples, int64_t heads, int64_t kv_heads, int64_t dim, float scale, uint16_t *out,
                      float *lse, int threads) {
    int64_t tokens = starts[examples], group = heads / kv_heads, longest = longest_example(starts, examples);
    int64_t slots = 0, score_stride = round_up(longest, KEYS), per_thread = 2 * TILE * dim + TILE * score_stride;
    int status = -1;
    int64_t *panel_starts = malloc((size_t)(examples + 1) * sizeof(int64_t));
    if (panel_starts)
        slots = panel_offsets(starts, examples, panel_starts);
    float *key_panels = malloc((size_t)(kv_heads * slots * dim) * sizeof(float));
    float *values = malloc((size_t)(kv_heads * tokens * dim) * sizeof(float)); /* [kv][t][d] */
    float *workspace = malloc((size_t)(threads * per_thread) * sizeof(float));
    work_item *items = malloc((size_t)most_items(starts, examples, heads) * sizeof(work_item));
    if (!panel_starts || !key_panels || !values || !workspace || !items)
        goto done;
    int64_t item_count = list_items(starts, examples, heads, 0, items);
    make_panels(k, k_token, k_head, starts, panel_starts, examples, kv_heads, dim, key_panels, threads);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t h = 0; h < kv_heads; h++)
            for (int64_t d = 0; d < dim; d++)
                values[(h * tokens + t) * dim + d] = widen(v[t * v_token + h * v_head + d]);
    #pragma omp parallel num_threads(threads)
    {
        float *rows = workspace + thread_number() * per_thread, *result = rows + TILE * dim;
        float *scores = result + TILE * dim;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < item_count; i++) {
            int64_t e = items[i].example, h = items[i].head, first = items[i].first, kv = h / group;
            int64_t start = starts[e], count = smaller(starts[e + 1] - start - first, TILE);
            int64_t seen = round_up(first + count, KEYS);
            load_rows(q, q_token, q_head, start + first, count, h, dim, scale, rows);
            for (int64_t r = 0; r < count; r += SROWS)  /* each block of rows up to the keys its last row sees */
                score_block(rows + r * dim, dim, key_panels + (kv * slots + panel_starts[e]) * dim,
                            round_up(first + smaller(r + SROWS, count), KEYS), scores + r * score_stride,
                            score_stride);
            for (int64_t r = 0; r < count; r++)  /* query first + r sees keys 0..first + r */
                lse[h * tokens + start + first + r] = softmax_row(scores + r * score_stride, first + r + 1, seen);
            for (int64_t r = 0; r < count; r += WROWS)
                weighted_sum(scores + r * score_stride, 1, score_stride, values + (kv * tokens + start) * dim, dim,
                             first + smaller(r + WROWS, count), dim, result + r * dim, dim, 0);
            for (int64_t r = 0; r < count; r++)
                for (int64_t d = 0; d < dim; d++)
                    out[((start + first + r) * heads + h) * dim + d] = narrow(result[r * dim + d]);
        }
    }
    status = 0;
done:
    free(panel_starts);
    free(key_panels);
    free(values);
    free(workspace);
    free(items);
    return status;
}

/* The gradients of attention_forward, from its inputs, its out and lse, and the gradient of out (grad, contiguous
 * like out). grad_q: (tokens, heads, dim), grad_k and grad_v: (tokens, kv_heads, dim), all contiguous bf16.
 * Returns 0, or -1 where memory for its buffers ran out. */
int attention_backward(const uint16_t *grad, const uint16_t *q, int64_t q_token, int64_t q_head, const uint16_t *k,
                       int64_t k_token, int64_t k_head, const uint16_t *v, int64_t v_token, int64_t v_head,
                       const uint16_t *out, const float *lse, const int64_t *starts, int64_t examples, int64_t heads,
                       int64_t kv_heads, int64_t dim, float scale, uint16_t *grad_q, uint16_t *grad_k,
                       uint16_t *grad_v, int threads) {
    int64_t tokens = starts[examples], group = heads / kv_heads, slots = 0, scratch = 0;
    int status = -1;
    int64_t *panel_starts = malloc((size_t)(examples + 1) * sizeof(int64_t));
    /* each example's probabilities and score gradients, [h][query][key], rows padded to whole tiles */
    int64_t *block_starts = malloc((size_t)(examples + 1) * sizeof(int64_t));
    if (panel_starts && block_starts) {
        slots = panel_offsets(starts, examples, panel_starts);
        block_starts[0] = 0;
        for (int64_t e = 0; e < examples; e++) {
            int64_t length = starts[e + 1] - starts[e];
            block_starts[e + 1] = block_starts[e] + heads * round_up(length, TILE) * (round_up(length, KEYS) + KEYS);
        }
        scratch = block_starts[examples];
    }
    float *key_panels = malloc((size_t)(kv_heads * slots * dim) * sizeof(float));
    float *value_panels = malloc((size_t)(kv_heads * slots * dim) * sizeof(float));
    /* padded by TILE rows: a last tile's rows past the row's end are read (their weights are zero) */
    float *queries = malloc((size_t)(heads * tokens * dim + TILE * dim) * sizeof(float)); /* [h][t][d], scaled */
    float *grads = malloc((size_t)(heads * tokens * dim + TILE * dim) * sizeof(float));   /* [h][t][d] */
    float *keys = malloc((size_t)(kv_heads * tokens * dim) * sizeof(float));              /* [kv][t][d] */
    float *deltas = malloc((size_t)(heads * tokens) * sizeof(float));  /* rowsum(grad * out) */
    float *probs = malloc((size_t)scratch * sizeof(float));
    float *dscores = malloc((size_t)scratch * sizeof(float));
    float *workspace = malloc((size_t)(threads * 2 * TILE * dim) * sizeof(float));
    work_item *items = malloc((size_t)most_items(starts, examples, heads) * sizeof(work_item));
    if (!panel_starts || !block_starts || !key_panels || !value_panels || !queries || !grads || !keys || !deltas
            || !probs || !dscores || !workspace || !items)
        goto done;
    make_panels(k, k_token, k_head, starts, panel_starts, examples, kv_heads, dim, key_panels, threads);
    make_panels(v, v_token, v_head, starts, panel_starts, examples, kv_heads, dim, value_panels, threads);
    memset(queries + heads * tokens * dim, 0, (size_t)(TILE * dim) * sizeof(float));
    memset(grads + heads * tokens * dim, 0, (size_t)(TILE * dim) * sizeof(float));
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tokens; t++) {
        for (int64_t h = 0; h < heads; h++) {
            float *g = grads + (h * tokens + t) * dim, *products = queries + (h * tokens + t) * dim;
            for (int64_t d = 0; d < dim; d++) {  /* the query row holds grad * out until the sum is taken */
                g[d] = widen(grad[(t * heads + h) * dim + d]);
                products[d] = g[d] * widen(out[(t * heads + h) * dim + d]);
            }
            deltas[h * tokens + t] = row_sum(products, dim);
            for (int64_t d = 0; d < dim; d++)
                products[d] = widen(q[t * q_token + h * q_head + d]) * scale;
        }
        for (int64_t h = 0; h < kv_heads; h++)
            for (int64_t d = 0; d < dim; d++)
                keys[(h * tokens + t) * dim + d] = widen(k[t * k_token + h * k_head + d]);
    }
    /* the queries' side: probabilities and score gradients, and the queries' gradients */
    int64_t item_count = list_items(starts, examples, heads, 0, items);
    #pragma omp parallel num_threads(threads)
    {
        float *result = workspace + thread_number() * 2 * TILE * dim;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < item_count; i++) {
            int64_t e = items[i].example, h = items[i].head, first = items[i].first, kv = h / group;
            int64_t start = starts[e], length = starts[e + 1] - start, count = smaller(length - first, TILE);
            int64_t stride = round_up(length, KEYS) + KEYS, span = round_up(length, TILE);
            float *p = probs + block_starts[e] + (h * span + first) * stride;
            float *ds = dscores + block_starts[e] + (h * span + first) * stride;
            const float *query_rows = queries + (h * tokens + start + first) * dim;
            const float *grad_rows = grads + (h * tokens + start + first) * dim;
            for (int64_t r = 0; r < count; r += SROWS) {
                int64_t seen = round_up(first + smaller(r + SROWS, count), KEYS);
                score_block(query_rows + r * dim, dim, key_panels + (kv * slots + panel_starts[e]) * dim, seen,
                            p + r * stride, stride);
                score_block(grad_rows + r * dim, dim, value_panels + (kv * slots + panel_starts[e]) * dim, seen,
                            ds + r * stride, stride);
            }
            for (int64_t r = 0; r < count; r++) {
                float *pr = p + r * stride, *dr = ds + r * stride;
                int64_t visible = first + r + 1;
                float shift = lse[h * tokens + start + first + r], delta = deltas[h * tokens + start + first + r];
                for (int64_t j = 0; j < visible; j++) {
                    float prob = exp_vectorizable(pr[j] - shift);
                    pr[j] = prob;
                    dr[j] = prob * (dr[j] - delta);
                }
                for (int64_t j = visible; j < stride; j++)
                    pr[j] = dr[j] = 0.0f;
            }
            for (int64_t r = 0; r < count; r += WROWS)
                weighted_sum(ds + r * stride, 1, stride, keys + (kv * tokens + start) * dim, dim,
                             first + smaller(r + WROWS, count), dim, result + r * dim, dim, 0);
            for (int64_t r = 0; r < count; r++)
                for (int64_t d = 0; d < dim; d++)
                    grad_q[((start + first + r) * heads + h) * dim + d] = narrow(result[r * dim + d] * scale);
        }
    }
    /* the keys' side: the keys' and values' gradients */
    item_count = list_items(starts, examples, kv_heads, 1, items);
    #pragma omp parallel num_threads(threads)
    {
        float *result = workspace + thread_number() * 2 * TILE * dim;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < item_count; i++) {
            int64_t e = items[i].example, kv = items[i].head, first = items[i].first;
            int64_t start = starts[e], length = starts[e + 1] - start, count = smaller(length - first, TILE);
            int64_t stride = round_up(length, KEYS) + KEYS, span = round_up(length, TILE);
            for (int64_t j = 0; j < count; j += WROWS) {
                /* key first + j + r is seen by the queries from first + j + r on: the sums start at first + j
                 * (the weights of the queries before a key are zero) */
                int64_t from = first + j;
                for (int64_t g = 0; g < group; g++) {
                    int64_t h = kv * group + g, offset = block_starts[e] + (h * span + from) * stride + from;
                    weighted_sum(probs + offset, stride, 1, grads + (h * tokens + start + from) * dim, dim,
                                 length - from, dim, result + j * dim, dim, g > 0);
                    weighted_sum(dscores + offset, stride, 1, queries + (h * tokens + start + from) * dim, dim,
                                 length - from, dim, result + (TILE + j) * dim, dim, g > 0);
                }
            }
            for (int64_t r = 0; r < count; r++)
                for (int64_t d = 0; d < dim; d++) {
                    grad_v[((start + first + r) * kv_heads + kv) * dim + d] = narrow(result[r * dim + d]);
                    grad_k[((start + first + r) * kv_heads + kv) * dim + d] = narrow(result[(TILE + r) * dim + d]);
                }
        }
    }
    status = 0;
done:
    free(panel_starts);
    free(block_starts);
    free(key_panels);
    free(value_panels);
    free(queries);
    free(grads);
    free(keys);
    free(deltas);
    free(probs);
    free(dscores);
    free(workspace);
    free(items);
    return status;
}
