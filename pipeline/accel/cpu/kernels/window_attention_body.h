/* The attention for one storage type T, included by window_attention.c once per
   type (T, SUFFIX; LOAD/STORE of VL values, LOADN/STOREN of the first m).

   qkv: (windows * n, 3 * heads * d), q then k then v, each heads then d; out: (windows * n,
   heads * d). bias_t: float32 (heads, n, n), the position bias transposed (key, query); mask_t:
   float32 (masked, n, n), the mask of the last `masked` windows transposed, or NULL. probs_t:
   (windows, heads, n, n), the probabilities transposed (key, query), or NULL: not kept. */
#define FN(name) CAT(name, SUFFIX)

/* The first m values at p, read as VL where that stays inside the buffer (before `end`): the
   lanes past m are never used, and a narrower read of m values through memory first costs a
   store-forwarding stall each (the kernel ran no faster with them everywhere) */
INLINE vf FN(load_first_)(const T *p, int64_t m, const T *end) { return p + VL <= end ? LOAD(p) : LOADN(p, m); }

/* rows[i][0:d] = src[i * stride][0:d] as float32, for n rows */
INLINE void FN(copy_rows_)(const T *src, int64_t stride, const int64_t n, const int64_t d, const T *end, float *rows) {
    for (int64_t i = 0; i < n; ++i)
        for (int64_t c = 0; c < d; c += VL) {
            const int64_t m = d - c < VL ? d - c : VL;
            storen_f32(rows + i * d + c, FN(load_first_)(src + i * stride + c, m, end), m);
        }
}

/* cols[c * n + i] = src[i * stride + c] * factor (n rows of d values, transposed), through VL x VL
   blocks transposed in registers */
INLINE void FN(copy_transposed_)(const T *src, int64_t stride, const int64_t n, const int64_t d,
                                 float factor, const T *end, float *cols) {
    for (int64_t i0 = 0; i0 < n; i0 += VL)
        for (int64_t c0 = 0; c0 < d; c0 += VL) {
            const int64_t m = d - c0 < VL ? d - c0 : VL;
            vf r[VL];
            for (int k = 0; k < VL; ++k) r[k] = FN(load_first_)(src + (i0 + k) * stride + c0, m, end);
            transpose_block(r);
            for (int64_t c = 0; c < m; ++c) store_f32(cols + (c0 + c) * n + i0, r[c] * splat(factor));
        }
}

/* dst[(i0 + lane) * stride + c] = cols[c][lane] * factor: d vectors of VL tokens written as the
   tokens' rows (a block transposed in registers) */
INLINE void FN(store_transposed_)(const vf *cols, const int64_t d, float factor, T *dst, int64_t stride) {
    for (int64_t c0 = 0; c0 < d; c0 += VL) {
        const int64_t m = d - c0 < VL ? d - c0 : VL;
        vf r[VL];
        for (int k = 0; k < VL; ++k) r[k] = k < m ? cols[c0 + k] * splat(factor) : splat(0.f);
        transpose_block(r);
        for (int k = 0; k < VL; ++k) STOREN(dst + k * stride + c0, r[k], m);
    }
}

INLINE void FN(forward_)(const T *qkv, const float *bias_t, const float *mask_t, int64_t masked,
                         int64_t windows, int64_t heads, const int64_t n, const int64_t d,
                         float scale, T *out, T *probs_t, float *scratch) {
    const int64_t width = 3 * heads * d;
    const T *qkv_end = qkv + windows * n * width;
    float *q_t = scratch, *k = q_t + d * n, *v = k + n * d, *s_t = v + n * d;   /* (d, n), (n, d), (n, d), (n, n) */
    for (int64_t w = 0; w < windows; ++w)
        for (int64_t h = 0; h < heads; ++h) {
            const T *q_in = qkv + w * n * width + h * d, *k_in = q_in + heads * d, *v_in = k_in + heads * d;
            FN(copy_transposed_)(q_in, width, n, d, scale, qkv_end, q_t);
            FN(copy_rows_)(k_in, width, n, d, qkv_end, k);
            FN(copy_rows_)(v_in, width, n, d, qkv_end, v);
            const float *bias_h = bias_t + h * n * n;
            const float *mask_w = mask_t && w >= windows - masked ? mask_t + (w - windows + masked) * n * n : NULL;
            T *probs_wh = probs_t ? probs_t + (w * heads + h) * n * n : NULL;
            T *out_wh = out + w * n * heads * d + h * d;
            for (int64_t i0 = 0; i0 < n; i0 += VL) {                     /* VL queries a vector */
                vf q[MAX_D], top = splat(-__builtin_inff());
                for (int64_t c = 0; c < d; ++c) q[c] = load_f32(q_t + c * n + i0);
                for (int64_t j = 0; j < n; ++j) {                           /* scores, transposed */
                    vf s = load_f32(bias_h + j * n + i0);
                    if (mask_w) s += load_f32(mask_w + j * n + i0);
                    for (int64_t c = 0; c < d; ++c) s += splat(k[j * d + c]) * q[c];
                    store_f32(s_t + j * n + i0, s);
                    top = vmax(top, s);
                }
                vf total = splat(0.f), o[MAX_D];
                for (int64_t c = 0; c < d; ++c) o[c] = splat(0.f);
                for (int64_t j = 0; j < n; ++j) {                           /* exp, its sum, and P.v unscaled */
                    vf e = vexp(load_f32(s_t + j * n + i0) - top);
                    store_f32(s_t + j * n + i0, e);
                    total += e;
                    for (int64_t c = 0; c < d; ++c) o[c] += splat(v[j * d + c]) * e;
                }
                const vf inv = splat(1.f) / total;
                if (probs_wh)
                    for (int64_t j = 0; j < n; ++j) STORE(probs_wh + j * n + i0, load_f32(s_t + j * n + i0) * inv);
                for (int64_t c = 0; c < d; ++c) o[c] *= inv;
                FN(store_transposed_)(o, d, 1.f, out_wh + i0 * heads * d, heads * d);
            }
        }
}

/* Return 0, or -1 if scratch memory ran out. */
int FN(window_attention_forward_)(const T *qkv, const float *bias_t, const float *mask_t,
                                  int64_t masked, int64_t windows, int64_t heads, int64_t n,
                                  int64_t d, float scale, T *out, T *probs_t) {
    float *scratch = malloc(sizeof(float) * (3 * n * d + n * n));
    if (!scratch) return -1;
#define FORWARD(N, D) FN(forward_)(qkv, bias_t, mask_t, masked, windows, heads, N, D, scale, out, probs_t, scratch)
    SPECIALISED(FORWARD);
#undef FORWARD
    free(scratch);
    return 0;
}

#undef FN
#undef T
#undef SUFFIX
#undef LOAD
#undef STORE
#undef LOADN
#undef STOREN
