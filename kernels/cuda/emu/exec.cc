/* The emulation's executor: every GPU thread of a block is a fiber on the
 * OS thread that launched the grid; a fiber runs until its thread waits at
 * a barrier or in a warp collective, or ends, and the waits are resolved by
 * counting arrivals. Blocks run one after another.
 *
 * Fibers switch with a few instructions of assembly (callee-saved
 * registers, the stack pointer, MXCSR and the x87 control word), not with
 * ucontext, whose switch makes a sigprocmask system call. A fiber whose
 * thread ends picks the block's next unstarted thread on the same stack, so
 * a kernel without barriers runs its threads back to back with no switch
 * at all, and a block needs only as many stacks as it has threads waiting
 * at once. Stacks are mmap'd with a guard page below and kept per OS
 * thread across launches.
 *
 * Sanitizers: AddressSanitizer is told of every switch (it would otherwise
 * take a fiber's stack for an overflow of the thread's). ThreadSanitizer is
 * not: its fiber contexts cost microseconds per switch with a thousand
 * fibers, and all fibers share one OS thread, which is what it sees; races
 * between GPU threads are therefore not reported, and stacks in its
 * reports from inside kernels may be garbled. */
#include "kernels/cuda/emu/internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <vector>

#ifdef LP_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

/* void lp_emu_ctx_switch(void **save_sp, void *load_sp): saves the callee-
 * saved state on the current stack, stores the stack pointer in *save_sp,
 * and resumes the context whose stack pointer is load_sp (a context saved
 * by this function, or a new one laid out by fiber_init). */
extern "C" void lp_emu_ctx_switch(void **save_sp, void *load_sp);
__asm__(".pushsection .text\n"
        ".globl lp_emu_ctx_switch\n"
        ".type lp_emu_ctx_switch, @function\n"
        ".p2align 4\n"
        "lp_emu_ctx_switch:\n"
        "\tpushq %rbp\n"
        "\tpushq %rbx\n"
        "\tpushq %r12\n"
        "\tpushq %r13\n"
        "\tpushq %r14\n"
        "\tpushq %r15\n"
        "\tsubq $8, %rsp\n"
        "\tstmxcsr (%rsp)\n"
        "\tfnstcw 4(%rsp)\n"
        "\tmovq %rsp, (%rdi)\n"
        "\tmovl (%rsp), %ecx\n"
        "\tmovzwl 4(%rsp), %edx\n"
        "\tmovq %rsi, %rsp\n"
        /* the loads are slow and the words rarely differ */
        "\tcmpl (%rsp), %ecx\n"
        "\tje 1f\n"
        "\tldmxcsr (%rsp)\n"
        "1:\n"
        "\tcmpw 4(%rsp), %dx\n"
        "\tje 2f\n"
        "\tfldcw 4(%rsp)\n"
        "2:\n"
        "\taddq $8, %rsp\n"
        "\tpopq %r15\n"
        "\tpopq %r14\n"
        "\tpopq %r13\n"
        "\tpopq %r12\n"
        "\tpopq %rbx\n"
        "\tpopq %rbp\n"
        "\tret\n"
        ".size lp_emu_ctx_switch, .-lp_emu_ctx_switch\n"
        ".popsection\n");

__thread const uint3 *lp_emu_thread_idx;
__thread uint3 lp_emu_block_idx;
__thread uint3 lp_emu_block_dim;
__thread uint3 lp_emu_grid_dim;

namespace
{

enum thread_state : uint8_t {
	TS_NEW,
	TS_READY,
	TS_RUNNING,
	TS_BAR,    /* at __syncthreads* */
	TS_WARP,   /* in a warp collective */
	TS_ACTIVE, /* in __activemask, until nothing else can run */
	TS_DONE
};

struct fiber {
	void *sp;         /* saved stack pointer while not running */
	char *stack;      /* lowest usable byte (the guard page is below) */
	size_t size;      /* usable bytes */
	size_t color;     /* bytes left unused at the top (see fiber_new) */
	fiber *next;      /* free list */
	bool idle;        /* in the free list: no GPU thread on it */
	void *fake_stack; /* AddressSanitizer's, saved across a switch */
};

struct gpu_thread {
	uint3 idx;
	int lin;
	uint8_t state;
	uint8_t wop; /* enum lp_emu_warp_op while in TS_WARP */
	fiber *fib;  /* the fiber it runs on, once started */
	unsigned wmask;
	int wparam, wwidth;
	uint64_t wval, wres;
};

/* A warp collective being waited in: the lanes of `mask` meet in `op`. */
struct warp_wait {
	unsigned mask, arrived;
	uint8_t op;
};

struct warp_state {
	unsigned lanes; /* that exist (fewer in a partial last warp) */
	unsigned exited;
	unsigned waiting; /* lanes in some collective */
	int n_open;
	warp_wait open[32];
};

struct exec {
	fiber main;  /* the OS thread's own stack */
	fiber *cur;  /* running */
	fiber *from; /* the one that switched to cur */
	fiber *free_list;
	std::vector<fiber *> all;
	size_t stack_size;
	uint64_t csr;            /* MXCSR | x87 control word << 32 for new fibers */
	const void *main_bottom; /* AddressSanitizer: the OS thread's stack */
	size_t main_size;

	/* the launch */
	lp_emu_kernel *k;
	uint3 grid, block;
	uint64_t nblocks, next_block;
	size_t smem;
	unsigned char *dyn; /* LP_EMU_SMEM_OPTIN bytes */
	int n;
	gpu_thread th[1024];
	warp_state warps[32];

	/* the running block */
	gpu_thread *running;
	int next_new, done, first_done;
	int bar_arrived, bar_acc, bar_result;
	int in_activemask;
	enum lp_emu_bar_op bar_op;
	int queue[1024];
	int qhead, qcount;

	bool failed;
	char msg[512];
	uint64_t switches, blocks_run;
};

__thread exec *X;

/* Frees a thread's stacks when it ends. */
struct exec_owner {
	~exec_owner()
	{
		if (!X)
			return;
		for (fiber *f : X->all) {
			munmap(f->stack - getpagesize(), f->size + getpagesize());
			delete f;
		}
		free(X->dyn);
		delete X;
		X = NULL;
	}
};
thread_local exec_owner owner;

const char *warp_op_name(int op)
{
	static const char *const names[LP_EMU_WARP_OP_COUNT] = {
	    "__syncwarp",        "__shfl_sync",       "__shfl_up_sync",    "__shfl_down_sync",
	    "__shfl_xor_sync",   "__ballot_sync",     "__any_sync",        "__all_sync",
	    "__reduce_add_sync", "__reduce_min_sync", "__reduce_max_sync", "__reduce_min_sync",
	    "__reduce_max_sync", "__reduce_and_sync", "__reduce_or_sync",  "__reduce_xor_sync",
	    "__match_any_sync",  "__match_all_sync"};
	return op >= 0 && op < LP_EMU_WARP_OP_COUNT ? names[op] : "?";
}

const char *bar_op_name(enum lp_emu_bar_op op)
{
	switch (op) {
	case LP_EMU_BAR_SYNC:
		return "__syncthreads";
	case LP_EMU_BAR_COUNT:
		return "__syncthreads_count";
	case LP_EMU_BAR_AND:
		return "__syncthreads_and";
	case LP_EMU_BAR_OR:
		return "__syncthreads_or";
	}
	return "?";
}

void fiber_entry();

void fiber_init(exec *x, fiber *f)
{
#ifdef LP_EMU_ASAN
	/* an abandoned fiber's frames left their redzones poisoned */
	ASAN_UNPOISON_MEMORY_REGION(f->stack, f->size);
#endif
	uint64_t *sp = (uint64_t *)(((uintptr_t)f->stack + f->size - f->color) & ~(uintptr_t)15);

	/* what lp_emu_ctx_switch pops, in reverse: its `ret` enters
	 * fiber_entry with the stack aligned as after a call */
	*--sp = 0;                     /* fiber_entry's return address: none */
	*--sp = (uint64_t)fiber_entry; /* ret */
	for (int i = 0; i < 6; i++)
		*--sp = 0; /* rbp rbx r12 r13 r14 r15 */
	*--sp = x->csr;
	f->sp = sp;
	f->fake_stack = NULL;
}

fiber *fiber_new(exec *x)
{
	size_t page = (size_t)getpagesize();
	char *p = (char *)mmap(NULL, x->stack_size + page, PROT_READ | PROT_WRITE,
	                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
	if (p == MAP_FAILED)
		return NULL;
	if (mprotect(p, page, PROT_NONE) != 0) {
		munmap(p, x->stack_size + page);
		return NULL;
	}
	fiber *f = new fiber();
	f->stack = p + page;
	f->size = x->stack_size;
	/* every stack top would otherwise share one page offset, so the
	 * registers saved by a thousand fibers would fight over one L1 set */
	f->color = (x->all.size() % 64) * 64;
	fiber_init(x, f);
	x->all.push_back(f);
	return f;
}

exec *exec_get()
{
	if (X)
		return X;
	exec *x = new exec();
	const char *kb = getenv("LP_EMU_STACK_KB");
	long v = kb ? strtol(kb, NULL, 10) : 0;
	x->stack_size = (size_t)(v >= 64 ? v : 256) << 10;
	unsigned short cw;
	__asm__ __volatile__("fnstcw %0" : "=m"(cw));
	x->csr = (uint64_t)__builtin_ia32_stmxcsr() | ((uint64_t)cw << 32);
	if (posix_memalign((void **)&x->dyn, 128, LP_EMU_SMEM_OPTIN) != 0) {
		delete x;
		return NULL;
	}
	(void)&owner; /* instantiate the thread's destructor */
	X = x;
	return x;
}

inline void after_switch(exec *x)
{
#ifdef LP_EMU_ASAN
	const void *bottom;
	size_t size;
	__sanitizer_finish_switch_fiber(x->cur->fake_stack, &bottom, &size);
	if (x->from == &x->main) {
		x->main_bottom = bottom;
		x->main_size = size;
	}
#else
	(void)x;
#endif
}

/* Switches from the running fiber to `to`; returns when someone switches
 * back (never, when dying). */
inline void switch_to(exec *x, fiber *to, bool dying)
{
	fiber *from = x->cur;
	x->from = from;
	x->cur = to;
	x->switches++;
#ifdef LP_EMU_ASAN
	if (to == &x->main)
		__sanitizer_start_switch_fiber(dying ? NULL : &from->fake_stack, x->main_bottom,
		                               x->main_size);
	else
		__sanitizer_start_switch_fiber(dying ? NULL : &from->fake_stack, to->stack,
		                               to->size);
#else
	(void)dying;
#endif
	lp_emu_ctx_switch(&from->sp, to->sp);
	after_switch(x);
}

void describe_thread(const gpu_thread *t, char *buf, size_t size)
{
	snprintf(buf, size, "thread (%u,%u,%u)", t->idx.x, t->idx.y, t->idx.z);
}

/* Ends the launch: back to the OS thread's stack, never returns. */
[[noreturn]] __attribute__((format(printf, 2, 3))) void fail(exec *x, const char *fmt, ...)
{
	va_list ap;
	int len = snprintf(x->msg, sizeof(x->msg), "block (%u,%u,%u): ", lp_emu_block_idx.x,
	                   lp_emu_block_idx.y, lp_emu_block_idx.z);
	va_start(ap, fmt);
	vsnprintf(x->msg + len, sizeof(x->msg) - (size_t)len, fmt, ap);
	va_end(ap);
	x->failed = true;
	switch_to(x, &x->main, true);
	abort(); /* unreachable: a failed fiber is reset, never resumed */
}

fiber *get_fiber(exec *x)
{
	fiber *f = x->free_list;
	if (f) {
		x->free_list = f->next;
	} else {
		f = fiber_new(x);
		if (!f)
			fail(x, "cannot map a %zu KiB fiber stack", x->stack_size >> 10);
	}
	f->idle = false;
	return f;
}

void put_fiber(exec *x, fiber *f)
{
	f->idle = true;
	f->next = x->free_list;
	x->free_list = f;
}

[[noreturn]] void fail_deadlock(exec *x)
{
	int bar = 0, warp = 0;
	const gpu_thread *w = NULL;
	char who[160] = "";

	for (int i = 0; i < x->n; i++) {
		const gpu_thread *t = &x->th[i];
		if (t->state == TS_BAR)
			bar++;
		else if (t->state == TS_WARP && warp++ == 0)
			w = t;
	}
	if (w) {
		const warp_state *ws = &x->warps[w->lin >> 5];
		unsigned missing = 0;
		for (int i = 0; i < ws->n_open; i++)
			if (ws->open[i].arrived & (1u << (w->lin & 31)))
				missing = ws->open[i].mask & ~ws->open[i].arrived;
		snprintf(who, sizeof(who),
		         " (first: thread (%u,%u,%u) in %s with mask 0x%08x, lanes 0x%08x not "
		         "there)",
		         w->idx.x, w->idx.y, w->idx.z, warp_op_name(w->wop), w->wmask, missing);
	}
	fail(x,
	     "deadlock: %d threads wait at %s, %d in warp collectives%s, %d exited (a barrier "
	     "or collective that not every thread it names reaches, or lanes that disagree on "
	     "the mask or the collective)",
	     bar, bar_op_name(x->bar_op), warp, who, x->done);
}

void enqueue(exec *x, gpu_thread *t)
{
	t->state = TS_READY;
	x->queue[(x->qhead + x->qcount++) % 1024] = t->lin;
}

/* The next ready thread's fiber. When none is ready, every thread of the
 * block waits or has ended: the lanes in __activemask learn which lanes of
 * their warp are there with them (those that reached it while the others
 * waited elsewhere or ended, as a converged warp would), and go on; without
 * such lanes the block is deadlocked. */
fiber *next_ready(exec *x)
{
	if (!x->qcount) {
		if (!x->in_activemask)
			fail_deadlock(x);
		unsigned here[32] = {0};
		for (int i = 0; i < x->n; i++)
			if (x->th[i].state == TS_ACTIVE)
				here[i >> 5] |= 1u << (i & 31);
		for (int i = 0; i < x->n; i++)
			if (x->th[i].state == TS_ACTIVE) {
				x->th[i].wres = here[i >> 5];
				enqueue(x, &x->th[i]);
			}
		x->in_activemask = 0;
	}
	int lin = x->queue[x->qhead];
	x->qhead = (x->qhead + 1) % 1024;
	x->qcount--;
	return x->th[lin].fib;
}

/* The running thread t waits (its state says for what): runs another. */
void wait_here(exec *x, gpu_thread *t)
{
	fiber *to;
	if (x->next_new < x->n)
		to = get_fiber(x); /* it starts the next thread of the block */
	else
		to = next_ready(x);
	if (to != x->cur) /* t itself may be the one ready (__activemask) */
		switch_to(x, to, false);
	/* woken: the waker made t ready */
	t->state = TS_RUNNING;
	x->running = t;
	lp_emu_thread_idx = &t->idx;
}

void start_block(exec *x, uint64_t b)
{
	lp_emu_block_idx.x = (unsigned)(b % x->grid.x);
	lp_emu_block_idx.y = (unsigned)(b / x->grid.x % x->grid.y);
	lp_emu_block_idx.z = (unsigned)(b / x->grid.x / x->grid.y);
	x->next_new = 0;
	x->done = 0;
	x->first_done = -1;
	x->bar_arrived = 0;
	x->in_activemask = 0;
	x->qhead = x->qcount = 0;
	for (int w = 0; w < (x->n + 31) / 32; w++)
		x->warps[w].exited = x->warps[w].waiting = 0, x->warps[w].n_open = 0;
	for (int i = 0; i < x->n; i++)
		x->th[i].state = TS_NEW;
	if (x->smem)
		memset(x->dyn, 0xff, x->smem);
}

void thread_exit(exec *x, gpu_thread *t)
{
	int w = t->lin >> 5;
	unsigned bit = 1u << (t->lin & 31);
	char who[64];

	t->state = TS_DONE;
	if (x->done++ == 0)
		x->first_done = t->lin;
	warp_state *ws = &x->warps[w];
	ws->exited |= bit;
	if (x->bar_arrived) {
		describe_thread(t, who, sizeof(who));
		fail(x, "%s exited while %d threads wait at %s", who, x->bar_arrived,
		     bar_op_name(x->bar_op));
	}
	for (int i = 0; i < ws->n_open; i++) {
		const warp_wait *ww = &ws->open[i];
		if (ww->mask & bit) {
			describe_thread(t, who, sizeof(who));
			fail(x,
			     "%s (lane %d of warp %d) exited while lane %d waits for it in %s "
			     "(mask 0x%08x)",
			     who, t->lin & 31, w, __builtin_ctz(ww->arrived), warp_op_name(ww->op),
			     ww->mask);
		}
	}
}

[[noreturn]] void fiber_loop(exec *x)
{
	fiber *self = x->cur;
	for (;;) {
		if (x->next_new < x->n) {
			gpu_thread *t = &x->th[x->next_new++];
			t->state = TS_RUNNING;
			t->fib = self;
			x->running = t;
			lp_emu_thread_idx = &t->idx;
			x->k->run();
			thread_exit(x, t);
			if (x->done < x->n)
				continue;
			x->blocks_run++;
			if (++x->next_block < x->nblocks) {
				start_block(x, x->next_block);
				continue;
			}
			/* the grid is done; a later launch resumes this fiber here */
			put_fiber(x, self);
			switch_to(x, &x->main, false);
			continue;
		}
		/* no thread left to start: the others wait, some may be ready */
		put_fiber(x, self);
		switch_to(x, next_ready(x), false);
	}
}

void fiber_entry()
{
	exec *x = X;
	after_switch(x);
	fiber_loop(x);
}

exec *in_kernel(const char *what)
{
	exec *x = X;
	if (!x || !x->k || x->cur == &x->main) {
		fprintf(stderr, "lp-emu: %s called outside a kernel\n", what);
		abort();
	}
	return x;
}

unsigned lane_bits(int lanes)
{
	return lanes >= 32 ? 0xffffffffu : (1u << lanes) - 1;
}

/* The lanes of `mask` of warp w all wait in the collective `me` is in:
 * every lane's result. */
void warp_complete(exec *x, int w, unsigned mask, gpu_thread *me)
{
	gpu_thread *lanes = &x->th[w * 32];
	int op = me->wop;

	uint64_t all = 0;
	switch (op) {
	case LP_EMU_WARP_SHFL_IDX:
	case LP_EMU_WARP_SHFL_UP:
	case LP_EMU_WARP_SHFL_DOWN:
	case LP_EMU_WARP_SHFL_XOR:
		/* PTX's shfl.sync: the clamp and segment mask CUDA derives from
		 * width, the source lane from the low five bits of b */
		for (unsigned m = mask; m; m &= m - 1) {
			gpu_thread *o = &lanes[__builtin_ctz(m)];
			int lane = o->lin & 31, b = o->wparam & 31;
			int seg = (32 - o->wwidth) & 31;
			int clamp = op == LP_EMU_WARP_SHFL_UP ? 0 : 31;
			int max_lane = (lane & seg) | (clamp & ~seg);
			int min_lane = lane & seg;
			int j;
			bool ok;
			switch (op) {
			case LP_EMU_WARP_SHFL_UP:
				j = lane - b;
				ok = j >= max_lane;
				break;
			case LP_EMU_WARP_SHFL_DOWN:
				j = lane + b;
				ok = j <= max_lane;
				break;
			case LP_EMU_WARP_SHFL_XOR:
				j = lane ^ b;
				ok = j <= max_lane;
				break;
			default:
				j = min_lane | (b & ~seg);
				ok = j <= max_lane;
				break;
			}
			if (!ok)
				j = lane;
			o->wres = (mask >> j) & 1 ? lanes[j].wval : ~(uint64_t)0;
		}
		break;
	case LP_EMU_WARP_BALLOT:
	case LP_EMU_WARP_ANY:
	case LP_EMU_WARP_ALL:
		for (unsigned m = mask; m; m &= m - 1)
			if (lanes[__builtin_ctz(m)].wval)
				all |= 1u << __builtin_ctz(m);
		if (op == LP_EMU_WARP_ANY)
			all = all != 0;
		else if (op == LP_EMU_WARP_ALL)
			all = all == mask;
		break;
	case LP_EMU_WARP_REDUCE_ADD:
	case LP_EMU_WARP_REDUCE_MIN_U:
	case LP_EMU_WARP_REDUCE_MAX_U:
	case LP_EMU_WARP_REDUCE_MIN_S:
	case LP_EMU_WARP_REDUCE_MAX_S:
	case LP_EMU_WARP_REDUCE_AND:
	case LP_EMU_WARP_REDUCE_OR:
	case LP_EMU_WARP_REDUCE_XOR: {
		uint32_t r = (uint32_t)lanes[__builtin_ctz(mask)].wval;
		for (unsigned m = mask & (mask - 1); m; m &= m - 1) {
			uint32_t v = (uint32_t)lanes[__builtin_ctz(m)].wval;
			switch (op) {
			case LP_EMU_WARP_REDUCE_ADD:
				r += v;
				break;
			case LP_EMU_WARP_REDUCE_MIN_U:
				r = v < r ? v : r;
				break;
			case LP_EMU_WARP_REDUCE_MAX_U:
				r = v > r ? v : r;
				break;
			case LP_EMU_WARP_REDUCE_MIN_S:
				r = (int32_t)v < (int32_t)r ? v : r;
				break;
			case LP_EMU_WARP_REDUCE_MAX_S:
				r = (int32_t)v > (int32_t)r ? v : r;
				break;
			case LP_EMU_WARP_REDUCE_AND:
				r &= v;
				break;
			case LP_EMU_WARP_REDUCE_OR:
				r |= v;
				break;
			default:
				r ^= v;
				break;
			}
		}
		all = r;
		break;
	}
	case LP_EMU_WARP_MATCH_ANY:
		for (unsigned m = mask; m; m &= m - 1) {
			gpu_thread *o = &lanes[__builtin_ctz(m)];
			unsigned same = 0;
			for (unsigned q = mask; q; q &= q - 1)
				if (lanes[__builtin_ctz(q)].wval == o->wval)
					same |= 1u << __builtin_ctz(q);
			o->wres = same;
		}
		break;
	case LP_EMU_WARP_MATCH_ALL: {
		all = mask;
		for (unsigned m = mask; m; m &= m - 1)
			if (lanes[__builtin_ctz(m)].wval != me->wval)
				all = 0;
		break;
	}
	default:
		break;
	}
	if (op != LP_EMU_WARP_MATCH_ANY && (op < LP_EMU_WARP_SHFL_IDX || op > LP_EMU_WARP_SHFL_XOR))
		for (unsigned m = mask; m; m &= m - 1)
			lanes[__builtin_ctz(m)].wres = all;

	x->warps[w].waiting &= ~mask;
	for (unsigned m = mask; m; m &= m - 1) {
		gpu_thread *o = &lanes[__builtin_ctz(m)];
		if (o != me)
			enqueue(x, o);
	}
}

} // namespace

int lp_emu_barrier(enum lp_emu_bar_op op, int pred)
{
	exec *x = in_kernel(bar_op_name(op));
	gpu_thread *t = x->running;
	char who[64];

	if (x->done) {
		describe_thread(t, who, sizeof(who));
		fail(x, "%s reached %s after thread (%u,%u,%u) of its block exited", who,
		     bar_op_name(op), x->th[x->first_done].idx.x, x->th[x->first_done].idx.y,
		     x->th[x->first_done].idx.z);
	}
	if (x->bar_arrived == 0) {
		x->bar_op = op;
		x->bar_acc = op == LP_EMU_BAR_AND ? 1 : 0;
	} else if (op != x->bar_op) {
		describe_thread(t, who, sizeof(who));
		fail(x, "%s waits at %s while %d threads wait at %s", who, bar_op_name(op),
		     x->bar_arrived, bar_op_name(x->bar_op));
	}
	switch (op) {
	case LP_EMU_BAR_COUNT:
		x->bar_acc += pred != 0;
		break;
	case LP_EMU_BAR_AND:
		x->bar_acc &= pred != 0;
		break;
	case LP_EMU_BAR_OR:
		x->bar_acc |= pred != 0;
		break;
	default:
		break;
	}
	t->state = TS_BAR;
	if (++x->bar_arrived == x->n) {
		x->bar_result = x->bar_acc;
		x->bar_arrived = 0;
		for (int i = 0; i < x->n; i++)
			if (&x->th[i] != t)
				enqueue(x, &x->th[i]);
		t->state = TS_RUNNING;
	} else {
		wait_here(x, t);
	}
	/* no later barrier can complete before this thread reads the result */
	return x->bar_result;
}

uint64_t lp_emu_warp(enum lp_emu_warp_op op, unsigned mask, uint64_t value, int param, int width)
{
	exec *x = in_kernel(warp_op_name(op));
	gpu_thread *t = x->running;
	int w = t->lin >> 5, lane = t->lin & 31;
	unsigned bit = 1u << lane;
	char who[64];

	warp_state *ws = &x->warps[w];
	mask &= ws->lanes; /* lanes past a partial warp's end do not exist */
	if (!(mask & bit)) {
		describe_thread(t, who, sizeof(who));
		fail(x, "%s calls %s with mask 0x%08x, which does not name its lane %d", who,
		     warp_op_name(op), mask, lane);
	}
	if (mask & ws->exited) {
		describe_thread(t, who, sizeof(who));
		fail(x, "%s calls %s with mask 0x%08x, but lanes 0x%08x of its warp exited", who,
		     warp_op_name(op), mask, mask & ws->exited);
	}
	if (op >= LP_EMU_WARP_SHFL_IDX && op <= LP_EMU_WARP_SHFL_XOR &&
	    (width < 1 || width > 32 || (width & (width - 1)))) {
		describe_thread(t, who, sizeof(who));
		fail(x, "%s calls %s with width %d (not a power of two up to 32)", who,
		     warp_op_name(op), width);
	}
	t->wop = (uint8_t)op;
	t->wmask = mask;
	t->wval = value;
	t->wparam = param;
	t->wwidth = width;
	t->state = TS_WARP;
	/* Lanes meet when they name the same mask in the same collective; a
	 * lane that waits elsewhere (another collective, another mask) has
	 * not arrived yet, which is how a GPU lets disjoint or nested groups
	 * proceed. A mismatch that can never resolve ends as a deadlock. */
	warp_wait *ww = NULL;
	for (int i = 0; i < ws->n_open; i++)
		if (ws->open[i].mask == mask && ws->open[i].op == op) {
			ww = &ws->open[i];
			break;
		}
	if (!ww) {
		ww = &ws->open[ws->n_open++];
		ww->mask = mask;
		ww->op = (uint8_t)op;
		ww->arrived = 0;
	}
	ww->arrived |= bit;
	ws->waiting |= bit;
	if (ww->arrived == mask) {
		*ww = ws->open[--ws->n_open];
		warp_complete(x, w, mask, t);
		t->state = TS_RUNNING;
	} else {
		wait_here(x, t);
	}
	return t->wres;
}

unsigned lp_emu_active_mask(void)
{
	exec *x = in_kernel("__activemask");
	gpu_thread *t = x->running;
	t->state = TS_ACTIVE;
	x->in_activemask++;
	wait_here(x, t);
	return (unsigned)t->wres;
}

void lp_emu_trap(const char *why)
{
	exec *x = in_kernel("__trap");
	char who[64];
	describe_thread(x->running, who, sizeof(who));
	fail(x, "%s: %s", who, why);
}

void *lp_emu_dyn_shared(void)
{
	exec *x = in_kernel("LP_DYN_SHARED");
	return x->dyn;
}

cudaError_t lp_emu_run_grid(dim3 grid, dim3 block, size_t smem, lp_emu_kernel *k, char *msg,
                            size_t msg_size)
{
	exec *x = exec_get();
	if (!x) {
		snprintf(msg, msg_size, "out of memory");
		return cudaErrorMemoryAllocation;
	}
	if (x->k) {
		snprintf(msg, msg_size, "a launch from inside a kernel (dynamic parallelism)");
		return cudaErrorNotSupported;
	}
	x->k = k;
	x->grid = make_uint3(grid.x, grid.y, grid.z);
	x->block = make_uint3(block.x, block.y, block.z);
	x->nblocks = (uint64_t)grid.x * grid.y * grid.z;
	x->next_block = 0;
	x->n = (int)(block.x * block.y * block.z);
	x->smem = smem;
	for (int i = 0; i < x->n; i++) {
		gpu_thread *t = &x->th[i];
		t->lin = i;
		t->idx = make_uint3(i % block.x, i / block.x % block.y, i / block.x / block.y);
	}
	for (int w = 0; w < (x->n + 31) / 32; w++)
		x->warps[w].lanes = lane_bits(x->n - w * 32);
	lp_emu_block_dim = x->block;
	lp_emu_grid_dim = x->grid;
#ifdef LP_EMU_ASAN
	ASAN_UNPOISON_MEMORY_REGION(x->dyn, LP_EMU_SMEM_OPTIN);
	ASAN_POISON_MEMORY_REGION(x->dyn + smem, LP_EMU_SMEM_OPTIN - smem);
#endif
	x->failed = false;
	x->switches = 0;
	x->blocks_run = 0;
	start_block(x, 0);

	x->cur = &x->main;
	fiber *f = x->free_list;
	if (f)
		x->free_list = f->next;
	else
		f = fiber_new(x);
	if (!f) {
		x->k = NULL;
		snprintf(msg, msg_size, "cannot map a fiber stack");
		return cudaErrorLaunchOutOfResources;
	}
	f->idle = false;
	switch_to(x, f, false);

	if (x->failed) {
		/* the fibers still in the kernel are abandoned mid-function */
		x->free_list = NULL;
		for (fiber *g : x->all) {
			if (!g->idle || g == x->from)
				fiber_init(x, g);
			g->idle = true;
			g->next = x->free_list;
			x->free_list = g;
		}
		snprintf(msg, msg_size, "%s", x->msg);
	}
	lp_emu_ctr.switches += x->switches;
	lp_emu_ctr.blocks += x->blocks_run;
	lp_emu_ctr.threads += x->blocks_run * (uint64_t)x->n;
	x->k = NULL;
	lp_emu_thread_idx = NULL;
	return x->failed ? cudaErrorLaunchFailure : cudaSuccess;
}
