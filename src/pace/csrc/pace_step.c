/* One PACE step over many tensors in one call: the CPU kernel of pace.PACE (impl="fused").
 *
 * Plain C with OpenMP, no torch headers, so that it builds in about a second, once per machine
 * (pace/cpu_kernel.py compiles it with -O3 -march=native, one dtype pair per library, and loads it with ctypes). Each element is
 * read once and written once: p, g, m, v, ema in; p, m, v, ema out (9 streams; AdamW is 7).
 *
 * The tensors of a call are cut into chunks of CHUNK elements; OpenMP shares the chunks of all tensors
 * among the threads (one parallel region per call, whatever the number of tensors).
 *
 * Arithmetic is in C (float, or double for float64 weights), in the order of pace.forloop.pace_update,
 * so that every implementation agrees to a few units in the last place:
 *   m'    = lerp(m, g, 1 - beta1)                   v' = v * beta2 + (1 - beta2) * g * g
 *   inv   = 1 / (sqrt(v') * inv_bc2_sqrt + eps)     adamw = theta * keep - step_size * (m' * inv)
 *   lam   = min(lam_scale * inv, lam_max)           new = adamw + lam * (ema - theta)
 *   p     = new, rounded to p's dtype               ema = lerp(ema, p, ema_weight)   (the weights as stored)
 * lerp(a, b, w) is torch's: w < 0.5 ? a + w * (b - a) : b - (b - a) * (1 - w).
 *
 * hp (HP_SIZE doubles, the slots below): keep, step_size, inv_bc2_sqrt, eps, 1 - beta1, beta2, 1 - beta2,
 *   lam_scale, ema_weight, lam_max
 * ptrs (n x 5 int64): addresses of p, g, m, v, ema (ema 0 when the call has no EMA); numels (n int64).
 * stats (NULL, or n_chunks x 6 doubles): per chunk [sum lam, max lam, #(lam_raw >= 1), sum (adamw - theta)^2,
 * sum (lam * diff)^2, sum diff^2], summed within a chunk in the compute type (so that the loop vectorises).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK 32768

/* the slots of hp: pace/hyper.py's Layout (tests/test_optimizer.py holds the two together) */
enum { HP_KEEP = 0, HP_STEP_SIZE = 1, HP_INV_BC2_SQRT = 2, HP_EPS = 3, HP_ONE_MINUS_BETA1 = 4, HP_BETA2 = 5,
       HP_ONE_MINUS_BETA2 = 6, HP_LAM_SCALE = 7, HP_EMA_WEIGHT = 8, HP_LAM_MAX = 9, HP_SIZE = 10 };

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; NaN stays NaN; no branch */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = 0u - (uint32_t)((u & 0x7fffffffu) > 0x7f800000u); /* all ones for NaN */
    return (uint16_t)((rounded & ~nan) | (((u >> 16) | 0x40u) & nan));
}

/* Stochastic rounding (pace/rounding.py, built with -DPACE_SR=1): lowbias32, the element words and the
 * rounding of a float with 16 random bits, as the torch ops there compute them */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
    return x;
}

static inline uint16_t f32_to_bf16_sr(float f, uint32_t r) { /* r < 2^16; NaN stays a quiet NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t up = (u + r) >> 16;
    uint32_t nan = 0u - (uint32_t)((u & 0x7fffffffu) > 0x7f800000u);
    return (uint16_t)((up & ~nan) | (((u >> 16) | 0x40u) & nan));
}

/* which variant this build is: its kernel name says (one kernel per build) */
#if defined(PACE_KERNEL_pace_step_bf16_f32_sr) || defined(PACE_KERNEL_pace_step_bf16_off_sr)
#define PACE_SR 1
#else
#define PACE_SR 0
#endif
#if defined(PACE_KERNEL_pace_step_bf16_off) || defined(PACE_KERNEL_pace_step_bf16_off_sr)
#define PACE_OFFSET 1 /* the EMA stored as its bf16 offset from the weights, ema - theta */
#else
#define PACE_OFFSET 0
#endif

#define CASE(NAME, k)                                                                                       \
    case k: NAME##_chunk(p, g, m, v, ema, len, h, ((k) >> 4) & 1, ((k) >> 3) & 1, ((k) >> 2) & 1,           \
                         ((k) >> 1) & 1, (k) & 1, out, key, first_index); break;
#define CASE8(NAME, k) CASE(NAME, k) CASE(NAME, k + 1) CASE(NAME, k + 2) CASE(NAME, k + 3) CASE(NAME, k + 4) \
    CASE(NAME, k + 5) CASE(NAME, k + 6) CASE(NAME, k + 7)
#define SQRT(x) _Generic((x), float: sqrtf, default: sqrt)(x) /* float stays float */

/* first[t]: the first chunk of tensor t, first[n_tensors]: the number of chunks; NULL where it cannot be
 * allocated */
static int64_t *chunk_table(int64_t n_tensors, const int64_t *numels) {
    int64_t *first = malloc((n_tensors + 1) * sizeof(int64_t));
    if (first == NULL) return NULL;
    first[0] = 0;
    for (int64_t t = 0; t < n_tensors; t++) first[t + 1] = first[t] + (numels[t] + CHUNK - 1) / CHUNK;
    return first;
}

/* the tensor holding chunk c: the last t with first[t] <= c */
static inline int64_t tensor_of(const int64_t *first, int64_t n_tensors, int64_t c) {
    int64_t lo = 0, hi = n_tensors - 1;
    while (lo < hi) {
        int64_t mid = (lo + hi + 1) / 2;
        if (first[mid] <= c) lo = mid; else hi = mid - 1;
    }
    return lo;
}

/* CHUNK_LOOP(NAME, P, E, C, EA, LOADP, STOREP, LOADE, STOREE, STOREP_SR, STOREE_SR): NAME_chunk, the loop over one chunk for
 * weights/moments of type P, EMA of type E, arithmetic in C (the EMA's own update in EA). PULL, UPDATE_EMA,
 * STATS, EMA_LO and M_LO are compile-time constants at each call site (STEP's switch). */
#define CHUNK_LOOP(NAME, P, E, C, EA, LOADP, STOREP, LOADE, STOREE, STOREP_SR, STOREE_SR)                   \
static inline __attribute__((always_inline)) void NAME##_chunk(                                             \
        P *restrict p, const P *restrict g, P *restrict m, P *restrict v, E *restrict ema, int64_t n,       \
        const C *h, const int PULL, const int UPDATE_EMA, const int STATS, const int EMA_LO, const int M_LO,           \
        double *out, const uint32_t key, const int64_t start) {                                             \
    const C keep = h[HP_KEEP], step_size = h[HP_STEP_SIZE], inv_bc2_sqrt = h[HP_INV_BC2_SQRT];              \
    const C eps = h[HP_EPS], omb1 = h[HP_ONE_MINUS_BETA1], beta2 = h[HP_BETA2];                             \
    const C omb2 = h[HP_ONE_MINUS_BETA2], lam_scale = h[HP_LAM_SCALE], ema_weight = h[HP_EMA_WEIGHT];       \
    const C lam_max = h[HP_LAM_MAX];                                                                        \
    C s_lam = 0, m_lam = 0, s_clip = 0, s_upd = 0, s_pull = 0, s_diff = 0; /* per chunk, in C: vectorises */ \
    const uint32_t base = (uint32_t)start; /* the chunk's first element index, mod 2^32 */                  \
    _Pragma("omp simd reduction(+:s_lam,s_clip,s_upd,s_pull,s_diff) reduction(max:m_lam)")                  \
    for (int64_t i = 0; i < n; i++) {                                                                       \
        C theta = LOADP(p[i]), grad = LOADP(g[i]), mi = LOADP(m[i]), vi = LOADP(v[i]);                      \
        C m_new = M_LO ? mi + omb1 * (grad - mi) : grad - (grad - mi) * (1 - omb1); /* torch's lerp */      \
        C v_new = vi * beta2 + omb2 * grad * grad;                                                          \
        C inv = 1 / (SQRT(v_new) * inv_bc2_sqrt + eps);                                                     \
        C adamw = theta * keep - step_size * (m_new * inv);                                                 \
        C new_theta = adamw;                                                                                \
        C lam = 0, lam_raw = 0, diff = 0;                                                                   \
        EA e_old = 0;                                                                                       \
        if (PACE_OFFSET) { C off = (C)LOADE(ema[i]); e_old = (EA)(theta + off); diff = off; }               \
        else if (PULL || UPDATE_EMA) e_old = (EA)LOADE(ema[i]); /* ema_{t-1}, read once */                  \
        if (PULL) {                                                                                         \
            lam_raw = lam_scale * inv;                                                                      \
            lam = lam_raw < lam_max ? lam_raw : lam_max;                                                    \
            if (!PACE_OFFSET) diff = (C)e_old - theta;                                                      \
            new_theta = adamw + lam * diff;                                                                 \
        }                                                                                                   \
        uint32_t h = PACE_SR ? mix32(key ^ (base + (uint32_t)i)) : 0; /* the element's word (rounding.py) */ \
        P stored = PACE_SR ? STOREP_SR(new_theta, h & 0xffffu) : STOREP(new_theta);                        \
        p[i] = stored;                                                                                      \
        m[i] = PACE_SR ? STOREP_SR(m_new, h >> 16) : STOREP(m_new);                                        \
        v[i] = PACE_SR ? STOREP_SR(v_new, (h * 0x9e3779b1u) >> 16) : STOREP(v_new);                        \
        if (PACE_OFFSET) { /* written every step: the weights moved */                                      \
            EA target = (EA)LOADP(stored), w = (EA)ema_weight;                                              \
            EA e_new = !UPDATE_EMA ? e_old : EMA_LO ? e_old + w * (target - e_old)                          \
                                                    : target - (target - e_old) * (1 - w);                  \
            ema[i] = PACE_SR ? STOREE_SR(e_new - target, (h * 0x85ebca77u) >> 16) : STOREE(e_new - target); \
        } else if (UPDATE_EMA) {                                                                            \
            EA target = (EA)LOADP(stored), w = (EA)ema_weight; /* lerp, its branch chosen outside the loop */    \
            ema[i] = STOREE(EMA_LO ? e_old + w * (target - e_old) : target - (target - e_old) * (1 - w));   \
        }                                                                                                   \
        if (STATS) {                                                                                        \
            C upd = adamw - theta;                                                                          \
            s_upd += upd * upd;                                                                             \
            if (PULL) {                                                                                     \
                C pb = lam * diff;                                                                          \
                s_lam += lam; m_lam = lam > m_lam ? lam : m_lam; s_clip += (C)(lam_raw >= 1);               \
                s_pull += pb * pb; s_diff += diff * diff;                                                   \
            }                                                                                               \
        }                                                                                                   \
    }                                                                                                       \
    if (STATS) {                                                                                            \
        out[0] = s_lam; out[1] = m_lam; out[2] = s_clip; out[3] = s_upd; out[4] = s_pull; out[5] = s_diff;  \
    }                                                                                                       \
}

/* STEP(NAME, P, E, C): the exported step: every chunk of every tensor, in parallel, each through the copy of
 * NAME_chunk its flags choose */
#define STEP(NAME, P, E, C)                                                                                 \
int NAME(int64_t n_tensors, const int64_t *ptrs, const int64_t *numels, const double *hp, int pull,         \
         int update_ema, double *stats, int n_threads, const int64_t *keys) { /* 0, or 1: no table */       \
    C h[HP_SIZE];                                                                                           \
    for (int k = 0; k < HP_SIZE; k++) h[k] = (C)hp[k];                                                      \
    int64_t *first = chunk_table(n_tensors, numels);                                                        \
    if (first == NULL) return 1;                                                                            \
    int64_t n_chunks = first[n_tensors];                                                                    \
    /* each flag a constant of its own copy of the loop. The last two: which form of torch's lerp the */    \
    /* EMA update (ema_weight < 0.5) and m (1 - beta1 < 0.5) take, chosen here: selects in the loop stop gcc */  \
    /* vectorising it */                                                                                    \
    int flags = (pull ? 16 : 0) | (update_ema ? 8 : 0) | (stats ? 4 : 0) | (h[HP_EMA_WEIGHT] < 0.5f ? 2 : 0)           \
                | (h[HP_ONE_MINUS_BETA1] < 0.5f ? 1 : 0);                                                   \
    _Pragma("omp parallel for schedule(static) num_threads(n_threads)")                                     \
    for (int64_t c = 0; c < n_chunks; c++) {                                                                \
        int64_t t = tensor_of(first, n_tensors, c), start = (c - first[t]) * CHUNK;                         \
        int64_t len = numels[t] - start < CHUNK ? numels[t] - start : CHUNK;                                \
        const int64_t *q = ptrs + 5 * t;                                                                    \
        P *p = (P *)q[0] + start, *g = (P *)q[1] + start, *m = (P *)q[2] + start, *v = (P *)q[3] + start;   \
        E *ema = q[4] ? (E *)q[4] + start : 0;                                                              \
        double *out = stats ? stats + 6 * c : 0;                                                            \
        /* each tensor's key of this step (low 32 bits) and its first element's index in its whole parameter */ \
        /* (high 32: a shard's offset), pace.rounding.packed */                                                 \
        uint32_t key = keys ? (uint32_t)keys[t] : 0u;                                                       \
        int64_t first_index = start + (keys ? (int64_t)((uint64_t)keys[t] >> 32) : 0);                     \
        switch (flags) {                                                                                    \
            CASE8(NAME, 0) CASE8(NAME, 8) CASE8(NAME, 16) CASE8(NAME, 24)                                   \
        }                                                                                                   \
    }                                                                                                       \
    free(first);                                                                                            \
    return 0;                                                                                               \
}

#define BODY(NAME, P, E, C, EA, LOADP, STOREP, LOADE, STOREE, STOREP_SR, STOREE_SR)                         \
    CHUNK_LOOP(NAME, P, E, C, EA, LOADP, STOREP, LOADE, STOREE, STOREP_SR, STOREE_SR)                       \
    STEP(NAME, P, E, C)

#define SAME(x) (x)
#define F32_SR(x, r) ((float)(x)) /* 32- and 64-bit state: no rounding to 16 bits, r unused */
#define F64_SR(x, r) ((double)(x))
#define TO_F32(x) ((float)(x))
#define TO_F64(x) ((double)(x))

/* pace_step_<weights dtype>_<EMA dtype>; one per build (-DPACE_KERNEL_<name>), so that a machine builds only
 * the dtypes it trains, each in about a second */
#ifdef PACE_KERNEL_pace_step_f32_f32
BODY(pace_step_f32_f32, float, float, float, float, SAME, TO_F32, SAME, TO_F32, F32_SR, F32_SR)
#endif
#ifdef PACE_KERNEL_pace_step_f64_f64
BODY(pace_step_f64_f64, double, double, double, double, SAME, TO_F64, SAME, TO_F64, F64_SR, F64_SR)
#endif
#ifdef PACE_KERNEL_pace_step_f32_f64
BODY(pace_step_f32_f64, float, double, float, double, SAME, TO_F32, SAME, TO_F64, F32_SR, F64_SR)
#endif
#ifdef PACE_KERNEL_pace_step_bf16_f32
BODY(pace_step_bf16_f32, uint16_t, float, float, float, bf16_to_f32, f32_to_bf16, SAME, TO_F32, f32_to_bf16_sr, F32_SR)
#endif
#ifdef PACE_KERNEL_pace_step_bf16_f32_sr
BODY(pace_step_bf16_f32_sr, uint16_t, float, float, float, bf16_to_f32, f32_to_bf16, SAME, TO_F32, f32_to_bf16_sr,
     F32_SR)
#endif
#ifdef PACE_KERNEL_pace_step_bf16_off
BODY(pace_step_bf16_off, uint16_t, uint16_t, float, float, bf16_to_f32, f32_to_bf16, bf16_to_f32, f32_to_bf16,
     f32_to_bf16_sr, f32_to_bf16_sr)
#endif
#ifdef PACE_KERNEL_pace_step_bf16_off_sr
BODY(pace_step_bf16_off_sr, uint16_t, uint16_t, float, float, bf16_to_f32, f32_to_bf16, bf16_to_f32, f32_to_bf16,
     f32_to_bf16_sr, f32_to_bf16_sr)
#endif
