/* The CUDA backend through its ops table (kernels/cuda/backend-cuda.cu) on
 * the emulated device, or on a real one when built for make test-gpu:
 * open and info, reserve and its refusal, buffers and transfers, weight
 * import, the sticky status after a bad index, bucket padding, and CUDA
 * Graphs.
 *
 * Tolerances: none. Weight import is compared with the host's own
 * round-to-nearest-even conversion, bit for bit. Graph replays run the
 * very kernels an eager step runs, on the same data, so a replayed step is
 * compared with the same step on a backend with graphs off
 * (LORAPLANE_CUDA_GRAPHS=0) bit for bit; get_rows of f16 rows widens
 * exactly and is compared with the CPU backend bit for bit too. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/backend.h"
#include "kernels/cuda-loader.h"
#include "kernels/cuda/cuda.cuh"
#include "tests/test.h"

#define VOCAB 50
#define DIM   64
#define M     48  /* rows of the matmul weight */
#define ROWS  128 /* rows of the step buffers */

static uint32_t rng_state = 12345;

static float frand(void)
{
	rng_state = rng_state * 1664525u + 1013904223u;
	return (float)((rng_state >> 8) & 0xffff) / 32768.0f - 1.0f;
}

static void fill(float *x, size_t n)
{
	for (size_t i = 0; i < n; i++)
		x[i] = frand();
}

static struct lp_backend_limits small_limits(int max_tokens)
{
	struct lp_backend_limits l;

	memset(&l, 0, sizeof(l));
	l.n_layers = 2;
	l.dim = DIM;
	l.n_heads = 4;
	l.n_kv_heads = 2;
	l.head_dim = 16;
	l.ffn_dim = 96;
	l.vocab = VOCAB;
	l.max_tokens = max_tokens;
	l.max_seqs = 16;
	l.max_out = max_tokens;
	l.block_size = 16;
	l.max_blocks_per_seq = 8;
	l.kv_type = LP_DTYPE_F16;
	l.max_loras = 2;
	l.max_lora_rank = 8;
	l.lora_type = LP_DTYPE_F16;
	l.max_logprobs = 4;
	return l;
}

/* The backend on device 0, graphs on or off. */
static struct lp_backend *open_cuda(bool graphs, struct lp_err *err)
{
	struct lp_backend *be = NULL;

	if (!graphs)
		setenv("LORAPLANE_CUDA_GRAPHS", "0", 1);
	if (lp_backend_cuda_emu_new(&be, err))
		be = NULL;
	unsetenv("LORAPLANE_CUDA_GRAPHS");
	return be;
}

static struct lp_cuda_counters counters(struct lp_backend *be)
{
	struct lp_cuda_counters c;

	memset(&c, 0, sizeof(c));
	lp_cuda_backend_counters(be, &c);
	return c;
}

static void test_open_and_info(void)
{
	struct lp_err err = {};
	struct lp_backend *be = open_cuda(true, &err);
	struct lp_backend_info info;

	CHECK_MSG(be, "open: %s", err.msg);
	be->ops->info(be->ctx, &info);
#ifdef LP_CUDA_EMU
	CHECK_EQ_STR(info.name, "cuda-emu");
	CHECK_EQ_STR(be->ops->name, "cuda-emu");
#else
	CHECK_EQ_STR(info.name, "cuda");
#endif
	CHECK_MSG(strstr(info.device, " (sm_") && strstr(info.device, ", device 0)"), "device '%s'",
	          info.device);
	CHECK(info.total_bytes > 0 && info.free_bytes <= info.total_bytes);
	CHECK_EQ_INT(info.kv_type, LP_DTYPE_F16);
	CHECK_EQ_INT(info.lora_type, LP_DTYPE_F16);
	CHECK_EQ_INT(info.weight_types, (1u << LP_DTYPE_F16) | (1u << LP_DTYPE_BF16));
	CHECK(!info.host_memory);
	CHECK(info.token_buckets > 0);
	CHECK(info.peak_bandwidth > 1e9); /* memory clock x bus width */
	CHECK(info.launches == 0 && info.upload_bytes == 0 && info.graph_replays == 0);
	CHECK_OK(lp_backend_status(be, &err), &err);
	lp_backend_destroy(be);
}

static void test_open_without_a_device(void)
{
	struct lp_err err = {};
	struct lp_backend *be = NULL;
	int rc;

	rc = lp_cuda_backend_open(7, &be, &err);
	CHECK_EQ_INT(rc, -ENODEV);
	CHECK(!be);
	CHECK_MSG(strstr(err.msg, "no CUDA device 7"), "message '%s'", err.msg);
#ifdef LP_CUDA_EMU
	setenv("LP_EMU_NO_DEVICE", "1", 1);
	rc = lp_backend_cuda_emu_new(&be, &err);
	unsetenv("LP_EMU_NO_DEVICE");
	CHECK_EQ_INT(rc, -ENODEV);
	CHECK(!be);
	CHECK_MSG(strstr(err.msg, "no CUDA device") && strstr(err.msg, "cudaErrorNoDevice"),
	          "message '%s'", err.msg);
#endif
}

static void test_reserve(void)
{
	struct lp_err err = {};
	struct lp_backend *be = open_cuda(true, &err), *big;
	struct lp_backend_limits lim = small_limits(64), huge;
	struct lp_backend_info info;
	size_t bytes = 0;

	CHECK_MSG(be, "open: %s", err.msg);
	CHECK_OK(be->ops->reserve(be->ctx, &lim, &bytes, &err), &err);
	CHECK(bytes > 0);
	be->ops->info(be->ctx, &info);
	CHECK_EQ_INT(info.token_buckets, 9); /* 1 2 4 8 16 24 32 48 64 */
	CHECK_EQ_INT(be->ops->reserve(be->ctx, &lim, &bytes, &err), -EBUSY);
	CHECK_OK(lp_backend_status(be, &err), &err);
	lp_backend_destroy(be);

	/* far more than the device has: refused with the figures, and the
	 * backend stays usable */
	big = open_cuda(true, &err);
	CHECK_MSG(big, "open: %s", err.msg);
	huge = small_limits(1 << 20);
	huge.dim = 1 << 14;
	huge.ffn_dim = 1 << 16;
	huge.n_heads = 128;
	huge.head_dim = 128;
	huge.vocab = 1 << 20;
	bytes = 1;
	CHECK_EQ_INT(big->ops->reserve(big->ctx, &huge, &bytes, &err), -ENOMEM);
	CHECK_MSG(strstr(err.msg, "MiB") && strstr(err.msg, "free"), "message '%s'", err.msg);
	CHECK_EQ_INT(bytes, 0);
	CHECK_OK(lp_backend_status(big, &err), &err);
	CHECK_OK(big->ops->reserve(big->ctx, &lim, &bytes, &err), &err);
	lp_backend_destroy(big);
}

static void test_buffers_and_transfers(void)
{
	struct lp_err err = {};
	struct lp_backend *be = open_cuda(true, &err);
	struct lp_buffer a, imp;
	unsigned char host[1000], back[1000], *pinned = NULL;

	CHECK_MSG(be, "open: %s", err.msg);
	/* alloc is zeroed */
	CHECK_OK(lp_backend_alloc(be, sizeof(back), &a, &err), &err);
	CHECK(a.data && a.size == sizeof(back) && a.owned);
	memset(back, 0x5a, sizeof(back));
	lp_backend_download(be, back, a.data, sizeof(back));
	for (size_t i = 0; i < sizeof(back); i++)
		CHECK_MSG(back[i] == 0, "byte %zu of a new buffer is %d", i, back[i]);

	/* upload from pinned memory, into the middle, and back */
	CHECK_OK(be->ops->host_alloc(be->ctx, sizeof(host), (void **)&pinned, &err), &err);
	for (size_t i = 0; i < sizeof(host); i++)
		pinned[i] = (unsigned char)(i * 7 + 1);
	lp_backend_upload(be, (char *)a.data + 100, pinned, 500);
	lp_backend_download(be, back, a.data, sizeof(back));
	for (size_t i = 0; i < sizeof(back); i++) {
		unsigned char want = i >= 100 && i < 600 ? (unsigned char)((i - 100) * 7 + 1) : 0;
		CHECK_MSG(back[i] == want, "byte %zu: %d, want %d", i, back[i], want);
	}
	CHECK(counters(be).upload_bytes == 500);
	be->ops->host_free(be->ctx, pinned);

	/* import copies: the host bytes may change or go afterwards */
	for (size_t i = 0; i < sizeof(host); i++)
		host[i] = (unsigned char)(255 - i);
	CHECK_OK(lp_backend_import(be, host, sizeof(host), &imp, &err), &err);
	CHECK(imp.owned && imp.data != (void *)host);
	memset(host, 0, sizeof(host));
	lp_backend_download(be, back, imp.data, sizeof(back));
	for (size_t i = 0; i < sizeof(back); i++)
		CHECK_MSG(back[i] == (unsigned char)(255 - i), "imported byte %zu: %d", i, back[i]);
	lp_backend_free(be, &a);
	lp_backend_free(be, &imp);
	CHECK(!a.data && !imp.data);
	CHECK_EQ_INT(lp_backend_import(be, NULL, 10, &imp, &err), -EINVAL);
	CHECK(!imp.data);
	CHECK_OK(lp_backend_status(be, &err), &err);
	lp_backend_destroy(be);
}

/* Quantizes n f32 values into Q8_0 blocks. */
static void quantize_q8_0(const float *x, struct lp_block_q8_0 *b, int n)
{
	for (int i = 0; i < n / LP_QK; i++) {
		float amax = 0, d;

		for (int j = 0; j < LP_QK; j++)
			amax = fabsf(x[i * LP_QK + j]) > amax ? fabsf(x[i * LP_QK + j]) : amax;
		d = amax / 127.0f;
		b[i].d = lp_f32_to_f16(d);
		for (int j = 0; j < LP_QK; j++)
			b[i].qs[j] = (int8_t)(d ? lroundf(x[i * LP_QK + j] / d) : 0);
	}
}

static void test_import_weight(void)
{
	enum { R = 5, C = 64 };
	struct lp_err err = {};
	struct lp_backend *be = open_cuda(true, &err);
	float w32[R * C], deq[C];
	uint16_t w16[R * C], back[R * C];
	struct lp_block_q8_0 q8[R * C / LP_QK];
	struct lp_tensor t;
	struct lp_buffer buf;

	CHECK_MSG(be, "open: %s", err.msg);
	fill(w32, R * C);

	/* f32 -> f16, rounded to nearest even */
	CHECK_OK(be->ops->import_weight(be->ctx, w32, LP_DTYPE_F32, R, C, &t, &buf, &err), &err);
	CHECK_EQ_INT(t.type, LP_DTYPE_F16);
	CHECK(t.rows == R && t.cols == C && t.data == buf.data && buf.owned);
	CHECK_EQ_INT(buf.size, R * C * 2);
	lp_backend_download(be, back, t.data, sizeof(back));
	for (int i = 0; i < R * C; i++)
		CHECK_MSG(back[i] == lp_f32_to_f16(w32[i]), "f32 -> f16 element %d", i);
	lp_backend_free(be, &buf);

	/* bf16 stays bf16, bit for bit */
	for (int i = 0; i < R * C; i++)
		w16[i] = lp_f32_to_bf16(w32[i]);
	CHECK_OK(be->ops->import_weight(be->ctx, w16, LP_DTYPE_BF16, R, C, &t, &buf, &err), &err);
	CHECK_EQ_INT(t.type, LP_DTYPE_BF16);
	lp_backend_download(be, back, t.data, sizeof(back));
	CHECK(!memcmp(back, w16, sizeof(back)));
	lp_backend_free(be, &buf);

	/* Q8_0 -> f16 of the dequantized values */
	quantize_q8_0(w32, q8, R * C);
	CHECK_OK(be->ops->import_weight(be->ctx, q8, LP_DTYPE_Q8_0, R, C, &t, &buf, &err), &err);
	CHECK_EQ_INT(t.type, LP_DTYPE_F16);
	lp_backend_download(be, back, t.data, sizeof(back));
	for (int r = 0; r < R; r++) {
		lp_dequantize_row(LP_DTYPE_Q8_0,
		                  (const char *)q8 + r * lp_dtype_row_bytes(LP_DTYPE_Q8_0, C), deq,
		                  C);
		for (int c = 0; c < C; c++)
			CHECK_MSG(back[r * C + c] == lp_f32_to_f16(deq[c]), "q8_0 element %d, %d",
			          r, c);
	}
	lp_backend_free(be, &buf);

	/* Q4_K (blocks of 256, sub-block scales) -> f16 of the dequantized values */
	{
		struct lp_block_q4_k qk[2];
		float kd[256];
		uint16_t kb[2 * 256];

		memset(qk, 0, sizeof(qk));
		for (int b = 0; b < 2; b++) {
			qk[b].d = lp_f32_to_f16(0.01f * (b + 1));
			qk[b].dmin = lp_f32_to_f16(0.002f);
			for (int i = 0; i < 12; i++)
				qk[b].scales[i] = (uint8_t)(37 * i + 11 * b);
			for (int i = 0; i < 128; i++)
				qk[b].qs[i] = (uint8_t)(29 * i + b);
		}
		CHECK_OK(be->ops->import_weight(be->ctx, qk, LP_DTYPE_Q4_K, 2, 256, &t, &buf, &err),
		         &err);
		CHECK_EQ_INT(t.type, LP_DTYPE_F16);
		CHECK_EQ_INT(buf.size, 2 * 256 * 2);
		lp_backend_download(be, kb, t.data, sizeof(kb));
		for (int r = 0; r < 2; r++) {
			lp_dequantize_row(LP_DTYPE_Q4_K, &qk[r], kd, 256);
			for (int c = 0; c < 256; c++)
				CHECK_MSG(kb[r * 256 + c] == lp_f32_to_f16(kd[c]),
				          "q4_k element %d, %d", r, c);
		}
		lp_backend_free(be, &buf);
		/* a K-quant row must be whole 256-weight blocks */
		CHECK_EQ_INT(
		    be->ops->import_weight(be->ctx, qk, LP_DTYPE_Q4_K, 1, 128, &t, &buf, &err),
		    -EINVAL);
	}

	/* refused: a row that is not whole blocks, an index type, no data */
	CHECK_EQ_INT(be->ops->import_weight(be->ctx, q8, LP_DTYPE_Q4_0, 1, 33, &t, &buf, &err),
	             -EINVAL);
	CHECK_EQ_INT(be->ops->import_weight(be->ctx, w32, LP_DTYPE_I32, 1, 4, &t, &buf, &err),
	             -EINVAL);
	CHECK_EQ_INT(be->ops->import_weight(be->ctx, NULL, LP_DTYPE_F32, 1, 4, &t, &buf, &err),
	             -EINVAL);
	CHECK(!buf.data);
	CHECK_OK(lp_backend_status(be, &err), &err);
	lp_backend_destroy(be);
}

/* get_rows of an f16 table on CUDA and on the CPU backend: the same f32
 * rows (widening f16 is exact). */
static void test_get_rows_matches_cpu(void)
{
	enum { N = 7 };
	struct lp_err err = {};
	struct lp_backend *be = open_cuda(true, &err), *cpu = NULL;
	float table32[VOCAB * DIM], got[N * DIM], want[N * DIM];
	uint16_t table16[VOCAB * DIM];
	int32_t ids[N] = {0, 49, 3, 3, 17, 48, 1};
	struct lp_tensor t_cuda, t_cpu, out_cuda, out_cpu;
	struct lp_buffer tb_cuda, tb_cpu, ob_cuda, ob_cpu, ib_cuda;

	CHECK_MSG(be, "open: %s", err.msg);
	CHECK_OK(lp_backend_cpu_new(&cpu, 1, &err), &err);
	fill(table32, VOCAB * DIM);
	for (int i = 0; i < VOCAB * DIM; i++)
		table16[i] = lp_f32_to_f16(table32[i]);
	CHECK_OK(be->ops->import_weight(be->ctx, table16, LP_DTYPE_F16, VOCAB, DIM, &t_cuda,
	                                &tb_cuda, &err),
	         &err);
	CHECK_OK(cpu->ops->import_weight(cpu->ctx, table16, LP_DTYPE_F16, VOCAB, DIM, &t_cpu,
	                                 &tb_cpu, &err),
	         &err);
	CHECK_OK(lp_backend_alloc(be, sizeof(got), &ob_cuda, &err), &err);
	CHECK_OK(lp_backend_alloc(cpu, sizeof(want), &ob_cpu, &err), &err);
	CHECK_OK(lp_backend_import(be, ids, sizeof(ids), &ib_cuda, &err), &err);
	out_cuda = {ob_cuda.data, LP_DTYPE_F32, N, DIM};
	out_cpu = {ob_cpu.data, LP_DTYPE_F32, N, DIM};
	be->ops->get_rows(be->ctx, &out_cuda, &t_cuda, (const int32_t *)ib_cuda.data, N);
	cpu->ops->get_rows(cpu->ctx, &out_cpu, &t_cpu, ids, N);
	lp_backend_download(be, got, ob_cuda.data, sizeof(got));
	lp_backend_download(cpu, want, ob_cpu.data, sizeof(want));
	CHECK_OK(lp_backend_status(be, &err), &err);
	CHECK_OK(lp_backend_status(cpu, &err), &err);
	CHECK(!memcmp(got, want, sizeof(got)));
	lp_backend_free(be, &tb_cuda);
	lp_backend_free(be, &ob_cuda);
	lp_backend_free(be, &ib_cuda);
	lp_backend_free(cpu, &tb_cpu);
	lp_backend_free(cpu, &ob_cpu);
	lp_backend_destroy(be);
	lp_backend_destroy(cpu);
}

/* A bad index sets the status, naming the op; from then on nothing runs
 * and the status stays. */
static void test_sticky_status(void)
{
	struct lp_err err = {}, err2 = {};
	struct lp_backend *be = open_cuda(true, &err);
	float table[VOCAB * DIM], x0[2 * DIM], nw[DIM], back[2 * DIM];
	int32_t ids[3] = {0, VOCAB + 5, 2};
	struct lp_tensor tt, out, x, w;
	struct lp_buffer tb, ob, xb, wb, ib, extra;

	CHECK_MSG(be, "open: %s", err.msg);
	fill(table, VOCAB * DIM);
	fill(x0, 2 * DIM);
	fill(nw, DIM);
	CHECK_OK(be->ops->import_weight(be->ctx, table, LP_DTYPE_F32, VOCAB, DIM, &tt, &tb, &err),
	         &err);
	CHECK_OK(lp_backend_alloc(be, 3 * DIM * sizeof(float), &ob, &err), &err);
	CHECK_OK(lp_backend_import(be, x0, sizeof(x0), &xb, &err), &err);
	CHECK_OK(lp_backend_import(be, nw, sizeof(nw), &wb, &err), &err);
	CHECK_OK(lp_backend_import(be, ids, sizeof(ids), &ib, &err), &err);
	out = {ob.data, LP_DTYPE_F32, 3, DIM};
	x = {xb.data, LP_DTYPE_F32, 2, DIM};
	w = {wb.data, LP_DTYPE_F32, 1, DIM};

	be->ops->get_rows(be->ctx, &out, &tt, (const int32_t *)ib.data, 3);
	CHECK_EQ_INT(lp_backend_status(be, &err), -EIO);
	CHECK_MSG(strstr(err.msg, "get_rows") && strstr(err.msg, "outside the table"),
	          "message '%s'", err.msg);

	/* later ops and transfers do nothing */
	be->ops->rmsnorm(be->ctx, &x, &x, &w, 1e-5f);
	lp_backend_upload(be, xb.data, nw, sizeof(nw));
	memset(back, 0x7f, sizeof(back));
	lp_backend_download(be, back, xb.data, sizeof(back));
	for (size_t i = 0; i < sizeof(back); i++)
		CHECK_MSG(((unsigned char *)back)[i] == 0x7f, "a download after a failure copied");
#ifdef LP_CUDA_EMU
	/* emulated device memory is host memory: x is as it was */
	CHECK(!memcmp(xb.data, x0, sizeof(x0)));
#endif
	CHECK_EQ_INT(lp_backend_alloc(be, 16, &extra, &err2), -EIO);
	CHECK(!extra.data);

	/* and the status stays, with the first failure's message */
	be->ops->synchronize(be->ctx);
	CHECK_EQ_INT(lp_backend_status(be, &err2), -EIO);
	CHECK_EQ_STR(err2.msg, err.msg);
	lp_backend_free(be, &tb);
	lp_backend_free(be, &ob);
	lp_backend_free(be, &xb);
	lp_backend_free(be, &wb);
	lp_backend_free(be, &ib);
	lp_backend_destroy(be);
}

static void test_bucket_padding(void)
{
	static const int decode[][2] = {{1, 1},   {2, 2},    {3, 4},    {5, 8},   {9, 16},
	                                {16, 16}, {17, 24},  {25, 32},  {33, 48}, {49, 64},
	                                {65, 96}, {97, 100}, {100, 100}};
	struct lp_err err = {};
	struct lp_backend *be = open_cuda(true, &err);
	struct lp_backend_limits lim = small_limits(100);
	struct lp_backend_info info;
	struct lp_step_shape s;
	size_t bytes;

	CHECK_MSG(be, "open: %s", err.msg);
	CHECK_OK(be->ops->reserve(be->ctx, &lim, &bytes, &err), &err);
	be->ops->info(be->ctx, &info);
	CHECK_EQ_INT(info.token_buckets, 11);
	for (size_t i = 0; i < sizeof(decode) / sizeof(decode[0]); i++) {
		s = {decode[i][0], decode[i][0], decode[i][0], true, false};
		CHECK_EQ_INT(be->ops->begin_step(be->ctx, &s), decode[i][1]);
		be->ops->end_step(be->ctx);
	}
	/* prefill steps keep their row count */
	s = {7, 2, 2, false, true};
	CHECK_EQ_INT(be->ops->begin_step(be->ctx, &s), 7);
	be->ops->end_step(be->ctx);
	CHECK_OK(lp_backend_status(be, &err), &err);
	CHECK_EQ_INT(counters(be).captures, 0); /* steps without ops capture nothing */

	s = {101, 101, 101, true, false};
	be->ops->begin_step(be->ctx, &s);
	be->ops->end_step(be->ctx);
	CHECK_EQ_INT(lp_backend_status(be, &err), -EINVAL);
	CHECK_MSG(strstr(err.msg, "max_tokens"), "message '%s'", err.msg);
	lp_backend_destroy(be);
}

/* Graphs: one small step (get_rows, rmsnorm, matmul, silu_mul; with LoRA
 * on, also z = x . w_o^T plus the LoRA of the o group from slot 0) on two
 * backends, graphs on and off, with the same data and calls. */
#define RANK 4

struct rig {
	struct lp_backend *be;
	struct lp_buffer table_b, w_b, wo_b, nw_b, ids_b, x_b, y_b, z_b, tmp_b;
	struct lp_tensor table, w, wo, nw, x, y, z, tmp;
	int32_t *host_ids; /* pinned [2 * ROWS]: token ids, then LoRA slots */
};

/* An adapter with the o target on layer 0 only, its weights from seed
 * (B^T [RANK, DIM] is one panel: DIM <= LP_LORA_PANEL). */
static int rig_fill(struct rig *r, unsigned seed, struct lp_err *err)
{
	static float a[RANK * DIM], b[RANK * DIM];
	struct lp_lora_pair pairs[2 * LP_LORA_N_TARGETS];
	struct lp_lora_stack stacks[2 * LP_LORA_N_GROUPS];
	struct lp_lora_weights w = {2, pairs, stacks};

	rng_state = seed;
	fill(a, RANK * DIM);
	fill(b, RANK * DIM);
	memset(pairs, 0, sizeof(pairs));
	memset(stacks, 0, sizeof(stacks));
	pairs[LP_LORA_O] = {RANK, a, b, LP_DTYPE_F32, LP_DTYPE_F32};
	stacks[LP_LORA_GROUP_O] = {RANK, a, LP_DTYPE_F32};
	return r->be->ops->lora_fill(r->be->ctx, 0, &w, err);
}

static int rig_init(struct rig *r, bool graphs, struct lp_err *err)
{
	struct lp_backend_limits lim = small_limits(ROWS);
	static float table[VOCAB * DIM], w[M * DIM], wo[DIM * DIM], nw[DIM];
	size_t bytes;
	int rc;

	memset(r, 0, sizeof(*r));
	rng_state = 777;
	fill(table, VOCAB * DIM);
	fill(w, M * DIM);
	fill(wo, DIM * DIM);
	fill(nw, DIM);
	if (!(r->be = open_cuda(graphs, err)))
		return -1;
	if ((rc = r->be->ops->reserve(r->be->ctx, &lim, &bytes, err)) ||
	    (rc = r->be->ops->import_weight(r->be->ctx, table, LP_DTYPE_F32, VOCAB, DIM, &r->table,
	                                    &r->table_b, err)) ||
	    (rc = r->be->ops->import_weight(r->be->ctx, w, LP_DTYPE_F32, M, DIM, &r->w, &r->w_b,
	                                    err)) ||
	    (rc = r->be->ops->import_weight(r->be->ctx, wo, LP_DTYPE_F32, DIM, DIM, &r->wo,
	                                    &r->wo_b, err)) ||
	    (rc = lp_backend_import(r->be, nw, sizeof(nw), &r->nw_b, err)) ||
	    (rc = lp_backend_alloc(r->be, 2 * ROWS * sizeof(int32_t), &r->ids_b, err)) ||
	    (rc = lp_backend_alloc(r->be, ROWS * DIM * sizeof(float), &r->x_b, err)) ||
	    (rc = lp_backend_alloc(r->be, ROWS * M * sizeof(float), &r->y_b, err)) ||
	    (rc = lp_backend_alloc(r->be, ROWS * DIM * sizeof(float), &r->z_b, err)) ||
	    (rc = lp_backend_alloc(r->be, ROWS * LP_LORA_MAX_OUTS * 8 * sizeof(float), &r->tmp_b,
	                           err)) ||
	    (rc = r->be->ops->host_alloc(r->be->ctx, 2 * ROWS * sizeof(int32_t),
	                                 (void **)&r->host_ids, err)) ||
	    (rc = rig_fill(r, 1, err)))
		return rc;
	r->nw = {r->nw_b.data, LP_DTYPE_F32, 1, DIM};
	r->x = {r->x_b.data, LP_DTYPE_F32, ROWS, DIM};
	r->y = {r->y_b.data, LP_DTYPE_F32, ROWS, M};
	r->z = {r->z_b.data, LP_DTYPE_F32, ROWS, DIM};
	r->tmp = {r->tmp_b.data, LP_DTYPE_F32, ROWS, LP_LORA_MAX_OUTS * 8};
	return 0;
}

static void rig_release(struct rig *r)
{
	if (!r->be)
		return;
	r->be->ops->host_free(r->be->ctx, r->host_ids);
	lp_backend_free(r->be, &r->table_b);
	lp_backend_free(r->be, &r->w_b);
	lp_backend_free(r->be, &r->wo_b);
	lp_backend_free(r->be, &r->z_b);
	lp_backend_free(r->be, &r->tmp_b);
	lp_backend_free(r->be, &r->nw_b);
	lp_backend_free(r->be, &r->ids_b);
	lp_backend_free(r->be, &r->x_b);
	lp_backend_free(r->be, &r->y_b);
	lp_backend_destroy(r->be);
	r->be = NULL;
}

enum step_twist {
	TWIST_NONE,
	TWIST_EPS,         /* a different rmsnorm eps */
	TWIST_UPLOAD,      /* a transfer between two ops */
	TWIST_LATE_META,   /* the ids uploaded after begin_step, before the first op */
	TWIST_BAD_CAPTURE, /* the stream is made to refuse the capture */
};

/* One step of n tokens with ids (seeded by seed); y_out gets [n, M], and
 * with lora z_out [n, DIM] (every row of the step uses slot 0). */
static int rig_step(struct rig *r, int n, bool decode, bool lora, unsigned seed,
                    enum step_twist twist, float *y_out, float *z_out)
{
	const struct lp_backend_ops *o = r->be->ops;
	const int32_t *ids = (const int32_t *)r->ids_b.data;
	struct lp_step_shape s = {n, n, n, decode, lora};
	struct lp_tensor x, y, z, tmp;
	struct lp_lora_args la;
	int p;

	for (int i = 0; i < ROWS; i++) {
		r->host_ids[i] = i < n ? (int32_t)((seed * 31u + (unsigned)i * 7u) % VOCAB) : 0;
		r->host_ids[ROWS + i] = i < n ? 0 : -1;
	}
	if (twist != TWIST_LATE_META)
		lp_backend_upload(r->be, r->ids_b.data, r->host_ids, 2 * ROWS * sizeof(int32_t));
	p = o->begin_step(r->be->ctx, &s);
	if (twist == TWIST_LATE_META)
		lp_backend_upload(r->be, r->ids_b.data, r->host_ids, 2 * ROWS * sizeof(int32_t));
	x = lp_tensor_rows(&r->x, 0, p);
	y = lp_tensor_rows(&r->y, 0, p);
	z = lp_tensor_rows(&r->z, 0, p);
	tmp = lp_tensor_rows(&r->tmp, 0, p);
	o->get_rows(r->be->ctx, &x, &r->table, ids, p);
	o->rmsnorm(r->be->ctx, &x, &x, &r->nw, twist == TWIST_EPS ? 1e-3f : 1e-5f);
	if (twist == TWIST_UPLOAD)
		lp_backend_upload(r->be, r->ids_b.data, r->host_ids, ROWS * sizeof(int32_t));
	o->matmul(r->be->ctx, &y, &x, &r->w, false);
	o->silu_mul(r->be->ctx, &y, &y, &y);
	if (lora) {
		memset(&la, 0, sizeof(la));
		la.layer = 0;
		la.group = LP_LORA_GROUP_O;
		la.x = &x;
		la.out[0] = &z;
		la.tmp = &tmp;
		la.tok_slot = ids + ROWS;
		la.decode = decode;
		o->matmul(r->be->ctx, &z, &x, &r->wo, false);
		if (decode) /* (prefill would pass segments) */
			o->lora(r->be->ctx, &la);
	}
	if (twist == TWIST_BAD_CAPTURE) {
		/* a capture already under way on the backend's stream makes
		 * end_step's own capture fail */
		struct lp_cuda *cu = (struct lp_cuda *)r->be->ctx;

		cudaStreamBeginCapture(cu->stream, cudaStreamCaptureModeThreadLocal);
	}
	o->end_step(r->be->ctx);
	lp_backend_download(r->be, y_out, r->y_b.data, (size_t)n * M * sizeof(float));
	if (lora)
		lp_backend_download(r->be, z_out, r->z_b.data, (size_t)n * DIM * sizeof(float));
	return p;
}

static void test_graphs_replay_what_eager_steps_compute(void)
{
	struct {
		int n;
		bool decode, lora;
		enum step_twist twist;
		unsigned refill; /* before the step, slot 0 gets the adapter of this seed */
		/* counters after the step */
		int captures, launches, mismatches, failures;
	} steps[] = {
	    {3, true, false, TWIST_NONE, 0, 1, 0, 0, 0},         /* bucket 4: recorded, captured */
	    {3, true, false, TWIST_NONE, 0, 1, 1, 0, 0},         /* replayed, new ids */
	    {4, true, false, TWIST_NONE, 0, 1, 2, 0, 0},         /* same bucket */
	    {4, true, false, TWIST_LATE_META, 0, 1, 3, 0, 0},    /* still replayed */
	    {2, true, false, TWIST_NONE, 0, 2, 3, 0, 0},         /* bucket 2 */
	    {3, false, false, TWIST_NONE, 0, 2, 3, 0, 0},        /* prefill: eager */
	    {3, true, true, TWIST_NONE, 0, 3, 3, 0, 0},          /* lora on: its own key */
	    {3, true, true, TWIST_NONE, 0, 3, 4, 0, 0},          /* replayed */
	    {4, true, true, TWIST_NONE, 2, 3, 5, 0, 0},          /* replayed, slot 0 refilled */
	    {3, true, false, TWIST_EPS, 0, 3, 5, 1, 0},          /* differs: eager, key dropped */
	    {3, true, false, TWIST_NONE, 0, 3, 5, 1, 0},         /* that key stays eager */
	    {5, true, false, TWIST_NONE, 0, 4, 5, 1, 0},         /* bucket 8 */
	    {6, true, false, TWIST_UPLOAD, 0, 4, 5, 2, 0},       /* a transfer inside: eager */
	    {10, true, false, TWIST_BAD_CAPTURE, 0, 4, 5, 2, 1}, /* bucket 16: capture fails */
	    {11, true, false, TWIST_NONE, 0, 4, 5, 2, 1},        /* and that key runs eagerly */
	    {20, true, true, TWIST_NONE, 3, 5, 5, 2, 1},         /* bucket 24 */
	    {24, true, true, TWIST_NONE, 0, 5, 6, 2, 1},
	};
	static float got[ROWS * M], want[ROWS * M], first[ROWS * M], zgot[ROWS * DIM],
	    zwant[ROWS * DIM];
	struct lp_err err = {};
	struct rig on, off;
	struct lp_cuda_counters c, before;

	CHECK_MSG(rig_init(&on, true, &err) == 0, "graphs on: %s", err.msg);
	CHECK_MSG(rig_init(&off, false, &err) == 0, "graphs off: %s", err.msg);
	for (size_t i = 0; i < sizeof(steps) / sizeof(steps[0]); i++) {
		int n = steps[i].n, p_on, p_off;

		if (steps[i].refill) {
			CHECK_OK(rig_fill(&on, steps[i].refill, &err), &err);
			CHECK_OK(rig_fill(&off, steps[i].refill, &err), &err);
		}
		before = counters(on.be);
		p_on = rig_step(&on, n, steps[i].decode, steps[i].lora, (unsigned)i + 1,
		                steps[i].twist, got, zgot);
		p_off = rig_step(&off, n, steps[i].decode, steps[i].lora, (unsigned)i + 1,
		                 steps[i].twist == TWIST_BAD_CAPTURE ? TWIST_NONE : steps[i].twist,
		                 want, zwant);
		CHECK_OK(lp_backend_status(on.be, &err), &err);
		CHECK_OK(lp_backend_status(off.be, &err), &err);
		CHECK_EQ_INT(p_on, p_off);
		CHECK_MSG(!memcmp(got, want, (size_t)n * M * sizeof(float)),
		          "step %zu (%d tokens): graphs on and off differ", i, n);
		CHECK_MSG(!steps[i].lora || !memcmp(zgot, zwant, (size_t)n * DIM * sizeof(float)),
		          "step %zu (%d tokens): the LoRA outputs with graphs on and off differ", i,
		          n);
		c = counters(on.be);
		CHECK_MSG(
		    (int)c.captures == steps[i].captures &&
		        (int)c.graph_launches == steps[i].launches &&
		        (int)c.mismatches == steps[i].mismatches &&
		        (int)c.capture_failures == steps[i].failures,
		    "step %zu: captures %d, graph launches %d, mismatches %d, capture failures %d "
		    "(%s)",
		    i, (int)c.captures, (int)c.graph_launches, (int)c.mismatches,
		    (int)c.capture_failures, c.capture_error);
		if (c.graph_launches > before.graph_launches) {
			/* a replayed step enqueues no kernel of its own */
			CHECK_EQ_INT(c.launches, before.launches);
			CHECK(c.graph_kernels >= before.graph_kernels + 4);
		}
		if (i == 0)
			memcpy(first, got, (size_t)n * M * sizeof(float));
		if (i == 1) /* the replay read the step's new ids */
			CHECK(memcmp(first, got, (size_t)n * M * sizeof(float)));
		if (i == 13)
			CHECK_MSG(strstr(c.capture_error, "cudaStreamBeginCapture"), "why: '%s'",
			          c.capture_error);
	}
	c = counters(on.be);
	CHECK_EQ_INT(c.graphs, 3);
	{
		/* info's counters: a replay counts the kernels of its graph */
		struct lp_backend_info info;

		on.be->ops->info(on.be->ctx, &info);
		CHECK_EQ_INT(info.graph_replays, c.graph_launches);
		CHECK_EQ_INT(info.launches, c.launches + c.graph_kernels);
		CHECK_EQ_INT(info.upload_bytes, c.upload_bytes);
		off.be->ops->info(off.be->ctx, &info);
		CHECK_EQ_INT(info.launches, counters(off.be).launches);
		CHECK(info.launches > 0 && info.graph_replays == 0);
	}
	CHECK(counters(off.be).captures == 0 && counters(off.be).graph_launches == 0);
	rig_release(&on);
	rig_release(&off);
}

/* A decode step with one call of every op (the shapes of a small layer,
 * then the logits and the sample) is captured and replayed: no op may be
 * uncapturable, and each replay gives what eager steps give. */
struct full {
	struct rig r;
	struct lp_buffer meta_b, q_b, k_b, v_b, att_b, kc_b, vc_b, cs_b, lg_b, out_b;
	struct lp_tensor q, k, v, att, kc, vc, cs, lg;
	char *host; /* pinned: the step's metadata */
};

enum {
	F_BLOCKS = 16, /* cache blocks of 16 positions */
	F_MAXB = 8,    /* block-table columns */
	F_KV = 32,     /* n_kv_heads * head_dim */
	F_POS = 64,    /* cos/sin table rows */
	F_LP = 4,      /* max_logprobs */
};

/* Offsets in the metadata buffer (bytes). */
#define M_IDS    0
#define M_SLOT   (M_IDS + ROWS * 4)
#define M_SEQ    (M_SLOT + ROWS * 4)
#define M_POS    (M_SEQ + ROWS * 4)
#define M_KVSLOT (M_POS + ROWS * 4)
#define M_TABLES (M_KVSLOT + ROWS * 4)
#define M_ROWS   (M_TABLES + 16 * F_MAXB * 4)
#define M_BYTES  (M_ROWS + ROWS * (int)sizeof(struct lp_sample_row))
/* Offsets in the output buffer (bytes). */
#define O_TOK   0
#define O_LP    (O_TOK + ROWS * 4)
#define O_TOPID (O_LP + ROWS * 4)
#define O_TOPLP (O_TOPID + ROWS * F_LP * 4)
#define O_BYTES (O_TOPLP + ROWS * F_LP * 4)

static int full_init(struct full *f, bool graphs, struct lp_err *err)
{
	static float cs[F_POS * 16];
	int rc;

	memset(f, 0, sizeof(*f));
	if ((rc = rig_init(&f->r, graphs, err)))
		return rc;
	for (int p = 0; p < F_POS; p++)
		for (int i = 0; i < 8; i++) {
			float a = (float)p * powf(10000.0f, -(float)i / 8.0f);
			cs[p * 16 + i] = cosf(a);
			cs[p * 16 + 8 + i] = sinf(a);
		}
	struct lp_backend *be = f->r.be;
	if ((rc = lp_backend_alloc(be, M_BYTES, &f->meta_b, err)) ||
	    (rc = lp_backend_alloc(be, ROWS * DIM * 4, &f->q_b, err)) ||
	    (rc = lp_backend_alloc(be, ROWS * F_KV * 4, &f->k_b, err)) ||
	    (rc = lp_backend_alloc(be, ROWS * F_KV * 4, &f->v_b, err)) ||
	    (rc = lp_backend_alloc(be, ROWS * DIM * 4, &f->att_b, err)) ||
	    (rc = lp_backend_alloc(be, F_BLOCKS * 16 * F_KV * 2, &f->kc_b, err)) ||
	    (rc = lp_backend_alloc(be, F_BLOCKS * 16 * F_KV * 2, &f->vc_b, err)) ||
	    (rc = lp_backend_import(be, cs, sizeof(cs), &f->cs_b, err)) ||
	    (rc = lp_backend_alloc(be, ROWS * VOCAB * 4, &f->lg_b, err)) ||
	    (rc = lp_backend_alloc(be, O_BYTES, &f->out_b, err)) ||
	    (rc = be->ops->host_alloc(be->ctx, M_BYTES, (void **)&f->host, err)))
		return rc;
	f->q = {f->q_b.data, LP_DTYPE_F32, ROWS, DIM};
	f->k = {f->k_b.data, LP_DTYPE_F32, ROWS, F_KV};
	f->v = {f->v_b.data, LP_DTYPE_F32, ROWS, F_KV};
	f->att = {f->att_b.data, LP_DTYPE_F32, ROWS, DIM};
	f->kc = {f->kc_b.data, LP_DTYPE_F16, F_BLOCKS * 16, F_KV};
	f->vc = {f->vc_b.data, LP_DTYPE_F16, F_BLOCKS * 16, F_KV};
	f->cs = {f->cs_b.data, LP_DTYPE_F32, F_POS, 16};
	f->lg = {f->lg_b.data, LP_DTYPE_F32, ROWS, VOCAB};
	return 0;
}

static void full_release(struct full *f)
{
	struct lp_backend *be = f->r.be;

	if (!be)
		return;
	be->ops->host_free(be->ctx, f->host);
	lp_backend_free(be, &f->meta_b);
	lp_backend_free(be, &f->q_b);
	lp_backend_free(be, &f->k_b);
	lp_backend_free(be, &f->v_b);
	lp_backend_free(be, &f->att_b);
	lp_backend_free(be, &f->kc_b);
	lp_backend_free(be, &f->vc_b);
	lp_backend_free(be, &f->cs_b);
	lp_backend_free(be, &f->lg_b);
	lp_backend_free(be, &f->out_b);
	rig_release(&f->r);
}

/* Step k: n sequences decode one token each at position 5 + 7k + s; out
 * gets the sampled outputs, then att [n, DIM] and z [n, DIM]. */
static void full_step(struct full *f, int n, int k, char *out)
{
	struct lp_backend *be = f->r.be;
	const struct lp_backend_ops *o = be->ops;
	char *meta = (char *)f->meta_b.data, *res = (char *)f->out_b.data;
	struct lp_step_shape shape = {n, n, n, true, true};
	int32_t *ids = (int32_t *)(f->host + M_IDS), *slot = (int32_t *)(f->host + M_SLOT);
	int32_t *seq = (int32_t *)(f->host + M_SEQ), *pos = (int32_t *)(f->host + M_POS);
	int32_t *kvs = (int32_t *)(f->host + M_KVSLOT), *bt = (int32_t *)(f->host + M_TABLES);
	struct lp_sample_row *rows = (struct lp_sample_row *)(f->host + M_ROWS);
	struct lp_tensor x, q, kk, vv, att, z, tmp, lg, wk, wv;
	struct lp_attention_args aa;
	struct lp_lora_args la;
	struct lp_sample_args sa;
	int p;

	memset(f->host, 0, M_BYTES);
	for (int s = 0; s < 16; s++)
		for (int b = 0; b < F_MAXB; b++)
			bt[s * F_MAXB + b] = b < 2 ? s * 2 + b : 0;
	for (int i = 0; i < ROWS; i++) {
		bool real = i < n;
		int ps = 5 + 7 * k + i;

		ids[i] = real ? (int32_t)((k * 13 + i * 5) % VOCAB) : 0;
		slot[i] = real && i % 2 == 0 ? 0 : -1;
		seq[i] = real ? i : -1;
		pos[i] = real ? ps : 0;
		kvs[i] = real ? bt[i * F_MAXB + ps / 16] * 16 + ps % 16 : -1;
		rows[i].temperature = i % 2 ? 0.8f : 0.0f;
		rows[i].top_p = 0.9f;
		rows[i].min_p = 0.0f;
		rows[i].top_k = i % 3 ? 0 : 5;
		rows[i].u = 0.137f + 0.1f * (float)((k + i) % 7);
		rows[i].n_logprobs = 2;
	}
	/* as the engine does: the metadata of the padded rows goes up between
	 * begin_step and the first op */
	p = o->begin_step(be->ctx, &shape);
	lp_backend_upload(be, f->meta_b.data, f->host, M_BYTES);
	x = lp_tensor_rows(&f->r.x, 0, p);
	q = lp_tensor_rows(&f->q, 0, p);
	kk = lp_tensor_rows(&f->k, 0, p);
	vv = lp_tensor_rows(&f->v, 0, p);
	att = lp_tensor_rows(&f->att, 0, p);
	z = lp_tensor_rows(&f->r.z, 0, p);
	tmp = lp_tensor_rows(&f->r.tmp, 0, p);
	lg = lp_tensor_rows(&f->lg, 0, p);
	wk = lp_tensor_rows(&f->r.w, 0, F_KV);
	wv = lp_tensor_rows(&f->r.w, F_KV / 2, F_KV);

	o->get_rows(be->ctx, &x, &f->r.table, (const int32_t *)(meta + M_IDS), p);
	o->rmsnorm(be->ctx, &x, &x, &f->r.nw, 1e-5f);
	o->matmul(be->ctx, &q, &x, &f->r.wo, false);
	o->matmul(be->ctx, &kk, &x, &wk, false);
	o->matmul(be->ctx, &vv, &x, &wv, false);
	o->add_bias(be->ctx, &q, &f->r.nw);
	o->rope(be->ctx, &q, 4, 16, (const int32_t *)(meta + M_POS), &f->cs);
	o->rope(be->ctx, &kk, 2, 16, (const int32_t *)(meta + M_POS), &f->cs);
	o->kv_store(be->ctx, &f->kc, &f->vc, &kk, &vv, (const int32_t *)(meta + M_KVSLOT));
	memset(&aa, 0, sizeof(aa));
	aa.n_tokens = p;
	aa.n_heads = 4;
	aa.n_kv_heads = 2;
	aa.head_dim = 16;
	aa.block_size = 16;
	aa.max_blocks_per_seq = F_MAXB;
	aa.max_context = F_MAXB * 16;
	aa.scale = 0.25f;
	aa.q = &q;
	aa.k_cache = &f->kc;
	aa.v_cache = &f->vc;
	aa.tok_seq = (const int32_t *)(meta + M_SEQ);
	aa.tok_pos = (const int32_t *)(meta + M_POS);
	aa.block_tables = (const int32_t *)(meta + M_TABLES);
	aa.out = &att;
	o->attention(be->ctx, &aa);
	o->add(be->ctx, &att, &q);
	o->silu_mul(be->ctx, &att, &att, &q);
	o->matmul(be->ctx, &z, &att, &f->r.wo, false);
	memset(&la, 0, sizeof(la));
	la.layer = 0;
	la.group = LP_LORA_GROUP_O;
	la.x = &att;
	la.out[0] = &z;
	la.tmp = &tmp;
	la.tok_slot = (const int32_t *)(meta + M_SLOT);
	la.decode = true;
	la.n_segs = n; /* varies with the batch: decode ignores it */
	o->lora(be->ctx, &la);
	o->matmul(be->ctx, &lg, &z, &f->r.table, false);
	memset(&sa, 0, sizeof(sa));
	sa.logits = &lg;
	sa.rows = (const struct lp_sample_row *)(meta + M_ROWS);
	sa.n = p;
	sa.max_logprobs = F_LP;
	sa.tokens = (int32_t *)(res + O_TOK);
	sa.logprob = (float *)(res + O_LP);
	sa.top_ids = (int32_t *)(res + O_TOPID);
	sa.top_logprobs = (float *)(res + O_TOPLP);
	o->sample(be->ctx, &sa);
	o->end_step(be->ctx);
	lp_backend_download(be, out, res, O_BYTES);
	lp_backend_download(be, out + O_BYTES, f->att_b.data, (size_t)n * DIM * 4);
	lp_backend_download(be, out + O_BYTES + n * DIM * 4, f->r.z_b.data, (size_t)n * DIM * 4);
}

static void test_every_op_is_captured_and_replayed(void)
{
	static char got[O_BYTES + 2 * ROWS * DIM * 4], want[sizeof(got)];
	struct lp_err err = {};
	struct full on, off;
	struct lp_cuda_counters c;
	const int ns[] = {3, 4, 3, 2, 2};

	CHECK_MSG(full_init(&on, true, &err) == 0, "graphs on: %s", err.msg);
	CHECK_MSG(full_init(&off, false, &err) == 0, "graphs off: %s", err.msg);
	for (int k = 0; k < 5; k++) {
		memset(got, 0, sizeof(got));
		memset(want, 0, sizeof(want));
		full_step(&on, ns[k], k, got);
		full_step(&off, ns[k], k, want);
		CHECK_OK(lp_backend_status(on.r.be, &err), &err);
		CHECK_OK(lp_backend_status(off.r.be, &err), &err);
		c = counters(on.r.be);
		CHECK_MSG(c.capture_failures == 0 && c.mismatches == 0, "step %d: %s", k,
		          c.capture_error);
		CHECK_MSG(!memcmp(got, want, sizeof(got)), "step %d: graphs on and off differ", k);
	}
	c = counters(on.r.be);
	CHECK_EQ_INT(c.captures, 2);       /* buckets 4 and 2 */
	CHECK_EQ_INT(c.graph_launches, 3); /* steps 1, 2 and 4 */
	full_release(&on);
	full_release(&off);
}

int main(void)
{
	TEST_MAIN_BEGIN("test-backend-cuda");
	RUN(test_open_and_info);
	RUN(test_open_without_a_device);
	RUN(test_reserve);
	RUN(test_buffers_and_transfers);
	RUN(test_import_weight);
	RUN(test_get_rows_matches_cpu);
	RUN(test_sticky_status);
	RUN(test_bucket_padding);
	RUN(test_graphs_replay_what_eager_steps_compute);
	RUN(test_every_op_is_captured_and_replayed);
	TEST_MAIN_END();
}
