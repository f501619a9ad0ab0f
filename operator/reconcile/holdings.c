/* Per-pod beliefs; see holdings.h. Stored as one JSON object
 * uid -> {"restarts", "base", "verified_at", "loras": {name: {source,
 * sha256, seq}}, "gone": {name: seq}} under a mutex; seq is a counter of
 * writes (sets and forgets) across all pods. */
#include "operator/reconcile/holdings.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "operator/kube/encoding.h"

struct holdings {
	pthread_mutex_t lock;
	json_t *pods;
	long long seq; /* writes so far */
};

int holdings_new(struct holdings **out, struct lp_err *err)
{
	struct holdings *h = calloc(1, sizeof(*h));

	*out = NULL;
	if (!h || !(h->pods = json_object())) {
		free(h);
		return lp_errf(err, -ENOMEM, "out of memory");
	}
	pthread_mutex_init(&h->lock, NULL);
	*out = h;
	return 0;
}

void holdings_free(struct holdings *h)
{
	if (!h)
		return;
	json_decref(h->pods);
	pthread_mutex_destroy(&h->lock);
	free(h);
}

/* The pod's record, created empty when create is set. Lock held. */
static json_t *pod(struct holdings *h, const char *uid, bool create)
{
	json_t *p = json_object_get(h->pods, uid);

	if (p || !create)
		return p;
	p = json_pack("{s:{}, s:{}}", "loras", "gone");
	if (p && json_object_set_new(h->pods, uid, p))
		return NULL;
	return p;
}

bool holdings_observe_restarts(struct holdings *h, const char *uid, int restarts)
{
	json_t *p, *known;
	bool changed = false;

	pthread_mutex_lock(&h->lock);
	p = pod(h, uid, true);
	known = json_object_get(p, "restarts");
	if (known && json_integer_value(known) != restarts) {
		changed = true;
		json_object_del(h->pods, uid);
		p = pod(h, uid, true);
	}
	if (p)
		json_object_set_new(p, "restarts", json_integer(restarts));
	pthread_mutex_unlock(&h->lock);
	return changed;
}

bool holdings_get(struct holdings *h, const char *uid, const char *name, struct agent_lora *out)
{
	json_t *l;
	bool found;

	pthread_mutex_lock(&h->lock);
	l = json_object_get(json_object_get(pod(h, uid, false), "loras"), name);
	found = l && agent_lora_from_json(l, out);
	pthread_mutex_unlock(&h->lock);
	return found;
}

void holdings_set(struct holdings *h, const char *uid, const char *name, const struct agent_lora *l)
{
	json_t *p;

	pthread_mutex_lock(&h->lock);
	p = pod(h, uid, true);
	if (p) {
		json_object_set_new(json_object_get(p, "loras"), name,
		                    json_pack("{s:s, s:s, s:I}", "source", l->source, "sha256",
		                              l->sha256, "seq", (json_int_t)++h->seq));
		json_object_del(json_object_get(p, "gone"), name);
	}
	pthread_mutex_unlock(&h->lock);
}

void holdings_forget(struct holdings *h, const char *uid, const char *name)
{
	json_t *p;

	pthread_mutex_lock(&h->lock);
	p = pod(h, uid, false);
	if (p) {
		json_object_del(json_object_get(p, "loras"), name);
		json_object_set_new(json_object_get(p, "gone"), name,
		                    json_integer((json_int_t)++h->seq));
	}
	pthread_mutex_unlock(&h->lock);
}

long long holdings_verify_begin(struct holdings *h, const char *uid)
{
	long long s;

	(void)uid;
	pthread_mutex_lock(&h->lock);
	s = h->seq;
	pthread_mutex_unlock(&h->lock);
	return s;
}

void holdings_forget_pod(struct holdings *h, const char *uid)
{
	pthread_mutex_lock(&h->lock);
	json_object_del(h->pods, uid);
	pthread_mutex_unlock(&h->lock);
}

bool holdings_base(struct holdings *h, const char *uid, char *base, size_t size)
{
	const char *b;
	bool found = false;

	pthread_mutex_lock(&h->lock);
	b = json_string_value(json_object_get(pod(h, uid, false), "base"));
	if (b) {
		snprintf(base, size, "%s", b);
		found = true;
	}
	pthread_mutex_unlock(&h->lock);
	return found;
}

void holdings_set_base(struct holdings *h, const char *uid, const char *base)
{
	json_t *p;

	pthread_mutex_lock(&h->lock);
	p = pod(h, uid, true);
	if (p)
		json_object_set_new(p, "base", json_string(base));
	pthread_mutex_unlock(&h->lock);
}

bool holdings_verified_within(struct holdings *h, const char *uid, double max_age)
{
	json_t *at;
	bool fresh;

	pthread_mutex_lock(&h->lock);
	at = json_object_get(pod(h, uid, false), "verified_at");
	fresh = json_is_real(at) && kube_now_mono() - json_real_value(at) < max_age;
	pthread_mutex_unlock(&h->lock);
	return fresh;
}

void holdings_set_verified(struct holdings *h, const char *uid, json_t *loras, long long begin)
{
	json_t *p, *fresh, *v;
	const char *name;
	void *tmp;

	fresh = json_object();
	json_object_foreach(loras, name, v)
	{
		struct agent_lora l;

		if (agent_lora_from_json(v, &l))
			json_object_set_new(
			    fresh, name,
			    json_pack("{s:s, s:s}", "source", l.source, "sha256", l.sha256));
	}
	pthread_mutex_lock(&h->lock);
	p = pod(h, uid, true);
	if (p && fresh) {
		/* writes newer than the list win over it */
		json_object_foreach(json_object_get(p, "loras"), name, v)
		{
			if (json_integer_value(json_object_get(v, "seq")) > begin)
				json_object_set(fresh, name, v);
		}
		json_object_foreach_safe(json_object_get(p, "gone"), tmp, name, v)
		{
			if (json_integer_value(v) > begin)
				json_object_del(fresh, name);
			else
				json_object_del(json_object_get(p, "gone"), name);
		}
		json_object_set(p, "loras", fresh);
		json_object_set_new(p, "verified_at", json_real(kube_now_mono()));
	}
	pthread_mutex_unlock(&h->lock);
	json_decref(fresh);
}

void holdings_prune(struct holdings *h, json_t *live)
{
	const char *uid;
	json_t *v;
	void *tmp;

	pthread_mutex_lock(&h->lock);
	json_object_foreach_safe(h->pods, tmp, uid, v)
	{
		if (!json_object_get(live, uid))
			json_object_del(h->pods, uid);
	}
	pthread_mutex_unlock(&h->lock);
}

size_t holdings_pods(struct holdings *h)
{
	size_t n;

	pthread_mutex_lock(&h->lock);
	n = json_object_size(h->pods);
	pthread_mutex_unlock(&h->lock);
	return n;
}
