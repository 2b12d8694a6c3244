/* CPU kernels for the bf16 training step that PyTorch runs as many small passes (see cpu_kernels.py).
 *
 * Plain C with no PyTorch headers, so that it compiles in under a second. bf16 values are handled as
 * their 16 bits: widening to fp32 is a shift, narrowing rounds to nearest even as PyTorch does. Each
 * kernel loops over rows in parallel with OpenMP; loaded into a process where PyTorch already runs,
 * that is PyTorch's own OpenMP runtime and threads.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

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
