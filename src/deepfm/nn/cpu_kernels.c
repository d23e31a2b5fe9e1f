/* Fused CPU kernels of the training step (deepfm/nn/cpu_kernels.py builds and loads them).
 *
 * Each kernel computes exactly what its PyTorch reference in cpu_kernels.py computes, bit for
 * bit: one multiply per element at most (no contraction into FMA: built with
 * -ffp-contract=off), integer hashing with wrapping unsigned arithmetic, and sums in index
 * order. Threads come from the OpenMP runtime PyTorch has already loaded (same pool, same
 * torch.set_num_threads).
 */
#include <stdint.h>
#include <string.h>

int omp_get_num_threads(void);
int omp_get_thread_num(void);

/* splitmix64's output function: a bijective 64-bit mixer (Steele et al., 2014). Word w of the
 * stream with key k is mix(k + (w + 1) * golden): a counter-based generator, so any thread
 * can draw any word. */
static inline uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

#define GOLDEN 0x9E3779B97F4A7C15ULL
#define LANES 2 /* 32-bit lanes per 64-bit word: one lane decides one element */

#define CHUNK 1024 /* words per block: the draws of a block stay in L1 */

/* Element i of a dropout stream is kept when its signed 32-bit draw is >= cut: lane i%2 (bits
 * 32*(i%2)...) of word i/2, that is element i of the words read as little-endian int32. Blocks
 * of words are drawn into a buffer, then applied: two simple loops the compiler vectorises.
 * OUT(x, kept) is the output of one element. */
#define DROPOUT_KERNEL(NAME, OUT)                                                             \
    void NAME(const float *in, float *out, int64_t n, uint64_t key, int64_t cut, float scale) { \
        const int64_t words = (n + LANES - 1) / LANES;                                        \
        const int64_t blocks = (words + CHUNK - 1) / CHUNK;                                   \
        const int none = cut > INT32_MAX; /* p = 1: every unit dropped */                     \
        const int32_t cut32 = none ? INT32_MAX : (int32_t)cut;                                \
        _Pragma("omp parallel for schedule(static)")                                         \
        for (int64_t block = 0; block < blocks; ++block) {                                    \
            uint64_t bits[CHUNK];                                                             \
            int32_t draws[CHUNK * LANES];                                                     \
            const int64_t first = block * CHUNK;                                              \
            const int64_t count = words - first < CHUNK ? words - first : CHUNK;              \
            for (int64_t w = 0; w < count; ++w)                                               \
                bits[w] = mix(key + (uint64_t)(first + w + 1) * GOLDEN);                      \
            memcpy(draws, bits, sizeof(draws));                                               \
            const int64_t begin = first * LANES;                                              \
            const int64_t end = begin + count * LANES < n ? begin + count * LANES : n;        \
            for (int64_t i = begin; i < end; ++i) {                                           \
                const float x = in[i];                                                        \
                const int kept = !none && draws[i - begin] >= cut32;                          \
                out[i] = OUT;                                                                 \
            }                                                                                 \
        }                                                                                     \
    }

/* out = x * scale where kept, else 0. The backward is the same call on the gradient (the
 * stream is recomputed from its key, no mask is stored). */
DROPOUT_KERNEL(dropout_apply, kept ? x * scale : 0.0f)

/* out = relu(x) * scale where kept (NaN propagates), else 0. */
DROPOUT_KERNEL(relu_dropout_forward, (kept && !(x <= 0.0f)) ? x * scale : 0.0f)

/* grad_in[i] = grad_out[i] * scale where out[i] > 0 (a kept, active unit), else 0. */
void relu_dropout_backward(const float *grad_out, const float *out, float *grad_in, int64_t n,
                           float scale) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
        grad_in[i] = out[i] > 0.0f ? grad_out[i] * scale : 0.0f;
    }
}

/* table[r, :] = sum of rows[i, :] over i with ids[i] == r, in increasing i (zero elsewhere):
 * the gradient of a row gather. Each thread owns a contiguous range of table rows and scans
 * all ids, so no two threads write one row and every row sums in index order. */
#define SCATTER(NAME, ID)                                                                     \
    void NAME(const ID *ids, const float *rows, int64_t n, int64_t dim, float *table,         \
              int64_t table_rows) {                                                           \
        _Pragma("omp parallel") {                                                             \
            const int threads = omp_get_num_threads(), me = omp_get_thread_num();             \
            const int64_t lo = table_rows * me / threads;                                     \
            const int64_t hi = table_rows * (me + 1) / threads;                               \
            memset(table + lo * dim, 0, (size_t)((hi - lo) * dim) * sizeof(float));           \
            for (int64_t i = 0; i < n; ++i) {                                                 \
                const int64_t r = (int64_t)ids[i];                                            \
                if (r < lo || r >= hi) continue;                                              \
                float *dst = table + r * dim;                                                 \
                const float *src = rows + i * dim;                                            \
                for (int64_t j = 0; j < dim; ++j) dst[j] += src[j];                           \
            }                                                                                 \
        }                                                                                     \
    }

SCATTER(scatter_rows_i32, int32_t)
SCATTER(scatter_rows_i64, int64_t)
