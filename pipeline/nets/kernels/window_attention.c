/* Window attention for training on the CPU: forward and backward, one (window, head) at a time.

   softmax(q.k * scale + bias + mask).v for windows of n tokens and heads of d channels, reading
   q, k and v straight from the qkv projection's output and writing the input of the output
   projection, what `window_attention_cpu.py` computes with torch's batched products. There,
   with 64-token windows and 10-channel heads, the products are too small for the matrix
   kernels and every product, the softmax and their gradients is a pass over the scores with
   copies between them. Here a window-head's scores stay in the core's first-level cache from
   the first product to the last, in float32 whatever the storage type (float32 or bfloat16).

   The layout is what makes it fast: every product is written as vectors over one index of
   16 tokens times scalars broadcast from the other operand, so nothing is summed across a
   vector's lanes. The scores are computed transposed (a vector holds 16 queries' scores for
   one key), so the softmax's maximum and sum are lane-wise over keys; the probabilities are
   stored transposed for the backward, which transposes them (and the scores' gradient) once
   in cache to make the key-side gradients the same way.

   Vectors are GCC/Clang vector extensions of 16 floats, which the compiler lowers to the
   machine it builds for (one AVX-512 register, two AVX2 ones, four SSE ones): no intrinsics.
   Built by `window_attention_native.py` with -O3 -march=native. Single-threaded: a training
   step's shards run one per core. n must be a multiple of 16 (at most 256), d at most 32. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));

#define MAX_N 256
#define MAX_D 32
#define INLINE static inline __attribute__((always_inline))

INLINE vf splat(float x) { return (vf){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
INLINE vf load_f32(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
INLINE void store_f32(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* where `pick` (a comparison's all-ones lanes) a, else b: C has no ?: on vectors */
INLINE vf blend(vi pick, vf a, vf b) { return (vf)(((vi)a & pick) | ((vi)b & ~pick)); }
INLINE vf vmax(vf a, vf b) { return blend(a > b, a, b); }

/* exp(x) to float32's precision (Cephes' expf: 2^k times a polynomial on [-ln2/2, ln2/2]);
   -inf, and anything below -87.3, gives exactly 0, as a masked score must. */
INLINE vf vexp(vf x) {
    x = blend(x < splat(-87.3f), splat(-87.3f), x);
    x = blend(x > splat(88.3f), splat(88.3f), x);
    vf t = x * splat(1.44269504088896341f) + splat(0.5f);
    vi k = __builtin_convertvector(t, vi);
    k -= (vi)(__builtin_convertvector(k, vf) > t) & 1;                 /* floor */
    vf kf = __builtin_convertvector(k, vf);
    x = x - kf * splat(0.693359375f) + kf * splat(2.12194440e-4f);
    vf y = splat(1.9875691500e-4f);
    y = y * x + splat(1.3981999507e-3f);
    y = y * x + splat(8.3334519073e-3f);
    y = y * x + splat(4.1665795894e-2f);
    y = y * x + splat(1.6666665459e-1f);
    y = y * x + splat(5.0000001201e-1f);
    y = y * x * x + x + splat(1.0f);
    vi bits = ((k + 127) << 23) & ~(k < -126);                          /* below float's range: 0 */
    return y * (vf)bits;
}

/* A 16x16 block transposed in registers: four rounds, each swapping the off-diagonal b x b
   blocks of every 2b x 2b block (b = 8, 4, 2, 1), two shuffles per pair of rows. */
#define UNPACK(...) __VA_ARGS__
#define SWAP_BLOCKS(b, LO, HI)                                                                   \
    for (int k = 0; k < 16; ++k)                                                                 \
        if (!(k & b)) {                                                                          \
            vf lo = __builtin_shufflevector(r[k], r[k + b], UNPACK LO);                          \
            vf hi = __builtin_shufflevector(r[k], r[k + b], UNPACK HI);                          \
            r[k] = lo; r[k + b] = hi;                                                            \
        }
INLINE void transpose16(vf r[16]) {
    SWAP_BLOCKS(8, (0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
                   (8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31))
    SWAP_BLOCKS(4, (0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27),
                   (4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31))
    SWAP_BLOCKS(2, (0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29),
                   (2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31))
    SWAP_BLOCKS(1, (0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30),
                   (1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31))
}
#undef UNPACK
#undef SWAP_BLOCKS

/* dst = src^T for (n, n) float32 matrices, n a multiple of 16 */
INLINE void transpose(const float *src, float *dst, const int64_t n) {
    for (int64_t a = 0; a < n; a += 16)
        for (int64_t b = 0; b < n; b += 16) {
            vf r[16];
            for (int k = 0; k < 16; ++k) r[k] = load_f32(src + (a + k) * n + b);
            transpose16(r);
            for (int k = 0; k < 16; ++k) store_f32(dst + (b + k) * n + a, r[k]);
        }
}

/* Storage types: 16 values or one, as float32. bfloat16 is stored rounded to nearest even. */
INLINE float get_f32(const float *p) { return *p; }
INLINE void put_f32(float *p, float x) { *p = x; }
INLINE vf load_bf16(const uint16_t *p) {
    vh h; memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
}
INLINE void store_bf16(uint16_t *p, vf v) {
    vu u = (vu)v;
    vh h = __builtin_convertvector((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16, vh);
    memcpy(p, &h, sizeof h);
}
INLINE float get_bf16(const uint16_t *p) { uint32_t u = (uint32_t)*p << 16; float x; memcpy(&x, &u, 4); return x; }
INLINE void put_bf16(uint16_t *p, float x) {
    uint32_t u; memcpy(&u, &x, 4);
    *p = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)

#define T float
#define SUFFIX f32
#define LOAD load_f32
#define STORE store_f32
#define GET get_f32
#define PUT put_f32
#include "window_attention_body.h"

#define T uint16_t
#define SUFFIX bf16
#define LOAD load_bf16
#define STORE store_bf16
#define GET get_bf16
#define PUT put_bf16
#include "window_attention_body.h"
