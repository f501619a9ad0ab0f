/* Real and fake clocks; see clock.h. */
#include "operator/kube/clock.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* the real and the fake clock wait for a stop flag in steps this long */
#define STOP_POLL_S 0.05
#define FAKE_POLL_S 0.005

static void ts_from(double t, struct timespec *ts)
{
	ts->tv_sec = (time_t)t;
	ts->tv_nsec = (long)((t - (double)ts->tv_sec) * 1e9);
	if (ts->tv_nsec >= 1000000000L) {
		ts->tv_sec++;
		ts->tv_nsec -= 1000000000L;
	}
	if (ts->tv_nsec < 0)
		ts->tv_nsec = 0;
}

static double real_mono(struct kube_clock *c)
{
	struct timespec ts;

	(void)c;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void real_wall(struct kube_clock *c, struct timespec *out)
{
	(void)c;
	clock_gettime(CLOCK_REALTIME, out);
}

static bool real_sleep_until(struct kube_clock *c, double until, const atomic_bool *stop)
{
	for (;;) {
		double left = until - real_mono(c);
		struct timespec ts;

		if (stop && atomic_load(stop))
			return false;
		if (left <= 0)
			return true;
		if (left > STOP_POLL_S)
			left = STOP_POLL_S;
		ts_from(left, &ts);
		nanosleep(&ts, NULL);
	}
}

static void real_cond_wait_until(struct kube_clock *c, pthread_cond_t *cond, pthread_mutex_t *m,
                                 double until)
{
	struct timespec ts;

	(void)c;
	ts_from(until, &ts);
	pthread_cond_timedwait(cond, m, &ts);
}

static struct kube_clock real_clock = {real_mono, real_wall, real_sleep_until,
                                       real_cond_wait_until};

struct kube_clock *kube_clock_real(void)
{
	return &real_clock;
}

double kube_clock_mono(struct kube_clock *c)
{
	c = c ? c : &real_clock;
	return c->mono(c);
}

void kube_clock_wall(struct kube_clock *c, struct timespec *out)
{
	c = c ? c : &real_clock;
	c->wall(c, out);
}

bool kube_clock_sleep(struct kube_clock *c, double seconds, const atomic_bool *stop)
{
	c = c ? c : &real_clock;
	return c->sleep_until(c, c->mono(c) + seconds, stop);
}

void kube_clock_cond_wait_until(struct kube_clock *c, pthread_cond_t *cond, pthread_mutex_t *m,
                                double until)
{
	c = c ? c : &real_clock;
	c->cond_wait_until(c, cond, m, until);
}

/* --- fake --- */

static struct kube_fake_clock *fake_of(struct kube_clock *c)
{
	return (struct kube_fake_clock *)c; /* clock is the first member */
}

static double fake_mono(struct kube_clock *c)
{
	struct kube_fake_clock *f = fake_of(c);
	double t;

	pthread_mutex_lock(&f->lock);
	t = f->mono;
	pthread_mutex_unlock(&f->lock);
	return t;
}

static void fake_wall(struct kube_clock *c, struct timespec *out)
{
	struct kube_fake_clock *f = fake_of(c);

	pthread_mutex_lock(&f->lock);
	*out = f->wall;
	pthread_mutex_unlock(&f->lock);
}

/* A real deadline step ahead on CLOCK_MONOTONIC (the cond's clock). */
static void real_deadline(double step, struct timespec *ts)
{
	ts_from(real_mono(NULL) + step, ts);
}

static bool fake_sleep_until(struct kube_clock *c, double until, const atomic_bool *stop)
{
	struct kube_fake_clock *f = fake_of(c);
	bool stopped = false;
	int slot = -1, i;

	pthread_mutex_lock(&f->lock);
	for (i = 0; i < KUBE_FAKE_CLOCK_SLOTS && slot < 0; i++)
		if (f->sleeping[i] == 0)
			slot = i;
	while (f->mono < until) {
		struct timespec ts;

		if (stop && atomic_load(stop)) {
			stopped = true;
			break;
		}
		if (slot >= 0)
			f->sleeping[slot] = until;
		real_deadline(FAKE_POLL_S, &ts);
		pthread_cond_timedwait(&f->cond, &f->lock, &ts);
	}
	if (slot >= 0)
		f->sleeping[slot] = 0;
	pthread_mutex_unlock(&f->lock);
	return !stopped;
}

static void fake_cond_wait_until(struct kube_clock *c, pthread_cond_t *cond, pthread_mutex_t *m,
                                 double until)
{
	struct timespec ts;

	/* an advance cannot signal the caller's cond: look again soon */
	(void)c;
	(void)until;
	real_deadline(FAKE_POLL_S, &ts);
	pthread_cond_timedwait(cond, m, &ts);
}

void kube_fake_clock_init(struct kube_fake_clock *f, time_t wall_start)
{
	pthread_condattr_t ca;
	int i;

	f->clock.mono = fake_mono;
	f->clock.wall = fake_wall;
	f->clock.sleep_until = fake_sleep_until;
	f->clock.cond_wait_until = fake_cond_wait_until;
	pthread_mutex_init(&f->lock, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&f->cond, &ca);
	pthread_condattr_destroy(&ca);
	f->mono = 1000.0;
	f->wall.tv_sec = wall_start;
	f->wall.tv_nsec = 0;
	for (i = 0; i < KUBE_FAKE_CLOCK_SLOTS; i++)
		f->sleeping[i] = 0;
}

void kube_fake_clock_release(struct kube_fake_clock *f)
{
	pthread_cond_destroy(&f->cond);
	pthread_mutex_destroy(&f->lock);
}

void kube_fake_clock_advance(struct kube_fake_clock *f, double seconds)
{
	double whole;
	long ns;

	if (!(seconds > 0))
		return;
	pthread_mutex_lock(&f->lock);
	f->mono += seconds;
	ns = (long)(modf(seconds, &whole) * 1e9) + f->wall.tv_nsec;
	f->wall.tv_sec += (time_t)whole + ns / 1000000000L;
	f->wall.tv_nsec = ns % 1000000000L;
	pthread_cond_broadcast(&f->cond);
	pthread_mutex_unlock(&f->lock);
}

int kube_fake_clock_waiters(struct kube_fake_clock *f)
{
	int n = 0, i;

	pthread_mutex_lock(&f->lock);
	for (i = 0; i < KUBE_FAKE_CLOCK_SLOTS; i++)
		if (f->sleeping[i] > f->mono)
			n++;
	pthread_mutex_unlock(&f->lock);
	return n;
}

int kube_parse_duration(const char *s, double *out)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(s, &end);
	if (end == s || errno || v < 0 || !isfinite(v))
		return -1;
	if (strcmp(end, "") == 0 || strcmp(end, "s") == 0)
		*out = v;
	else if (strcmp(end, "ms") == 0)
		*out = v / 1000;
	else if (strcmp(end, "m") == 0)
		*out = v * 60;
	else if (strcmp(end, "h") == 0)
		*out = v * 3600;
	else
		return -1;
	return 0;
}
