/* Backend-independent parts of the backend interface; see backend.h. */
#include "kernels/backend.h"

#include <stdlib.h>

void lp_backend_destroy(struct lp_backend *be)
{
	if (!be)
		return;
	if (be->ops && be->ops->destroy)
		be->ops->destroy(be->ctx);
	free(be);
}
