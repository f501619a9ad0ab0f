/* A backend that fails on purpose: the test hook behind
 * LORAPLANE_TEST_BACKEND_FAIL_AFTER (see kernels/fault.h). */
#include "kernels/fault.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* One wrapped backend per process is all a test needs; the wrapper keeps
 * the inner backend's ctx, so every op but these two goes straight to it. */
static struct {
	struct lp_backend_ops ops;
	const struct lp_backend_ops *inner;
	long after, steps;
} g;

static void fault_end_step(void *ctx)
{
	g.inner->end_step(ctx);
	g.steps++;
}

static int fault_status(void *ctx, struct lp_err *err)
{
	int rc = g.inner->status(ctx, err);

	if (rc || g.steps < g.after)
		return rc;
	return lp_errf(err, -EIO,
	               "injected backend failure after %ld steps "
	               "(LORAPLANE_TEST_BACKEND_FAIL_AFTER)",
	               g.after);
}

int lp_backend_fault_wrap(struct lp_backend *be, long after_steps, struct lp_err *err)
{
	if (g.inner)
		return lp_errf(err, -EBUSY, "a backend is already wrapped");
	if (after_steps < 0)
		return lp_errf(err, -EINVAL, "fail after %ld steps: must be >= 0", after_steps);
	g.inner = be->ops;
	g.ops = *be->ops;
	g.ops.end_step = fault_end_step;
	g.ops.status = fault_status;
	g.after = after_steps;
	g.steps = 0;
	be->ops = &g.ops;
	return 0;
}
