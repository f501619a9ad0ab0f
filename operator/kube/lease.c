/* Lease-based leader election; see lease.h. */
#include "operator/kube/lease.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "operator/kube/clock.h"
#include "operator/kube/encoding.h"

struct kube_elector {
	struct kube_client *client;
	char *ns, *name, *identity;
	char *path, *collection;
	double lease_duration, renew_deadline, retry_period;
	struct kube_clock *clock; /* borrowed; NULL: the real one */
	struct kube_elector_callbacks cb;

	atomic_bool leader, stop;
	pthread_t thread;
	bool running;

	/* what we last saw in the Lease and when (monotonic) */
	char *obs_holder, *obs_renew;
	double obs_time;
	double call_timeout; /* bound on one API call of the current attempt */
};

static void logf_(struct kube_elector *e, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void logf_(struct kube_elector *e, const char *fmt, ...)
{
	char msg[768];
	va_list ap;

	if (!e->cb.on_log)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	e->cb.on_log(e->cb.user, msg);
}

int kube_elector_new(struct kube_elector **out, struct kube_client *c,
                     const struct kube_lease_config *cfg, const struct kube_elector_callbacks *cb,
                     struct lp_err *err)
{
	struct kube_elector *e;
	struct lp_buf p1, p2;
	int rc;

	*out = NULL;
	if (!cfg->ns || !*cfg->ns || !cfg->name || !*cfg->name || !cfg->identity || !*cfg->identity)
		return lp_errf(err, -EINVAL,
		               "leader election needs a namespace, name and identity");
	e = calloc(1, sizeof(*e));
	if (!e)
		return lp_errf(err, -ENOMEM, "out of memory");
	e->client = c;
	e->ns = strdup(cfg->ns);
	e->name = strdup(cfg->name);
	e->identity = strdup(cfg->identity);
	e->lease_duration = cfg->lease_duration > 0 ? cfg->lease_duration : 15;
	e->renew_deadline = cfg->renew_deadline > 0 ? cfg->renew_deadline : 10;
	e->retry_period = cfg->retry_period > 0 ? cfg->retry_period : 2;
	e->call_timeout = e->renew_deadline;
	e->clock = cfg->clock;
	if (cb)
		e->cb = *cb;
	lp_buf_init(&p1, 4096);
	lp_buf_init(&p2, 4096);
	rc = kube_path(&p1, &KUBE_GVR_LEASES, cfg->ns, cfg->name, NULL, err);
	if (!rc)
		rc = kube_path(&p2, &KUBE_GVR_LEASES, cfg->ns, NULL, NULL, err);
	e->path = lp_buf_detach(&p1, NULL);
	e->collection = lp_buf_detach(&p2, NULL);
	if (!rc && (!e->ns || !e->name || !e->identity || !e->path || !e->collection))
		rc = lp_errf(err, -ENOMEM, "out of memory");
	if (!rc && !(e->lease_duration > e->renew_deadline && e->renew_deadline > e->retry_period))
		rc = lp_errf(err, -EINVAL,
		             "lease duration (%.1fs) must exceed the renew deadline (%.1fs), which "
		             "must exceed the retry period (%.1fs)",
		             e->lease_duration, e->renew_deadline, e->retry_period);
	if (rc) {
		kube_elector_free(e);
		return rc;
	}
	*out = e;
	return 0;
}

static void now_micro(struct kube_elector *e, char *out, size_t size)
{
	struct timespec ts;

	kube_clock_wall(e->clock, &ts);
	kube_time_format(&ts, true, out, size);
}

static bool str_eq(const char *a, const char *b)
{
	return strcmp(a ? a : "", b ? b : "") == 0;
}

static void observe(struct kube_elector *e, const char *holder, const char *renew)
{
	if (str_eq(holder, e->obs_holder) && str_eq(renew, e->obs_renew) && e->obs_time > 0)
		return;
	if (!str_eq(holder, e->obs_holder) && holder && *holder &&
	    strcmp(holder, e->identity) != 0 && e->cb.new_leader)
		e->cb.new_leader(e->cb.user, holder);
	free(e->obs_holder);
	free(e->obs_renew);
	e->obs_holder = holder ? strdup(holder) : NULL;
	e->obs_renew = renew ? strdup(renew) : NULL;
	e->obs_time = kube_clock_mono(e->clock);
}

static int create_lease(struct kube_elector *e, bool *leader, struct lp_err *err)
{
	char now[40];
	json_t *obj;
	int rc;

	now_micro(e, now, sizeof(now));
	obj = json_pack("{s:s, s:s, s:{s:s, s:s}, s:{s:s, s:i, s:s, s:s, s:i}}", "apiVersion",
	                "coordination.k8s.io/v1", "kind", "Lease", "metadata", "name", e->name,
	                "namespace", e->ns, "spec", "holderIdentity", e->identity,
	                "leaseDurationSeconds", (int)ceil(e->lease_duration), "acquireTime", now,
	                "renewTime", now, "leaseTransitions", 0);
	if (!obj)
		return lp_errf(err, -ENOMEM, "out of memory");
	rc = kube_call_json(e->client, "POST", e->collection, "application/json", obj,
	                    e->call_timeout, NULL, err);
	json_decref(obj);
	if (rc == -EEXIST || rc == -EBUSY) {
		*leader = false; /* someone else created it first */
		return 0;
	}
	if (rc)
		return rc;
	observe(e, e->identity, now);
	*leader = true;
	return 0;
}

int kube_elector_try(struct kube_elector *e, bool *leader, struct lp_err *err)
{
	json_t *lease = NULL, *spec, *upd = NULL;
	const char *holder, *renew, *acquire;
	json_int_t transitions = 0, dur;
	char now[40];
	int rc;

	*leader = false;
	rc = kube_call_json(e->client, "GET", e->path, NULL, NULL, e->call_timeout, &lease, err);
	if (rc == -ENOENT)
		return create_lease(e, leader, err);
	if (rc)
		return rc;
	spec = json_object_get(lease, "spec");
	holder = json_string_value(json_object_get(spec, "holderIdentity"));
	renew = json_string_value(json_object_get(spec, "renewTime"));
	acquire = json_string_value(json_object_get(spec, "acquireTime"));
	dur = json_integer_value(json_object_get(spec, "leaseDurationSeconds"));
	if (json_is_integer(json_object_get(spec, "leaseTransitions")))
		transitions = json_integer_value(json_object_get(spec, "leaseTransitions"));
	observe(e, holder, renew);
	if (dur <= 0)
		dur = (json_int_t)ceil(e->lease_duration);
	if (holder && *holder && strcmp(holder, e->identity) != 0 &&
	    e->obs_time + (double)dur > kube_clock_mono(e->clock))
		goto out; /* held by another and not expired */

	now_micro(e, now, sizeof(now));
	upd = json_deep_copy(lease);
	if (!upd) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto out;
	}
	spec = json_object_get(upd, "spec");
	if (!json_is_object(spec)) {
		spec = json_object();
		json_object_set_new(upd, "spec", spec);
	}
	if (!holder || strcmp(holder, e->identity) != 0) {
		acquire = now;
		transitions++; /* a new holder, even after a release */
	}
	json_object_set_new(spec, "holderIdentity", json_string(e->identity));
	json_object_set_new(spec, "leaseDurationSeconds",
	                    json_integer((json_int_t)ceil(e->lease_duration)));
	json_object_set_new(spec, "acquireTime", json_string(acquire ? acquire : now));
	json_object_set_new(spec, "renewTime", json_string(now));
	json_object_set_new(spec, "leaseTransitions", json_integer(transitions));
	rc = kube_call_json(e->client, "PUT", e->path, "application/json", upd, e->call_timeout,
	                    NULL, err);
	if (rc == -EBUSY) {
		rc = 0; /* lost the race to another candidate */
		goto out;
	}
	if (rc)
		goto out;
	observe(e, e->identity, now);
	*leader = true;
out:
	json_decref(upd);
	json_decref(lease);
	return rc;
}

static void release(struct kube_elector *e)
{
	json_t *lease = NULL, *spec;
	struct lp_err err = {0};
	const char *holder;
	char now[40];

	e->call_timeout = e->retry_period;
	if (kube_call_json(e->client, "GET", e->path, NULL, NULL, e->call_timeout, &lease, &err))
		goto out;
	spec = json_object_get(lease, "spec");
	holder = json_string_value(json_object_get(spec, "holderIdentity"));
	if (!json_is_object(spec) || !holder || strcmp(holder, e->identity) != 0)
		goto out;
	now_micro(e, now, sizeof(now));
	json_object_set_new(spec, "holderIdentity", json_string(""));
	json_object_set_new(spec, "leaseDurationSeconds", json_integer(1));
	json_object_set_new(spec, "renewTime", json_string(now));
	json_object_set_new(spec, "acquireTime", json_string(now));
	if (kube_call_json(e->client, "PUT", e->path, "application/json", lease, e->call_timeout,
	                   NULL, &err) == 0)
		logf_(e, "released lease %s/%s", e->ns, e->name);
out:
	if (err.code)
		logf_(e, "could not release lease %s/%s: %s", e->ns, e->name, err.msg);
	json_decref(lease);
}

static void *elector_main(void *arg)
{
	struct kube_elector *e = arg;
	struct lp_err err;
	bool leader = false;
	double last_ok;

	/* acquire */
	while (!atomic_load(&e->stop)) {
		lp_err_clear(&err);
		e->call_timeout = e->renew_deadline;
		if (kube_elector_try(e, &leader, &err))
			logf_(e, "cannot acquire lease %s/%s: %s", e->ns, e->name, err.msg);
		if (leader)
			break;
		/* jitter 1.2 as client-go does */
		kube_clock_sleep(e->clock, e->retry_period * (1.0 + 1.2 * kube_random()), &e->stop);
	}
	if (!leader)
		return NULL;
	atomic_store(&e->leader, true);
	logf_(e, "acquired lease %s/%s as %s", e->ns, e->name, e->identity);
	if (e->cb.started_leading)
		e->cb.started_leading(e->cb.user);

	/* renew */
	last_ok = kube_clock_mono(e->clock);
	while (!atomic_load(&e->stop)) {
		double left;

		if (!kube_clock_sleep(e->clock, e->retry_period, &e->stop))
			break;
		left = e->renew_deadline - (kube_clock_mono(e->clock) - last_ok);
		e->call_timeout = left > 1 ? left : 1;
		lp_err_clear(&err);
		if (kube_elector_try(e, &leader, &err) == 0 && leader) {
			last_ok = kube_clock_mono(e->clock);
			continue;
		}
		if (err.code)
			logf_(e, "cannot renew lease %s/%s: %s", e->ns, e->name, err.msg);
		if ((!err.code && !leader) ||
		    kube_clock_mono(e->clock) - last_ok >= e->renew_deadline) {
			atomic_store(&e->leader, false);
			logf_(e, "lost lease %s/%s", e->ns, e->name);
			if (e->cb.stopped_leading)
				e->cb.stopped_leading(e->cb.user);
			return NULL;
		}
	}
	release(e);
	atomic_store(&e->leader, false);
	return NULL;
}

int kube_elector_start(struct kube_elector *e, struct lp_err *err)
{
	int rc;

	if (e->running)
		return 0;
	atomic_store(&e->stop, false);
	rc = pthread_create(&e->thread, NULL, elector_main, e);
	if (rc)
		return lp_errf(err, -rc, "cannot start the leader election thread");
	e->running = true;
	return 0;
}

void kube_elector_stop(struct kube_elector *e)
{
	if (!e || !e->running)
		return;
	atomic_store(&e->stop, true);
	pthread_join(e->thread, NULL);
	e->running = false;
}

void kube_elector_free(struct kube_elector *e)
{
	if (!e)
		return;
	kube_elector_stop(e);
	free(e->ns);
	free(e->name);
	free(e->identity);
	free(e->path);
	free(e->collection);
	free(e->obs_holder);
	free(e->obs_renew);
	free(e);
}

bool kube_elector_is_leader(struct kube_elector *e)
{
	return atomic_load(&e->leader);
}
