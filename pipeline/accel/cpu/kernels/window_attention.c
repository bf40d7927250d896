/* Window attention on the CPU, one (window, head) at a time.

   softmax(q.k * scale + bias + mask).v for windows of n tokens and heads of d channels, reading
   q, k and v straight from the qkv projection's output and writing the input of the output
   projection. With SwinIR-S's 64-token windows and 10-channel heads the products are too small
   for the matrix kernels, and torch passes over the scores in memory between them; here a
   window-head's scores stay in the core's first-level cache from the first product to the
   last, in float32 whatever the storage type (float32 or bfloat16).

   The layout is what makes it fast: every product is written as vectors of VL tokens times
   scalars broadcast from the other operand, so nothing is summed across a vector's lanes. The
   scores are computed transposed (a vector holds VL queries' scores for one key), so the
   softmax's maximum and sum are lane-wise over keys.

   Vectors are GCC/Clang vector extensions of VL floats, one register of the machine it is
   built for (16 with AVX-512, else 8: AVX2's, or two SSE registers), which the compiler lowers
   to its instructions; intrinsics only for what the extensions lack (AVX-512's masked moves,
   its exponent scaling). Built by `native.py` with -O3 -march=native. Single-threaded: the
   inference window jobs run one per core. n must be a multiple of 16 (at most 256), d at
   most 32. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define VL 16       /* floats a vector: one AVX-512 register */
#else
#define VL 8        /* one AVX2 register (two SSE ones); 16 took two of AVX2's 16 registers and
                       spilled: 3x slower than torch's products */
#endif
typedef float vf __attribute__((vector_size(4 * VL)));
typedef int32_t vi __attribute__((vector_size(4 * VL)));
typedef uint32_t vu __attribute__((vector_size(4 * VL)));
typedef uint16_t vh __attribute__((vector_size(2 * VL)));

#define MAX_N 256
#define MAX_D 32
#define INLINE static inline __attribute__((always_inline))

#if VL == 16
INLINE vf splat(float x) { return (vf){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
#else
INLINE vf splat(float x) { return (vf){x, x, x, x, x, x, x, x}; }
#endif
INLINE vf load_f32(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
INLINE void store_f32(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* where `pick` (a comparison's all-ones lanes) a, else b: C has no ?: on vectors */
INLINE vf blend(vi pick, vf a, vf b) { return (vf)(((vi)a & pick) | ((vi)b & ~pick)); }
INLINE vf vmax(vf a, vf b) { return blend(a > b, a, b); }

/* exp(x) to float32's precision (Cephes' expf: 2^k times a polynomial of x - k.ln2, on
   [-ln2/2, ln2/2]); below -87 (exp < 1.6e-38: -inf, a -100 shifted-window mask) exactly 0, as a
   masked score must be, and never a denormal, whose arithmetic some CPUs run ~100x slower.
   With AVX-512, 2^k comes from vscalefps and k from vrndscaleps: a third fewer instructions than
   the portable bit arithmetic, which is most of the softmax's cost. */
INLINE vf exp_polynomial(vf x) {       /* exp(x) for |x| <= ln2/2 */
    vf y = splat(1.9875691500e-4f);
    y = y * x + splat(1.3981999507e-3f);
    y = y * x + splat(8.3334519073e-3f);
    y = y * x + splat(4.1665795894e-2f);
    y = y * x + splat(1.6666665459e-1f);
    y = y * x + splat(5.0000001201e-1f);
    return y * x * x + x + splat(1.0f);
}
#if VL == 16
#include <immintrin.h>
INLINE vf vexp(vf x) {
    const vi zero = x < splat(-87.f);
    x = blend(zero, splat(-87.f), x);
    x = blend(x > splat(88.3f), splat(88.3f), x);
    const vf k = (vf)_mm512_roundscale_ps((__m512)(x * splat(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = x - k * splat(0.693359375f) + k * splat(2.12194440e-4f);
    return (vf)((vi)_mm512_scalef_ps((__m512)exp_polynomial(x), (__m512)k) & ~zero);
}
#else
INLINE vf vexp(vf x) {
    const vi zero = x < splat(-87.f);
    x = blend(zero, splat(-87.f), x);
    x = blend(x > splat(88.3f), splat(88.3f), x);
    vf t = x * splat(1.44269504088896341f) + splat(0.5f);
    vi k = __builtin_convertvector(t, vi);
    k -= (vi)(__builtin_convertvector(k, vf) > t) & 1;                 /* floor */
    vf kf = __builtin_convertvector(k, vf);
    x = x - kf * splat(0.693359375f) + kf * splat(2.12194440e-4f);
    return (vf)((vi)(exp_polynomial(x) * (vf)((k + 127) << 23)) & ~zero);
}
#endif

/* A VL x VL block transposed in registers: log2(VL) rounds, each swapping the off-diagonal
   b x b blocks of every 2b x 2b block (b = VL/2, ..., 1), two shuffles per pair of rows. */
#define UNPACK(...) __VA_ARGS__
#define SWAP_BLOCKS(b, LO, HI)                                                                   \
    for (int k = 0; k < VL; ++k)                                                                 \
        if (!(k & b)) {                                                                          \
            vf lo = __builtin_shufflevector(r[k], r[k + b], UNPACK LO);                          \
            vf hi = __builtin_shufflevector(r[k], r[k + b], UNPACK HI);                          \
            r[k] = lo; r[k + b] = hi;                                                            \
        }
INLINE void transpose_block(vf r[VL]) {
#if VL == 16
    SWAP_BLOCKS(8, (0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
                   (8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31))
    SWAP_BLOCKS(4, (0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27),
                   (4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31))
    SWAP_BLOCKS(2, (0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29),
                   (2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31))
    SWAP_BLOCKS(1, (0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30),
                   (1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31))
#else
    SWAP_BLOCKS(4, (0, 1, 2, 3, 8, 9, 10, 11), (4, 5, 6, 7, 12, 13, 14, 15))
    SWAP_BLOCKS(2, (0, 1, 8, 9, 4, 5, 12, 13), (2, 3, 10, 11, 6, 7, 14, 15))
    SWAP_BLOCKS(1, (0, 8, 2, 10, 4, 12, 6, 14), (1, 9, 3, 11, 5, 13, 7, 15))
#endif
}
#undef SWAP_BLOCKS
#undef UNPACK

/* Storage types: 16 values, or the first m (<= 16; the rest read as 0), as float32. bfloat16 is
   stored rounded to nearest even. The first m go through AVX-512's masked moves where the
   compiler targets them; elsewhere through a copy on the stack (slower: a wide read of narrower
   writes cannot be forwarded from the store buffer). */
INLINE vf load_bf16(const uint16_t *p) {
    vh h; memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
}
INLINE vh to_bf16(vf v) {
    vu u = (vu)v;
    return __builtin_convertvector((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16, vh);
}
INLINE void store_bf16(uint16_t *p, vf v) { vh h = to_bf16(v); memcpy(p, &h, sizeof h); }
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define FIRST(m) ((__mmask16)((1u << (m)) - 1u))
INLINE vf loadn_f32(const float *p, int64_t m) { return (vf)_mm512_maskz_loadu_ps(FIRST(m), p); }
INLINE void storen_f32(float *p, vf v, int64_t m) { _mm512_mask_storeu_ps(p, FIRST(m), (__m512)v); }
INLINE vf loadn_bf16(const uint16_t *p, int64_t m) {
    return (vf)(__builtin_convertvector((vh)_mm256_maskz_loadu_epi16(FIRST(m), p), vu) << 16);
}
INLINE void storen_bf16(uint16_t *p, vf v, int64_t m) { _mm256_mask_storeu_epi16(p, FIRST(m), (__m256i)to_bf16(v)); }
#else
INLINE vf loadn_f32(const float *p, int64_t m) { float t[VL] = {0}; memcpy(t, p, m * sizeof *t); return load_f32(t); }
INLINE void storen_f32(float *p, vf v, int64_t m) { float t[VL]; store_f32(t, v); memcpy(p, t, m * sizeof *t); }
INLINE vf loadn_bf16(const uint16_t *p, int64_t m) { uint16_t t[VL] = {0}; memcpy(t, p, m * sizeof *t); return load_bf16(t); }
INLINE void storen_bf16(uint16_t *p, vf v, int64_t m) { uint16_t t[VL]; store_bf16(t, v); memcpy(p, t, m * sizeof *t); }
#endif

/* Floats a vector in this build: 16 with AVX-512, 8 without. */
int window_attention_vector_floats(void) { return VL; }

/* CALL(N, D) with n and d as constants for the shapes the pipeline sends here, so a block's
   vectors stay in registers: SwinIR-S (8x8 windows, heads of 10) and SwinIR (8x8, 30); any
   other shape runs the same code with n and d read at run time. */
#define SPECIALISED(CALL)                                                                        \
    if (n == 64 && d == 10) CALL(64, 10);                                                        \
    else if (n == 64 && d == 30) CALL(64, 30);                                                   \
    else CALL(n, d)

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)

#define T float
#define SUFFIX f32
#define LOAD load_f32
#define STORE store_f32
#define LOADN loadn_f32
#define STOREN storen_f32
#include "window_attention_body.h"

#define T uint16_t
#define SUFFIX bf16
#define LOAD load_bf16
#define STORE store_bf16
#define LOADN loadn_bf16
#define STOREN storen_bf16
#include "window_attention_body.h"
