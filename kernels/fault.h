/* Fault injection for tests of what happens when a device fails: after
 * after_steps forward passes (end_step calls) the backend's sticky status
 * reports an error, as a CUDA backend does after a device error. The agent
 * wraps its backend when LORAPLANE_TEST_BACKEND_FAIL_AFTER=N is set, so
 * that the integration tests can watch requests fail with 500, streams end
 * with an error event, and /ready turn 503. Never set in production. */
#ifndef LP_KERNELS_FAULT_H
#define LP_KERNELS_FAULT_H

#include "kernels/backend.h"

/* Wraps be in place (its ops table); one backend per process. */
int lp_backend_fault_wrap(struct lp_backend *be, long after_steps, struct lp_err *err);

#endif
