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
