/* Internals shared by the CPU backend's files (not a public header).
 *
 * The backend's context, its fixed per-thread scratch, and the two sets of
 * kernels: portable C (matmul.c, attention.c, backend-cpu.c) and AVX2 + FMA +
 * F16C (vec-avx2.c), chosen once at creation. Everything is sized at
 * lp_backend_cpu_new() so that ops never allocate. */
#ifndef LP_KERNELS_CPU_CPU_H
#define LP_KERNELS_CPU_CPU_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/backend.h"
#include "kernels/cpu/threadpool.h"

#if defined(__x86_64__) || defined(__i386__)
#define LP_CPU_X86 1
#else
#define LP_CPU_X86 0
#endif

/* Blocked GEMM: a panel is LP_CPU_NR weight rows by LP_CPU_KC columns,
 * dequantized to f32 and stored k-major ([KC][NR]); the micro-kernel
 * multiplies LP_CPU_MR activation rows by one panel. KC is a multiple of
 * LP_QK_K (and so of LP_QK) so that chunks start on block boundaries. */
#define LP_CPU_KC 256
_Static_assert(LP_CPU_KC % LP_QK_K == 0, "GEMM chunks must be whole K-quant blocks");
#define LP_CPU_NR 16
#define LP_CPU_MR 6
/* Rows of the AVX-512 micro-kernel (one 16-float register per row). */
#define LP_CPU_MR512 12
/* Row stride of the rows before the transpose, padded: with a power-of-two
 * stride the 8 rows that one transpose reads share a few cache sets. */
#define LP_CPU_ROWS_STRIDE (LP_CPU_KC + 16)

/* The matrix-vector kernel takes up to LP_CPU_MATVEC_MAX_N rows of x at a
 * time; a product of n rows takes that path, in groups of MAX_N over each
 * chunk of weight rows (so that the weights come from the cache after the
 * first group), while n <= cpu->matvec_batch[type], and the GEMM from there
 * on. The crossover per type is lp_cpu_matvec_batch_default() (matmul.c,
 * measured: docs/benchmarks.md, "Decode batch sweep"); LP_CPU_MATVEC_BATCH=N
 * in the environment sets every type's to N (0 .. LP_CPU_MATVEC_BATCH_MAX;
 * 0: the GEMM always) for measurements. cpu->xsum holds the prepared x of
 * LP_CPU_MATVEC_BATCH_MAX rows. */
#define LP_CPU_MATVEC_MAX_N 4
/* The AVX-512 matrix-vector kernel's (lp_cpu_matvec_avx512, for the types
 * of lp_cpu_matvec512): 32 registers hold three times as many rows; past
 * 12 the rows' x no longer stays in the L1 cache (measured: 12 rows at a
 * time beat 14 and 16). A product of more rows goes in groups of equal
 * size. */
#define LP_CPU_MATVEC512_MAX_N  12
#define LP_CPU_MATVEC_BATCH_MAX 32
/* Weight rows a thread runs through every group before moving on, so that
 * they come from its cache after the first group. */
#define LP_CPU_MATVEC_ROW_CHUNK 64
/* The 4- to 6-bit matrix-vector kernels (lp_cpu_matvec_prepped) read x
 * through a copy prepared once per product (lp_cpu_matvec_prep_avx2): per
 * 32 weights, 32 floats of x reordered and scaled, and at most 2 floats of
 * sums. Rows of up to
 * LP_CPU_MATVEC_MAX_BLOCKS blocks (k <= 131072) take that path, longer
 * ones the GEMM. Row j of the copy starts at j * LP_CPU_PREP_ROW_FLOATS,
 * its sums LP_CPU_PREP_SUMS floats further on. */
#define LP_CPU_MATVEC_MAX_BLOCKS 4096
#define LP_CPU_PREP_SUMS         (LP_CPU_MATVEC_MAX_BLOCKS * 32)
/* plus one cache line: rows a power-of-two multiple apart would share the
 * same few sets of the L1 cache, which the kernels read in parallel */
#define LP_CPU_PREP_ROW_FLOATS (LP_CPU_MATVEC_MAX_BLOCKS * 34 + 16)
/* Bytes of weights the matrix-vector kernels prefetch ahead of the row
 * they work on (0: none; -D overrides it for measurements). */
#ifndef LP_CPU_MATVEC_PREFETCH
#define LP_CPU_MATVEC_PREFETCH 2048
#endif
/* backend-cpu.c sizes that copy (cpu->xsum) as LP_CPU_XSUM_FLOATS:
 * LP_CPU_MATVEC_BATCH_MAX rows of LP_CPU_PREP_ROW_FLOATS, 544 KiB each. */
#define LP_CPU_XSUM_MAX_BLOCKS (LP_CPU_PREP_ROW_FLOATS / 4)
#define LP_CPU_XSUM_FLOATS     ((size_t)LP_CPU_MATVEC_BATCH_MAX * LP_CPU_PREP_ROW_FLOATS)

/* Below this many elements (or multiply-adds) an op runs on the calling
 * thread alone: waking the pool would cost more than the work. */
#define LP_CPU_SERIAL_WORK 16384

/* A thread's scratch: panel, rows right after it, then panel2; other ops
 * (prefill attention) use the three as one buffer of LP_CPU_THREAD_SCRATCH
 * floats. */
struct lp_cpu_scratch {
	float *panel;  /* [LP_CPU_KC][LP_CPU_NR] */
	float *rows;   /* [LP_CPU_NR][LP_CPU_ROWS_STRIDE], a panel before the transpose */
	float *panel2; /* the next panel, for the AVX-512 kernel's two-panel tiles */
};
#define LP_CPU_THREAD_SCRATCH ((size_t)(2 * LP_CPU_KC + LP_CPU_ROWS_STRIDE) * LP_CPU_NR)

struct lp_cpu {
	struct lp_threadpool *pool;
	int n_threads;
	bool avx2;
	bool avx512;                    /* the AVX-512 GEMM micro-kernel (vec-avx512.c) too */
	struct lp_cpu_scratch *scratch; /* [n_threads] */
	/* largest n of a product on the matrix-vector path, per weight type */
	int matvec_batch[LP_DTYPE_COUNT];
	/* [LP_CPU_MATVEC_BATCH_MAX][LP_CPU_PREP_ROW_FLOATS]: shared scratch of
	 * one op at a time, the prepared x of a matrix-vector product, the
	 * partial states of a split attention or the threads' copies of K and
	 * V rows too large for their own scratch (ops of one backend never
	 * run concurrently) */
	float *xsum;
	float *scratch_mem;
	/* sticky status (backend.h): the first failure, 0 while none; set
	 * from the pool's threads too, so the first writer wins by CAS */
	_Atomic int status;
	char status_msg[256];
	/* LoRA slots (lora.c): what lora_fill recorded, aliasing the host
	 * weights; [max_loras] once reserved */
	struct lp_lora_weights *slots;
	int n_slots;
	void *sample_scratch; /* sample.c's, sized at reserve */
};

/* Records the first failure (later ones are dropped); safe from any
 * thread of the pool. */
void lp_cpu_fail(struct lp_cpu *cpu, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* An op is cut into at most this many chunks per thread (see threadpool.h:
 * more chunks than threads let the running threads take over the share of
 * one the OS has not scheduled). */
#define LP_CPU_CHUNKS_PER_THREAD 4

/* Runs fn over min(units, LP_CPU_CHUNKS_PER_THREAD * threads) chunks on the
 * pool, or as one chunk on the caller when work is below LP_CPU_SERIAL_WORK
 * or units <= 1. */
void lp_cpu_parallel(struct lp_cpu *cpu, int64_t work, int64_t units, lp_threadpool_fn fn,
                     void *arg);

/* [begin, end) of part i of n equal parts of [0, total). */
static inline void lp_cpu_split(int64_t total, int ith, int nth, int64_t *begin, int64_t *end)
{
	*begin = total * ith / nth;
	*end = total * (ith + 1) / nth;
}

void lp_cpu_matmul(struct lp_cpu *cpu, struct lp_tensor *out, const struct lp_tensor *x,
                   const struct lp_tensor *w, bool accumulate);
/* The measured crossover of weight type t with the AVX2 kernels, or with
 * the AVX-512 ones: products of up to this many rows run faster on the
 * matrix-vector path than on the GEMM (matmul.c). */
int lp_cpu_matvec_batch_default(enum lp_dtype t, bool avx512);
void lp_cpu_attention(struct lp_cpu *cpu, const struct lp_attention_args *args);
/* The LoRA op of backend.h and its slots (lora.c). */
void lp_cpu_lora(struct lp_cpu *cpu, const struct lp_lora_args *args);
int lp_cpu_lora_fill(struct lp_cpu *cpu, int slot, const struct lp_lora_weights *w,
                     struct lp_err *err);
void lp_cpu_lora_clear(struct lp_cpu *cpu, int slot);

/* The sample op of backend.h (sample.c); its scratch is sized at reserve. */
void lp_cpu_sample(struct lp_cpu *cpu, const struct lp_sample_args *args);
int lp_cpu_sample_reserve(struct lp_cpu *cpu, const struct lp_backend_limits *lim,
                          struct lp_err *err);
void lp_cpu_sample_release(struct lp_cpu *cpu);

/* True for the weight types whose matrix-vector kernel reads the prepared
 * copy of x (lp_cpu_matvec_prep_avx2): Q4_0, Q4_1, Q5_0, Q5_1 and the
 * K-quants. */
static inline bool lp_cpu_matvec_prepped(enum lp_dtype t)
{
	return t == LP_DTYPE_Q4_0 || t == LP_DTYPE_Q4_1 || t == LP_DTYPE_Q5_0 ||
	       t == LP_DTYPE_Q5_1 || t == LP_DTYPE_Q4_K || t == LP_DTYPE_Q5_K || t == LP_DTYPE_Q6_K;
}

/* True when the running CPU has AVX2, FMA and F16C. */
bool lp_cpu_has_avx2(void);

/* True when the running CPU has AVX-512 F and VL besides AVX2, and the OS
 * saves their registers. */
bool lp_cpu_has_avx512(void);

/* True when be (made by lp_backend_cpu_new) runs the AVX2 kernels; for
 * tests and benchmarks. Borrows be. */
bool lp_backend_cpu_uses_avx2(const struct lp_backend *be);
/* True when be runs the AVX-512 kernels besides (LP_CPU_NO_AVX512=1 in the
 * environment at creation turns them off, as LP_CPU_NO_AVX2=1 turns off
 * both). */
bool lp_backend_cpu_uses_avx512(const struct lp_backend *be);

/* Context positions per chunk of a row's attention (attention.c). */
#define LP_CPU_ATTN_CHUNK 64

#if LP_CPU_X86
/* dst[0 .. len) = f32 of weights k0 .. k0 + len of a row of type t; k0 and
 * len are multiples of the block size. */
void lp_cpu_dequant_avx2(enum lp_dtype t, const void *row, int64_t k0, int64_t len, float *dst);

/* Writes the copy of rows x[0 .. n) (k floats apart, n <= LP_CPU_MATVEC_BATCH_MAX,
 * k / 32 <= LP_CPU_MATVEC_MAX_BLOCKS) that lp_cpu_matvec_avx2 reads for
 * weights of a prepped type t (lp_cpu_matvec_prepped) to prep, in the
 * layout described above LP_CPU_MATVEC_MAX_BLOCKS (vec-avx2.c details it per
 * type). Borrows x; prep is caller-owned. */
void lp_cpu_matvec_prep_avx2(enum lp_dtype t, const float *x, int n, int64_t k, float *prep);

/* out[j, r] (+)= x[j, :] . w[r, :] for r in [r0, r1), j < n <= 4, rows of w
 * w_stride bytes apart; out rows ldo floats apart. For the prepped types
 * the rows of x are read from prep, made by lp_cpu_matvec_prep_avx2 (x is
 * unused); for the other types x is read directly (prep is unused). */
void lp_cpu_matvec_avx2(enum lp_dtype t, const void *w, size_t w_stride, int64_t r0, int64_t r1,
                        int64_t k, const float *x, int n, const float *prep, float *out,
                        int64_t ldo, bool accumulate);

/* Dequantizes columns [k0, k0 + kc) of weight rows [c0, c0 + ncols) into
 * panel ([kc][LP_CPU_NR], columns past ncols zero), using rows as scratch;
 * with lp_cpu_dequant_avx512 where avx512. */
void lp_cpu_pack_panel_avx2(enum lp_dtype t, const void *w, size_t w_stride, int64_t c0, int ncols,
                            int64_t k0, int64_t kc, float *panel, float *rows, bool avx512);
/* lp_cpu_dequant_avx2 with AVX-512 (vec-avx512.c) for Q4_0, Q4_1, Q5_0,
 * Q5_1 and Q8_0, the same values; other types go to lp_cpu_dequant_avx2. */
void lp_cpu_dequant_avx512(enum lp_dtype t, const void *row, int64_t k0, int64_t len, float *dst);

/* For i < n, c < ncols <= LP_CPU_NR: out[i, c] = (load ? out[i, c] : 0) +
 * sum over kk < kc of x[i, kk] * panel[kk, c], one fused multiply-add chain
 * per element in kk order (x rows ldx floats apart, out rows ldo). */
void lp_cpu_gemm_panel_avx2(int n, int64_t kc, const float *x, int64_t ldx, const float *panel,
                            float *out, int64_t ldo, int ncols, bool load);
/* The weight types lp_cpu_matvec_avx512 takes: Q4_0, Q4_1, Q5_0, Q5_1,
 * Q8_0 and the K-quants. */
static inline bool lp_cpu_matvec512(enum lp_dtype t)
{
	return lp_cpu_matvec_prepped(t) || t == LP_DTYPE_Q8_0;
}

/* lp_cpu_matvec_prep_avx2's copy of x for lp_cpu_matvec_avx512 (for Q8_0
 * a plain copy of x): the same values, each 64 floats the kernel takes as
 * a pair (two blocks, or two sides of a K-quant's bytes) interleaved by 8. */
void lp_cpu_matvec_prep_avx512(enum lp_dtype t, const float *x, int n, int64_t k, float *prep);

/* lp_cpu_matvec_avx2 for the types of lp_cpu_matvec512 with up to
 * LP_CPU_MATVEC512_MAX_N rows, x from lp_cpu_matvec_prep_avx512: the same
 * bits (vec-avx512.c). */
void lp_cpu_matvec_avx512(enum lp_dtype t, const void *w, size_t w_stride, int64_t r0, int64_t r1,
                          int64_t k, int n, const float *prep, float *out, int64_t ldo,
                          bool accumulate);

/* The same with AVX-512 (vec-avx512.c): the same bits, twice the width. */
/* ... and for two panels side by side (32 columns: panel's 16, then
 * ncols2 of panel2), the same bits again. */
void lp_cpu_gemm_panels_avx512(int n, int64_t kc, const float *x, int64_t ldx, const float *panel,
                               const float *panel2, float *out, int64_t ldo, int ncols2, bool load);
void lp_cpu_gemm_panel_avx512(int n, int64_t kc, const float *x, int64_t ldx, const float *panel,
                              float *out, int64_t ldo, int ncols, bool load);

/* x[i] = exp(x[i]) for i < n, to about 2 ulp; x[i] <= 88.7. */
void lp_cpu_exp_avx2(float *x, int n);
/* out[i] = silu(gate[i]) * up[i]; out may equal gate. */
void lp_cpu_silu_mul_avx2(float *out, const float *gate, const float *up, int64_t n);

/* Attention (attention.c says what a row computes; these are its AVX2
 * steps, each element taking the same operations wherever it falls and
 * whatever the other rows of the call, so that a row's result depends on
 * its own query and context only).
 *
 * chunk: one chunk of nq (1 or 2) rows: query q[a] (hd floats) against the
 * same cnt (1 .. LP_CPU_ATTN_CHUNK) cache rows, row j's K at kbase +
 * rows[j] * stride and its V at vbase + rows[j] * stride (hd elements of
 * type kt: f32, f16 or bf16, each converted to f32 exactly). Where part[a]
 * is NULL the chunk is folded into row a's state:
 * o[a] (hd floats) and ml[a] (M, L). Otherwise the chunk's own state goes
 * to part[a]: hd floats of weighted values, then its maximum and sum (o[a]
 * and ml[a] are unused).
 *
 * fold: folds a chunk's state written by chunk (part) into (o, ml), with
 * the operations chunk folds it with.
 *
 * gather: dst[j * hd + i] = element i of the row at base + rows[j] *
 * stride (type kt) as f32, for j < cnt and i < hd. */
void lp_cpu_attn_chunk_kv_avx2(int nq, const float *const q[], const char *kbase, const char *vbase,
                               size_t stride, enum lp_dtype kt, const int64_t *rows, int cnt,
                               int hd, float scale, float *const o[], float *const ml[],
                               float *const part[]);
void lp_cpu_attn_fold_avx2(float *o, float *ml, const float *part, int hd);
void lp_cpu_attn_gather_kv_avx2(float *dst, const char *base, size_t stride, const int64_t *rows,
                                int cnt, int hd, enum lp_dtype kt);
void lp_cpu_f32_to_f16_avx2(uint16_t *dst, const float *src, int64_t n);
#endif

#endif
