/* Backoff with jitter; see backoff.h. */
#include "operator/kube/backoff.h"

#include "operator/kube/clock.h"
#include "operator/kube/encoding.h"

void kube_backoff_init(struct kube_backoff *b)
{
	b->initial = 0.8;
	b->max = 30.0;
	b->factor = 2.0;
	b->jitter = 0.2;
	b->next = b->initial;
}

double kube_backoff_next(struct kube_backoff *b)
{
	double d = b->next * (1.0 + b->jitter * kube_random());

	if (d > b->max)
		d = b->max;
	b->next *= b->factor;
	if (b->next > b->max)
		b->next = b->max;
	return d;
}

void kube_backoff_reset(struct kube_backoff *b)
{
	b->next = b->initial;
}

bool kube_sleep(double seconds, const atomic_bool *stop)
{
	return kube_clock_sleep(NULL, seconds, stop);
}
