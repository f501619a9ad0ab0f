/* The LoraAdapter controller; see reconcile.h.
 *
 * Threads: two informer threads (adapters, pods) only enqueue keys; N
 * workers run reconcile_key; each reconcile fans out to at most
 * max_concurrent_loads short-lived threads for the per-pod agent calls,
 * and a process-wide counting semaphore keeps the loads in flight across
 * all workers under the same bound. A resync thread marks every resource
 * for verification and enqueues it. */
#include "operator/reconcile/reconcile.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/credentials.h"
#include "operator/kube/backoff.h"
#include "operator/kube/encoding.h"
#include "operator/kube/events.h"
#include "operator/kube/informer.h"
#include "operator/kube/patch.h"
#include "operator/kube/workqueue.h"
#include "operator/reconcile/adapter.h"
#include "operator/reconcile/agents.h"
#include "operator/reconcile/holdings.h"

#define COMPONENT "loraplane-operator"
#define MAX_PODS  4096 /* agent pods of one base model considered per reconcile */

struct reconciler {
	struct reconciler_config cfg; /* strings below are our copies */
	char *ns, *agent_token, *identity;

	struct kube_informer *adapters, *pods;
	struct workqueue *queue;
	struct holdings *holdings;
	pthread_t *workers;
	int nworkers;
	pthread_t resync_thread;
	bool started;
	atomic_bool stop;

	pthread_mutex_t sem_lock; /* global bound on loads in flight */
	pthread_cond_t sem_cond;
	int sem_free;

	pthread_mutex_t state_lock; /* guards state and verify */
	json_t *state;              /* key -> {"applied", "lora", "total", "ready"} */
	json_t *verify;             /* key -> true: verify agents on the next reconcile */

	atomic_ulong n_ok, n_retry, n_error, n_loads_ok, n_loads_failed, n_unloads_ok,
	    n_unloads_failed, n_verifies, n_events, reconcile_us;
};

static void rlog(struct reconciler *r, const char *level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void rlog(struct reconciler *r, const char *level, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	if (!r->cfg.log)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	r->cfg.log(r->cfg.log_user, level, msg);
}

static void emit_event(struct reconciler *r, json_t *obj, const char *type, const char *reason,
                       const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static void emit_event(struct reconciler *r, json_t *obj, const char *type, const char *reason,
                       const char *fmt, ...)
{
	struct lp_err err = {0};
	char msg[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	atomic_fetch_add(&r->n_events, 1);
	if (kube_event_emit(r->cfg.client, obj, type, reason, msg, COMPONENT, r->identity, &err))
		rlog(r, "warn", "cannot record event %s: %s", reason, err.msg);
}

/* ---- state shared between reconciles of one key ---- */

static json_t *state_get(struct reconciler *r, const char *key, const char *field)
{
	json_t *v;

	pthread_mutex_lock(&r->state_lock);
	v = json_incref(json_object_get(json_object_get(r->state, key), field));
	pthread_mutex_unlock(&r->state_lock);
	return v;
}

/* Takes the reference to v (NULL deletes the field). */
static void state_set(struct reconciler *r, const char *key, const char *field, json_t *v)
{
	json_t *st;

	pthread_mutex_lock(&r->state_lock);
	st = json_object_get(r->state, key);
	if (!st) {
		st = json_object();
		json_object_set_new(r->state, key, st);
	}
	if (v)
		json_object_set_new(st, field, v);
	else
		json_object_del(st, field);
	pthread_mutex_unlock(&r->state_lock);
}

static void state_drop(struct reconciler *r, const char *key)
{
	pthread_mutex_lock(&r->state_lock);
	json_object_del(r->state, key);
	json_object_del(r->verify, key);
	pthread_mutex_unlock(&r->state_lock);
}

static void mark_verify(struct reconciler *r, const char *key)
{
	pthread_mutex_lock(&r->state_lock);
	json_object_set_new(r->verify, key, json_true());
	pthread_mutex_unlock(&r->state_lock);
}

static bool take_verify(struct reconciler *r, const char *key)
{
	bool v;

	pthread_mutex_lock(&r->state_lock);
	v = json_object_get(r->verify, key) != NULL;
	json_object_del(r->verify, key);
	pthread_mutex_unlock(&r->state_lock);
	return v;
}

/* ---- global load semaphore ---- */

static void sem_acquire(struct reconciler *r)
{
	pthread_mutex_lock(&r->sem_lock);
	while (r->sem_free <= 0)
		pthread_cond_wait(&r->sem_cond, &r->sem_lock);
	r->sem_free--;
	pthread_mutex_unlock(&r->sem_lock);
}

static void sem_release(struct reconciler *r)
{
	pthread_mutex_lock(&r->sem_lock);
	r->sem_free++;
	pthread_cond_signal(&r->sem_cond);
	pthread_mutex_unlock(&r->sem_lock);
}

/* ---- informer handlers: only enqueue ---- */

static void enqueue_obj(struct reconciler *r, json_t *obj)
{
	char key[512];

	if (kube_object_key(obj, key, sizeof(key)))
		workqueue_add(r->queue, key);
}

static void on_adapter_add(void *user, json_t *obj)
{
	struct reconciler *r = user;
	char key[512];

	/* first sight (start-up or relist): check the agents, not only memory */
	if (kube_object_key(obj, key, sizeof(key))) {
		mark_verify(r, key);
		workqueue_add(r->queue, key);
	}
}

static bool same_json(json_t *a, json_t *b)
{
	return (!a && !b) || (a && b && json_equal(a, b));
}

static void on_adapter_update(void *user, json_t *old_obj, json_t *obj)
{
	json_t *om = json_object_get(old_obj, "metadata"), *nm = json_object_get(obj, "metadata");

	/* our own status writes change nothing that needs a reconcile */
	if (same_json(json_object_get(om, "generation"), json_object_get(nm, "generation")) &&
	    same_json(json_object_get(om, "deletionTimestamp"),
	              json_object_get(nm, "deletionTimestamp")) &&
	    same_json(json_object_get(om, "finalizers"), json_object_get(nm, "finalizers")) &&
	    same_json(json_object_get(om, "uid"), json_object_get(nm, "uid")) &&
	    json_object_get(obj, "status"))
		return;
	enqueue_obj(user, obj);
}

static void on_adapter_delete(void *user, json_t *obj)
{
	enqueue_obj(user, obj);
}

/* Enqueues every adapter of the pod's namespace and base model. */
static void enqueue_for_pod(struct reconciler *r, const struct pod_info *p)
{
	json_t *all, *obj;
	size_t i;

	if (!p->base_hash[0])
		return;
	all = kube_informer_list(r->adapters);
	json_array_foreach(all, i, obj)
	{
		struct adapter_spec s;

		if (adapter_spec_parse(obj, &s, NULL) == 0 && pod_serves(p, &s))
			enqueue_obj(r, obj);
	}
	json_decref(all);
}

static void on_pod_add(void *user, json_t *obj)
{
	struct pod_info p;

	if (pod_info_parse(obj, &p))
		enqueue_for_pod(user, &p);
}

static void on_pod_update(void *user, json_t *old_obj, json_t *obj)
{
	struct pod_info a, b;

	if (!pod_info_parse(obj, &b))
		return;
	if (pod_info_parse(old_obj, &a) && strcmp(a.ip, b.ip) == 0 && a.http_port == b.http_port &&
	    a.admin_port == b.admin_port && a.running == b.running && a.ready == b.ready &&
	    a.restarts == b.restarts && strcmp(a.base_hash, b.base_hash) == 0 &&
	    strcmp(a.base_model, b.base_model) == 0)
		return;
	enqueue_for_pod(user, &b);
}

static void on_pod_delete(void *user, json_t *obj)
{
	struct reconciler *r = user;
	struct pod_info p;

	if (!pod_info_parse(obj, &p))
		return;
	holdings_forget_pod(r->holdings, p.uid);
	enqueue_for_pod(r, &p);
}

static void on_informer_log(void *user, const char *msg)
{
	rlog(user, "warn", "%s", msg);
}

/* ---- per-pod work, run in parallel ---- */

enum pod_op { POD_LOAD, POD_UNLOAD };

struct pod_job {
	struct reconciler *r;
	const struct adapter_spec *s;
	struct endpoint_state *eps;
	size_t n;
	atomic_size_t next;
	enum pod_op op;
	bool verify;
	bool inplace;
	const char *unload_name; /* POD_UNLOAD: the name to unload */
	/* POD_LOAD: the credentials of spec.source.secretRef, read by the
	 * first pod that needs a load (none may: no read in a steady state) */
	pthread_mutex_t creds_lock;
	bool creds_read;
	json_t *creds;       /* NULL: no secretRef, or it could not be read */
	char creds_err[256]; /* why it could not be read, or "" */
};

static bool wanted(const struct adapter_spec *s, const struct agent_lora *l)
{
	return strcmp(l->source, s->uri) == 0 &&
	       (!s->sha256[0] || strcmp(l->sha256, s->sha256) == 0);
}

static void reply_message(struct endpoint_state *ep, const char *what,
                          const struct agent_reply *rep, const struct lp_err *err)
{
	ep->failed = true;
	if (rep->http_status)
		snprintf(ep->message, sizeof(ep->message), "%s: %ld %.200s", what, rep->http_status,
		         rep->message);
	else
		snprintf(ep->message, sizeof(ep->message), "%s: %.200s", what,
		         rep->message[0] ? rep->message : err->msg);
}

/* Reads s's Secret into *out, an object of the lp_credential_keys it holds
 * (decoded); other keys are left out. msg says why on failure. */
static int read_credentials(struct reconciler *r, const struct adapter_spec *s, json_t **out,
                            char *msg, size_t cap)
{
	struct lp_err err = {0};
	struct lp_buf path;
	json_t *secret = NULL, *data, *creds = NULL;
	int rc;

	*out = NULL;
	lp_buf_init(&path, 512);
	rc = kube_path(&path, &KUBE_GVR_SECRETS, s->ns, s->secret, NULL, &err);
	if (!rc)
		rc = kube_get(r->cfg.client, path.data, &secret, &err);
	lp_buf_release(&path);
	if (rc) {
		snprintf(msg, cap, "cannot read Secret '%.80s' of spec.source.secretRef: %.110s",
		         s->secret, rc == -ENOENT ? "not found" : err.msg);
		return rc;
	}
	data = json_object_get(secret, "data");
	creds = json_object();
	rc = creds ? 0 : -ENOMEM;
	for (size_t i = 0; !rc && i < LP_N_CREDENTIAL_KEYS; i++) {
		const char *b64 = json_string_value(json_object_get(data, lp_credential_keys[i]));
		unsigned char *raw = NULL;
		size_t n = 0;

		if (!b64)
			continue;
		if (kube_base64_decode(b64, strlen(b64), &raw, &n, &err) < 0 || n == 0 ||
		    memchr(raw, '\0', n)) {
			snprintf(msg, cap, "Secret '%.100s' key %s is empty or not text", s->secret,
			         lp_credential_keys[i]);
			rc = -EINVAL;
		} else if (json_object_set_new(creds, lp_credential_keys[i],
		                               json_stringn((const char *)raw, n)) < 0) {
			snprintf(msg, cap, "Secret '%.100s' key %s is not UTF-8 text", s->secret,
			         lp_credential_keys[i]);
			rc = -EINVAL;
		}
		if (raw) {
			explicit_bzero(raw, n);
			free(raw);
		}
	}
	json_decref(secret);
	if (!rc && json_object_size(creds) == 0) {
		snprintf(msg, cap,
		         "Secret '%.100s' holds none of the keys the agents take (%s, ...)",
		         s->secret, lp_credential_keys[0]);
		rc = -EINVAL;
	}
	if (rc) {
		json_decref(creds);
		return rc;
	}
	*out = creds;
	return 0;
}

/* The job's credentials (NULL when there is no secretRef); false when the
 * secretRef's Secret cannot be used, with the reason in ep's message. */
static bool job_credentials(struct pod_job *job, struct endpoint_state *ep, json_t **creds)
{
	bool ok;

	*creds = NULL;
	if (!job->s->secret[0])
		return true;
	pthread_mutex_lock(&job->creds_lock);
	if (!job->creds_read) {
		read_credentials(job->r, job->s, &job->creds, job->creds_err,
		                 sizeof(job->creds_err));
		job->creds_read = true;
	}
	ok = job->creds != NULL;
	*creds = job->creds;
	if (!ok)
		snprintf(ep->message, sizeof(ep->message), "%s", job->creds_err);
	pthread_mutex_unlock(&job->creds_lock);
	return ok;
}

static void pod_load(struct pod_job *job, struct endpoint_state *ep)
{
	struct reconciler *r = job->r;
	const struct adapter_spec *s = job->s;
	const struct pod_info *p = &ep->pod;
	struct agent_addr a;
	struct agent_opts get = {.timeout = r->cfg.agent_timeout, .token = r->agent_token};
	struct agent_opts load = {.timeout = r->cfg.load_timeout, .token = r->agent_token};
	struct agent_reply rep;
	struct agent_lora held, got;
	struct lp_err err = {0};
	json_t *creds;
	char base[256];
	bool has, inplace;
	int rc;

	if (!p->ip[0]) {
		snprintf(ep->message, sizeof(ep->message), "pod has no IP address yet");
		return;
	}
	if (!p->ready) {
		/* its agent is still starting (or failing its probe): the pod's
		 * update to Ready brings us back */
		snprintf(ep->message, sizeof(ep->message), "pod is not Ready");
		return;
	}
	snprintf(a.host, sizeof(a.host), "%s", p->ip);
	a.http_port = p->http_port;
	a.admin_port = p->admin_port;
	if (holdings_observe_restarts(r->holdings, p->uid, p->restarts))
		rlog(r, "info", "pod %s/%s restarted: checking its adapters again", p->ns, p->name);

	if (!holdings_base(r->holdings, p->uid, base, sizeof(base))) {
		rc = agent_base_model(&a, &get, base, sizeof(base), &rep, &err);
		if (rc) {
			reply_message(ep, "cannot read the agent's base model", &rep, &err);
			return;
		}
		holdings_set_base(r->holdings, p->uid, base);
	}
	if (strcmp(base, s->base_model) != 0) {
		ep->failed = true;
		snprintf(ep->message, sizeof(ep->message),
		         "agent serves base model '%.100s', not '%.100s'", base, s->base_model);
		return;
	}
	if (job->verify && !holdings_verified_within(r->holdings, p->uid, r->cfg.resync / 2)) {
		json_t *loras = NULL;
		long long begin = holdings_verify_begin(r->holdings, p->uid);

		atomic_fetch_add(&r->n_verifies, 1);
		rc = agent_list(&a, &get, &loras, &rep, &err);
		if (rc) {
			reply_message(ep, "cannot list the agent's adapters", &rep, &err);
			holdings_forget_pod(r->holdings, p->uid);
			return;
		}
		holdings_set_verified(r->holdings, p->uid, loras, begin);
		json_decref(loras);
	}
	has = holdings_get(r->holdings, p->uid, s->lora_name, &held);
	if (has && wanted(s, &held)) {
		got = held;
	} else {
		inplace = job->inplace || has;
		if (!job_credentials(job, ep, &creds)) {
			ep->failed = true;
			return;
		}
		sem_acquire(r);
		rc = agent_load(&a, &load, s->lora_name, s->uri, s->sha256[0] ? s->sha256 : NULL,
		                creds, inplace, &got, &rep, &err);
		if (rc == -EEXIST && !inplace) {
			/* loaded from an older source while we were not looking */
			rc = agent_load(&a, &load, s->lora_name, s->uri,
			                s->sha256[0] ? s->sha256 : NULL, creds, true, &got, &rep,
			                &err);
		}
		sem_release(r);
		if (rc) {
			atomic_fetch_add(&r->n_loads_failed, 1);
			holdings_forget(r->holdings, p->uid, s->lora_name);
			reply_message(ep, "load failed", &rep, &err);
			return;
		}
		atomic_fetch_add(&r->n_loads_ok, 1);
		if (!wanted(s, &got)) {
			ep->failed = true;
			snprintf(ep->message, sizeof(ep->message),
			         "agent reports source '%.100s' sha256 '%.16s' after the load",
			         got.source, got.sha256);
			holdings_forget(r->holdings, p->uid, s->lora_name);
			return;
		}
		holdings_set(r->holdings, p->uid, s->lora_name, &got);
	}
	ep->loaded = true;
	ep->ready = true;
	snprintf(ep->sha256, sizeof(ep->sha256), "%s", got.sha256);
}

static void pod_unload(struct pod_job *job, struct endpoint_state *ep)
{
	struct reconciler *r = job->r;
	const struct pod_info *p = &ep->pod;
	struct agent_opts o = {.timeout = r->cfg.agent_timeout * 2, .token = r->agent_token};
	struct agent_reply rep;
	struct agent_addr a;
	struct lp_err err = {0};

	if (!p->ip[0])
		return; /* nothing can be loaded on a pod without an address */
	snprintf(a.host, sizeof(a.host), "%s", p->ip);
	a.http_port = p->http_port;
	a.admin_port = p->admin_port;
	sem_acquire(r);
	if (agent_unload(&a, &o, job->unload_name, &rep, &err)) {
		atomic_fetch_add(&r->n_unloads_failed, 1);
		reply_message(ep, "unload failed", &rep, &err);
	} else {
		atomic_fetch_add(&r->n_unloads_ok, 1);
		holdings_forget(r->holdings, p->uid, job->unload_name);
	}
	sem_release(r);
}

static void *pod_job_main(void *arg)
{
	struct pod_job *job = arg;
	size_t i;

	while ((i = atomic_fetch_add(&job->next, 1)) < job->n) {
		if (job->op == POD_LOAD)
			pod_load(job, &job->eps[i]);
		else
			pod_unload(job, &job->eps[i]);
	}
	return NULL;
}

/* Runs job over every endpoint with at most max_concurrent_loads threads
 * (the calling thread is one of them). */
static void run_pod_job(struct pod_job *job)
{
	size_t nthreads = job->n < (size_t)job->r->cfg.max_concurrent_loads
	                      ? job->n
	                      : (size_t)job->r->cfg.max_concurrent_loads;
	pthread_t th[64];
	size_t started = 0, i;

	atomic_store(&job->next, 0);
	if (nthreads > 64)
		nthreads = 64;
	for (i = 1; i < nthreads; i++) {
		if (pthread_create(&th[started], NULL, pod_job_main, job) != 0)
			break;
		started++;
	}
	pod_job_main(job);
	for (i = 0; i < started; i++)
		pthread_join(th[i], NULL);
}

static int cmp_endpoint(const void *a, const void *b)
{
	return strcmp(((const struct endpoint_state *)a)->pod.name,
	              ((const struct endpoint_state *)b)->pod.name);
}

/* The running agent pods serving s, sorted by name (caller frees). */
static struct endpoint_state *serving_pods(struct reconciler *r, const struct adapter_spec *s,
                                           size_t *n)
{
	json_t *all = kube_informer_list(r->pods), *obj;
	struct endpoint_state *eps;
	size_t i, k = 0;

	*n = 0;
	eps = calloc(json_array_size(all) ? json_array_size(all) : 1, sizeof(*eps));
	if (!eps) {
		json_decref(all);
		return NULL;
	}
	json_array_foreach(all, i, obj)
	{
		struct pod_info p;

		if (k >= MAX_PODS)
			break;
		if (pod_info_parse(obj, &p) && p.running && pod_serves(&p, s))
			eps[k++].pod = p;
	}
	json_decref(all);
	qsort(eps, k, sizeof(*eps), cmp_endpoint);
	*n = k;
	return eps;
}

/* ---- API writes ---- */

static int object_path(struct lp_buf *b, const struct kube_gvr *gvr, const char *ns,
                       const char *name, const char *sub, struct lp_err *err)
{
	lp_buf_reset(b);
	return kube_path(b, gvr, ns, name, sub, err);
}

/* The status this process last wrote for key (new reference), when it
 * is about the same object; else the cached object's. The informer's
 * copy can lag behind our own writes, and deciding events or skipping
 * writes against a stale copy would repeat them. */
static json_t *last_status(struct reconciler *r, const char *key, json_t *obj)
{
	json_t *uid = state_get(r, key, "uid"), *st = NULL;
	const char *obj_uid =
	    json_string_value(json_object_get(json_object_get(obj, "metadata"), "uid"));

	if (uid && obj_uid && strcmp(json_string_value(uid), obj_uid) == 0)
		st = state_get(r, key, "status");
	json_decref(uid);
	return st ? st : json_incref(json_object_get(obj, "status"));
}

/* Writes status unless it equals `known` (what the object is believed to
 * hold); remembers what was written. */
static int write_status(struct reconciler *r, const char *key, const struct adapter_spec *s,
                        json_t *known, json_t *status, struct lp_err *err)
{
	struct lp_buf path;
	json_t *patch;
	int rc;

	if (same_json(status, known))
		return 0;
	patch = json_pack("{s:O}", "status", status);
	lp_buf_init(&path, 2048);
	rc = object_path(&path, &KUBE_GVR_LORAADAPTERS, s->ns, s->name, "status", err);
	if (!rc && patch)
		rc = kube_patch(r->cfg.client, path.data, KUBE_PATCH_MERGE, patch, NULL, err);
	lp_buf_release(&path);
	json_decref(patch);
	if (rc == -ENOENT)
		return 0;
	if (!rc) {
		state_set(r, key, "uid", json_string(s->uid));
		state_set(r, key, "status", json_incref(status));
	}
	return rc;
}

static bool owned_by(json_t *obj, const char *uid)
{
	json_t *ref;
	size_t i;

	json_array_foreach(json_object_get(json_object_get(obj, "metadata"), "ownerReferences"), i,
	                   ref)
	{
		const char *u = json_string_value(json_object_get(ref, "uid"));

		if (u && strcmp(u, uid) == 0)
			return true;
	}
	return false;
}

static int slice_selector(char *out, size_t size, const char *svc)
{
	return snprintf(out, size,
	                "kubernetes.io/service-name=%s,"
	                "endpointslice.kubernetes.io/managed-by=" LP_MANAGED_BY,
	                svc);
}

static int ensure_service(struct reconciler *r, const struct adapter_spec *s, const char *svc,
                          json_t *want, struct lp_err *err)
{
	struct lp_buf path;
	json_t *cur = NULL, *patch = NULL;
	int rc;

	lp_buf_init(&path, 2048);
	rc = object_path(&path, &KUBE_GVR_SERVICES, s->ns, svc, NULL, err);
	if (!rc)
		rc = kube_get(r->cfg.client, path.data, &cur, err);
	if (rc == -ENOENT) {
		rc = object_path(&path, &KUBE_GVR_SERVICES, s->ns, NULL, NULL, err);
		if (!rc)
			rc = kube_create(r->cfg.client, path.data, want, NULL, err);
		if (!rc)
			rlog(r, "info", "created Service %s/%s for LoraAdapter %s", s->ns, svc,
			     s->name);
		goto out;
	}
	if (rc)
		goto out;
	if (!owned_by(cur, s->uid)) {
		rc = lp_errf(err, -EEXIST,
		             "Service '%s' exists and is not owned by LoraAdapter '%s'", svc,
		             s->name);
		goto out;
	}
	if (same_json(json_object_get(json_object_get(cur, "spec"), "ports"),
	              json_object_get(json_object_get(want, "spec"), "ports")) &&
	    same_json(json_object_get(json_object_get(cur, "metadata"), "labels"),
	              json_object_get(json_object_get(want, "metadata"), "labels")))
		goto out;
	patch = json_pack("{s:{s:O}, s:{s:O}}", "metadata", "labels",
	                  json_object_get(json_object_get(want, "metadata"), "labels"), "spec",
	                  "ports", json_object_get(json_object_get(want, "spec"), "ports"));
	rc = patch ? kube_patch(r->cfg.client, path.data, KUBE_PATCH_MERGE, patch, NULL, err)
	           : lp_errf(err, -ENOMEM, "out of memory");
out:
	json_decref(patch);
	json_decref(cur);
	lp_buf_release(&path);
	return rc;
}

/* Makes the EndpointSlices of svc exactly `want` (name -> slice). */
static int ensure_slices(struct reconciler *r, const struct adapter_spec *s, const char *svc,
                         json_t *want, struct lp_err *err)
{
	struct lp_buf path;
	json_t *items = NULL, *cur, *w;
	const char *name;
	char sel[512], *rv = NULL;
	size_t i;
	int rc;

	slice_selector(sel, sizeof(sel), svc);
	lp_buf_init(&path, 2048);
	rc = object_path(&path, &KUBE_GVR_ENDPOINTSLICES, s->ns, NULL, NULL, err);
	if (!rc)
		rc = kube_list(r->cfg.client, path.data, sel, 500, &items, &rv, err);
	if (rc)
		goto out;
	json_array_foreach(items, i, cur)
	{
		const char *cname =
		    json_string_value(json_object_get(json_object_get(cur, "metadata"), "name"));
		json_t *upd;

		if (!cname)
			continue;
		w = json_object_get(want, cname);
		rc = object_path(&path, &KUBE_GVR_ENDPOINTSLICES, s->ns, cname, NULL, err);
		if (rc)
			goto out;
		if (!w) {
			rc = kube_delete(r->cfg.client, path.data, err);
			if (rc && rc != -ENOENT)
				goto out;
			rc = 0;
			continue;
		}
		if (same_json(json_object_get(cur, "endpoints"), json_object_get(w, "endpoints")) &&
		    same_json(json_object_get(cur, "ports"), json_object_get(w, "ports")) &&
		    same_json(json_object_get(cur, "addressType"),
		              json_object_get(w, "addressType")))
			continue;
		upd = json_deep_copy(w);
		if (!upd) {
			rc = lp_errf(err, -ENOMEM, "out of memory");
			goto out;
		}
		json_object_set(
		    json_object_get(upd, "metadata"), "resourceVersion",
		    json_object_get(json_object_get(cur, "metadata"), "resourceVersion"));
		rc = kube_update(r->cfg.client, path.data, upd, NULL, err);
		json_decref(upd);
		if (rc)
			goto out;
	}
	json_object_foreach(want, name, w)
	{
		bool exists = false;

		json_array_foreach(items, i, cur)
		{
			const char *cname = json_string_value(
			    json_object_get(json_object_get(cur, "metadata"), "name"));

			if (cname && strcmp(cname, name) == 0)
				exists = true;
		}
		if (exists)
			continue;
		rc = object_path(&path, &KUBE_GVR_ENDPOINTSLICES, s->ns, NULL, NULL, err);
		if (!rc)
			rc = kube_create(r->cfg.client, path.data, w, NULL, err);
		if (rc)
			goto out;
	}
out:
	json_decref(items);
	free(rv);
	lp_buf_release(&path);
	return rc;
}

/* Deletes the Service (when ours) and every slice of it. */
static int delete_service(struct reconciler *r, const struct adapter_spec *s, const char *svc,
                          struct lp_err *err)
{
	struct lp_buf path;
	json_t *cur = NULL, *none = json_object();
	int rc;

	lp_buf_init(&path, 2048);
	rc = ensure_slices(r, s, svc, none, err);
	if (!rc)
		rc = object_path(&path, &KUBE_GVR_SERVICES, s->ns, svc, NULL, err);
	if (!rc)
		rc = kube_get(r->cfg.client, path.data, &cur, err);
	if (!rc && owned_by(cur, s->uid)) {
		rc = kube_delete(r->cfg.client, path.data, err);
		if (!rc)
			rlog(r, "info", "deleted Service %s/%s", s->ns, svc);
	}
	if (rc == -ENOENT)
		rc = 0;
	json_decref(cur);
	json_decref(none);
	lp_buf_release(&path);
	return rc;
}

static int apply_service(struct reconciler *r, const char *key, const struct adapter_spec *s,
                         const struct endpoint_state *eps, size_t n, bool verify,
                         struct lp_err *err)
{
	char svc[64];
	json_t *want_svc, *want_slices, *memo, *applied;
	char *dump;
	int rc;

	adapter_service_name(s->name, svc, sizeof(svc));
	applied = state_get(r, key, "applied");
	if (!s->service_enabled) {
		if (!applied && !verify)
			return 0;
		json_decref(applied);
		rc = delete_service(r, s, svc, err);
		if (!rc)
			state_set(r, key, "applied", NULL);
		return rc;
	}
	want_svc = adapter_service_json(s, svc);
	want_slices = adapter_slices_json(s, svc, eps, n);
	memo = json_pack("{s:O, s:O}", "service", want_svc, "slices", want_slices);
	dump = memo ? json_dumps(memo, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
	if (!want_svc || !want_slices || !dump) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto out;
	}
	rc = 0;
	if (!verify && applied && strcmp(json_string_value(applied), dump) == 0)
		goto out; /* what we last wrote; nothing changed since */
	rc = ensure_service(r, s, svc, want_svc, err);
	if (!rc)
		rc = ensure_slices(r, s, svc, want_slices, err);
	state_set(r, key, "applied", rc ? NULL : json_string(dump));
out:
	free(dump);
	json_decref(memo);
	json_decref(want_svc);
	json_decref(want_slices);
	json_decref(applied);
	return rc;
}

/* Events for what changed since the status `old`. */
static void transition_events(struct reconciler *r, json_t *obj, json_t *old,
                              const struct endpoint_state *eps, size_t n,
                              const struct adapter_condition *c)
{
	json_t *oe;
	const char *old_reason = adapter_status_reason(old);
	const char *reason = adapter_reason_name(c->reason);
	size_t i, j;

	for (i = 0; i < n; i++) {
		const struct endpoint_state *ep = &eps[i];
		json_t *prev = NULL;

		json_array_foreach(json_object_get(old, "endpoints"), j, oe)
		{
			const char *pn = json_string_value(json_object_get(oe, "podName"));

			if (pn && strcmp(pn, ep->pod.name) == 0)
				prev = oe;
		}
		if (ep->failed) {
			const char *pm = json_string_value(json_object_get(prev, "message"));

			if (!pm || strcmp(pm, ep->message) != 0)
				emit_event(r, obj, "Warning", "LoadFailed", "pod %s: %s",
				           ep->pod.name, ep->message);
		} else if (ep->ready) {
			const char *ps = json_string_value(json_object_get(prev, "sha256"));

			if (!json_is_true(json_object_get(prev, "ready")) || !ps ||
			    strcmp(ps, ep->sha256) != 0)
				emit_event(r, obj, "Normal", "Loaded",
				           "adapter ready on pod %s (sha256 %.12s)", ep->pod.name,
				           ep->sha256[0] ? ep->sha256 : "unknown");
		}
	}
	if (!old_reason || strcmp(old_reason, reason) != 0)
		emit_event(r, obj,
		           c->reason == ADAPTER_LOAD_FAILED || c->reason == ADAPTER_NO_ENDPOINTS
		               ? "Warning"
		               : "Normal",
		           reason, "%s", c->message);
}

static void now_rfc3339(char *out, size_t size)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	kube_time_format(&ts, false, out, size);
}

/* Unloads a name the resource used before (spec.modelName changed). */
static void unload_old_name(struct reconciler *r, const char *key, const struct adapter_spec *s)
{
	json_t *prev = state_get(r, key, "lora");
	const char *old = json_string_value(prev);

	if (old && strcmp(old, s->lora_name) != 0) {
		size_t n;
		struct endpoint_state *eps = serving_pods(r, s, &n);
		struct pod_job job = {
		    .r = r, .s = s, .eps = eps, .n = n, .op = POD_UNLOAD, .unload_name = old};

		if (eps) {
			rlog(r, "info",
			     "LoraAdapter %s: modelName changed from '%s' to '%s'; unloading "
			     "the old name",
			     key, old, s->lora_name);
			run_pod_job(&job);
			free(eps);
		}
	}
	state_set(r, key, "lora", json_string(s->lora_name));
	json_decref(prev);
}

static int remove_finalizer(struct reconciler *r, json_t *obj, const struct adapter_spec *s,
                            struct lp_err *err)
{
	struct lp_buf path;
	json_t *cur = json_incref(obj), *patch;
	int rc = 0, attempt;

	lp_buf_init(&path, 2048);
	rc = object_path(&path, &KUBE_GVR_LORAADAPTERS, s->ns, s->name, NULL, err);
	for (attempt = 0; !rc && attempt < 5; attempt++) {
		patch = kube_patch_remove_finalizer(cur, LP_FINALIZER);
		if (!patch)
			break; /* not there (any more) */
		rc = kube_patch(r->cfg.client, path.data, KUBE_PATCH_JSON, patch, NULL, err);
		json_decref(patch);
		if (rc == -ENOENT) {
			rc = 0;
			break;
		}
		if (rc != -EBUSY && rc != -EINVAL)
			break;
		/* the list changed under us: read it again */
		json_decref(cur);
		cur = NULL;
		rc = kube_get(r->cfg.client, path.data, &cur, err);
		if (rc == -ENOENT) {
			rc = 0;
			break;
		}
	}
	json_decref(cur);
	lp_buf_release(&path);
	return rc;
}

static int finalize(struct reconciler *r, const char *key, json_t *obj, struct adapter_spec *s)
{
	struct adapter_condition c;
	struct endpoint_state *eps;
	struct lp_err err = {0};
	json_t *status, *known;
	size_t n, i, failed = 0;
	char now[40], svc[64], first[300] = "";
	int rc, attempts;

	if (!s->has_finalizer) {
		state_drop(r, key);
		return 0;
	}
	eps = serving_pods(r, s, &n);
	if (!eps)
		return -ENOMEM;
	adapter_condition(s, eps, n, &c);
	now_rfc3339(now, sizeof(now));
	if (!s->invalid[0]) {
		struct pod_job job = {.r = r,
		                      .s = s,
		                      .eps = eps,
		                      .n = n,
		                      .op = POD_UNLOAD,
		                      .unload_name = s->lora_name};

		run_pod_job(&job);
	}
	for (i = 0; i < n; i++) {
		if (eps[i].failed && failed++ == 0)
			snprintf(first, sizeof(first), "pod %s: %.250s", eps[i].pod.name,
			         eps[i].message);
		eps[i].ready = false;
		eps[i].loaded = false;
	}
	known = last_status(r, key, obj);
	status = adapter_status_json(s, eps, n, &c, known, now);
	{
		const char *old = adapter_status_reason(known);

		if (!old || strcmp(old, "Unloading") != 0)
			emit_event(r, obj, "Normal", "Unloading", "%s", c.message);
	}
	if (status && write_status(r, key, s, known, status, &err))
		rlog(r, "warn", "LoraAdapter %s: cannot write status: %s", key, err.msg);
	json_decref(status);
	json_decref(known);
	if (failed) {
		attempts = workqueue_failures(r->queue, key) + 1;
		if (attempts < r->cfg.delete_attempts) {
			rlog(r, "warn",
			     "LoraAdapter %s: unload failed on %zu pods (attempt %d of %d): %s",
			     key, failed, attempts, r->cfg.delete_attempts, first);
			free(eps);
			return -EAGAIN;
		}
		emit_event(r, obj, "Warning", "UnloadFailed",
		           "could not unload from %zu pods after %d attempts (%s); removing the "
		           "finalizer anyway",
		           failed, attempts, first);
	}
	free(eps);
	adapter_service_name(s->name, svc, sizeof(svc));
	rc = delete_service(r, s, svc, &err);
	if (rc) {
		rlog(r, "warn", "LoraAdapter %s: cannot delete its Service: %s", key, err.msg);
		return rc;
	}
	if (!failed)
		emit_event(r, obj, "Normal", "Unloaded", "unloaded '%s' from %zu pods",
		           s->lora_name, n);
	rc = remove_finalizer(r, obj, s, &err);
	if (rc) {
		rlog(r, "warn", "LoraAdapter %s: cannot remove the finalizer: %s", key, err.msg);
		return rc;
	}
	rlog(r, "info", "LoraAdapter %s: unloaded from %zu pods, finalizer removed", key,
	     n - failed);
	state_drop(r, key);
	return 0;
}

static int reconcile_key(struct reconciler *r, const char *key, bool verify)
{
	char ns[256], name[256], now[40];
	const char *slash = strchr(key, '/');
	struct adapter_spec s;
	struct adapter_condition c;
	struct endpoint_state *eps = NULL;
	struct lp_err err = {0};
	json_t *obj, *status = NULL, *known = NULL;
	size_t n = 0, i, ready = 0;
	bool any_failed = false;
	int rc, svc_rc;

	if (!slash || (size_t)(slash - key) >= sizeof(ns))
		return 0;
	snprintf(ns, sizeof(ns), "%.*s", (int)(slash - key), key);
	snprintf(name, sizeof(name), "%s", slash + 1);
	obj = kube_informer_get(r->adapters, ns, name);
	if (!obj) {
		state_drop(r, key); /* deleted, finalizer already gone */
		return 0;
	}
	rc = adapter_spec_parse(obj, &s, &err);
	if (rc)
		goto out;
	if (s.deleting) {
		rc = finalize(r, key, obj, &s);
		goto out;
	}
	if (!s.has_finalizer) {
		json_t *patch = kube_patch_add_finalizer(obj, LP_FINALIZER), *updated = NULL;
		struct lp_buf path;

		lp_buf_init(&path, 2048);
		rc = object_path(&path, &KUBE_GVR_LORAADAPTERS, s.ns, s.name, NULL, &err);
		if (!rc && patch)
			rc = kube_patch(r->cfg.client, path.data, KUBE_PATCH_JSON, patch, &updated,
			                &err);
		lp_buf_release(&path);
		json_decref(patch);
		if (rc == -ENOENT) {
			rc = 0;
			goto out;
		}
		if (rc) {
			/* a concurrent change failed our test op: try again shortly */
			rlog(r, "info", "LoraAdapter %s: cannot add the finalizer yet: %s", key,
			     err.msg);
			rc = -EAGAIN;
			goto out;
		}
		if (updated) {
			json_decref(obj);
			obj = updated;
			rc = adapter_spec_parse(obj, &s, &err);
			if (rc)
				goto out;
		}
	}
	if (!s.invalid[0])
		unload_old_name(r, key, &s);
	eps = serving_pods(r, &s, &n);
	if (!eps) {
		rc = -ENOMEM;
		goto out;
	}
	if (!s.invalid[0] && n > 0) {
		struct pod_job job = {
		    .r = r,
		    .s = &s,
		    .eps = eps,
		    .n = n,
		    .op = POD_LOAD,
		    .verify = verify,
		    /* the spec changed since the status was written: replace in place */
		    .inplace = s.observed_generation > 0 && s.observed_generation != s.generation,
		    .creds_lock = PTHREAD_MUTEX_INITIALIZER,
		};

		run_pod_job(&job);
		json_decref(job.creds);
		pthread_mutex_destroy(&job.creds_lock);
	}
	for (i = 0; i < n; i++) {
		ready += eps[i].ready;
		any_failed |= eps[i].failed;
	}
	adapter_condition(&s, eps, n, &c);
	now_rfc3339(now, sizeof(now));
	known = last_status(r, key, obj);
	status = adapter_status_json(&s, eps, n, &c, known, now);
	if (!status) {
		rc = -ENOMEM;
		goto out;
	}
	/* routing first, so that READY in the status means traffic can flow */
	svc_rc = apply_service(r, key, &s, eps, n, verify, &err);
	if (svc_rc)
		rlog(r, "warn", "LoraAdapter %s: cannot update its Service: %s", key, err.msg);
	transition_events(r, obj, known, eps, n, &c);
	/* a verification also repairs a status someone else changed */
	rc =
	    write_status(r, key, &s, verify ? json_object_get(obj, "status") : known, status, &err);
	if (rc) {
		rlog(r, "warn", "LoraAdapter %s: cannot write status: %s", key, err.msg);
		goto out;
	}
	state_set(r, key, "total", json_integer((json_int_t)n));
	state_set(r, key, "ready", json_integer((json_int_t)ready));
	rc = svc_rc;
	if (!rc && any_failed)
		rc = -EAGAIN;
out:
	free(eps);
	json_decref(status);
	json_decref(known);
	json_decref(obj);
	return rc;
}

static void *worker_main(void *arg)
{
	struct reconciler *r = arg;
	char *key;

	/* an empty pod cache would read as "no endpoints": wait for both lists */
	while (!reconciler_synced(r))
		if (!kube_sleep(0.05, &r->stop))
			return NULL;
	while (workqueue_get(r->queue, -1, &key) == 0) {
		bool verify = take_verify(r, key);
		double t0 = kube_now_mono();
		int rc = reconcile_key(r, key, verify);

		atomic_fetch_add(&r->reconcile_us, (unsigned long)((kube_now_mono() - t0) * 1e6));
		if (rc == 0) {
			atomic_fetch_add(&r->n_ok, 1);
			workqueue_forget(r->queue, key);
		} else {
			double d;

			if (verify)
				mark_verify(r, key); /* the verification did not complete */
			d = workqueue_add_rate_limited(r->queue, key);
			atomic_fetch_add(rc == -EAGAIN ? &r->n_retry : &r->n_error, 1);
			if (rc != -EAGAIN)
				rlog(r, "warn",
				     "LoraAdapter %s: reconcile failed (%s), retrying in %.1fs",
				     key, strerror(-rc), d);
		}
		workqueue_done(r->queue, key);
		free(key);
	}
	return NULL;
}

static void *resync_main(void *arg)
{
	struct reconciler *r = arg;

	while (kube_sleep(r->cfg.resync, &r->stop)) {
		json_t *all = kube_informer_list(r->adapters), *pods = kube_informer_list(r->pods);
		json_t *live = json_object(), *obj;
		size_t i;

		json_array_foreach(pods, i, obj)
		{
			const char *uid = json_string_value(
			    json_object_get(json_object_get(obj, "metadata"), "uid"));

			if (uid)
				json_object_set_new(live, uid, json_true());
		}
		if (kube_informer_synced(r->pods))
			holdings_prune(r->holdings, live);
		json_array_foreach(all, i, obj)
		{
			char key[512];

			if (kube_object_key(obj, key, sizeof(key))) {
				mark_verify(r, key);
				workqueue_add(r->queue, key);
			}
		}
		json_decref(live);
		json_decref(pods);
		json_decref(all);
	}
	return NULL;
}

int reconciler_new(struct reconciler **out, const struct reconciler_config *cfg, struct lp_err *err)
{
	struct kube_informer_handlers ah = {on_adapter_add, on_adapter_update, on_adapter_delete,
	                                    on_informer_log, NULL};
	struct kube_informer_handlers ph = {on_pod_add, on_pod_update, on_pod_delete,
	                                    on_informer_log, NULL};
	struct kube_informer_opts ao = {0}, po = {0};
	struct workqueue_config wq = {0};
	struct reconciler *r;
	int rc;

	*out = NULL;
	r = calloc(1, sizeof(*r));
	if (!r)
		return lp_errf(err, -ENOMEM, "out of memory");
	r->cfg = *cfg;
	if (r->cfg.workers <= 0)
		r->cfg.workers = 2;
	if (r->cfg.max_concurrent_loads <= 0)
		r->cfg.max_concurrent_loads = 4;
	if (r->cfg.resync <= 0)
		r->cfg.resync = 60;
	if (r->cfg.load_timeout <= 0)
		r->cfg.load_timeout = 300;
	if (r->cfg.agent_timeout <= 0)
		r->cfg.agent_timeout = 5;
	if (r->cfg.delete_attempts <= 0)
		r->cfg.delete_attempts = 5;
	if (r->cfg.retry_max_delay <= 0)
		r->cfg.retry_max_delay = 30;
	r->ns = strdup(cfg->ns ? cfg->ns : "");
	r->agent_token = cfg->agent_token ? strdup(cfg->agent_token) : NULL;
	r->identity = strdup(cfg->identity ? cfg->identity : COMPONENT);
	r->cfg.ns = r->ns;
	r->cfg.agent_token = r->agent_token;
	r->cfg.identity = r->identity;
	r->sem_free = r->cfg.max_concurrent_loads;
	pthread_mutex_init(&r->sem_lock, NULL);
	pthread_cond_init(&r->sem_cond, NULL);
	pthread_mutex_init(&r->state_lock, NULL);
	r->state = json_object();
	r->verify = json_object();
	if (!r->ns || !r->identity || (cfg->agent_token && !r->agent_token) || !r->state ||
	    !r->verify) {
		reconciler_free(r);
		return lp_errf(err, -ENOMEM, "out of memory");
	}
	wq.base_delay = 0.5;
	wq.max_delay = r->cfg.retry_max_delay;
	rc = workqueue_new(&r->queue, &wq, err);
	if (!rc)
		rc = holdings_new(&r->holdings, err);
	ah.user = r;
	ph.user = r;
	ao.gvr = &KUBE_GVR_LORAADAPTERS;
	ao.ns = r->ns;
	ao.watch_timeout_min = cfg->watch_timeout_min;
	ao.watch_timeout_max = cfg->watch_timeout_max;
	po = ao;
	po.gvr = &KUBE_GVR_PODS;
	po.label_selector = LP_LABEL_BASE_HASH; /* only agent pods */
	if (!rc)
		rc = kube_informer_new(&r->adapters, cfg->client, &ao, &ah, err);
	if (!rc)
		rc = kube_informer_new(&r->pods, cfg->client, &po, &ph, err);
	if (rc) {
		reconciler_free(r);
		return rc;
	}
	*out = r;
	return 0;
}

int reconciler_start(struct reconciler *r, struct lp_err *err)
{
	int rc, i;

	atomic_store(&r->stop, false);
	/* workers wait until both informers have listed */
	rc = kube_informer_start(r->pods, err);
	if (!rc)
		rc = kube_informer_start(r->adapters, err);
	if (rc)
		return rc;
	r->workers = calloc((size_t)r->cfg.workers, sizeof(*r->workers));
	if (!r->workers)
		return lp_errf(err, -ENOMEM, "out of memory");
	for (i = 0; i < r->cfg.workers; i++) {
		if (pthread_create(&r->workers[i], NULL, worker_main, r) != 0)
			return lp_errf(err, -EAGAIN, "cannot start reconcile workers");
		r->nworkers++;
	}
	if (pthread_create(&r->resync_thread, NULL, resync_main, r) != 0)
		return lp_errf(err, -EAGAIN, "cannot start the resync thread");
	r->started = true;
	return 0;
}

void reconciler_stop(struct reconciler *r)
{
	int i;

	if (!r)
		return;
	atomic_store(&r->stop, true);
	kube_informer_request_stop(r->adapters);
	kube_informer_request_stop(r->pods);
	kube_informer_stop(r->adapters);
	kube_informer_stop(r->pods);
	if (r->queue)
		workqueue_shutdown(r->queue);
	for (i = 0; i < r->nworkers; i++)
		pthread_join(r->workers[i], NULL);
	r->nworkers = 0;
	if (r->started)
		pthread_join(r->resync_thread, NULL);
	r->started = false;
}

void reconciler_free(struct reconciler *r)
{
	if (!r)
		return;
	reconciler_stop(r);
	kube_informer_free(r->adapters);
	kube_informer_free(r->pods);
	workqueue_free(r->queue);
	holdings_free(r->holdings);
	json_decref(r->state);
	json_decref(r->verify);
	pthread_mutex_destroy(&r->sem_lock);
	pthread_cond_destroy(&r->sem_cond);
	pthread_mutex_destroy(&r->state_lock);
	free(r->workers);
	free(r->ns);
	free(r->agent_token);
	free(r->identity);
	free(r);
}

bool reconciler_synced(struct reconciler *r)
{
	return kube_informer_synced(r->adapters) && kube_informer_synced(r->pods);
}

/* One family of the exposition: "# HELP" and "# TYPE" lines, then every
 * sample of it, so that samples of a family stay together. */
static int family(struct lp_buf *out, struct lp_err *err, const char *name, const char *type,
                  const char *help)
{
	return lp_buf_appendf(out, err, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* The informer counters: one family per counter, one sample per informer. */
static int informer_metrics(struct reconciler *r, struct lp_buf *out, struct lp_err *err)
{
	static const struct {
		const char *name, *help;
	} fams[] = {
	    {"loraplane_operator_informer_lists_total", "Full lists made by an informer."},
	    {"loraplane_operator_informer_watches_total", "Watches started by an informer."},
	    {"loraplane_operator_informer_events_total", "Watch events an informer received."},
	    {"loraplane_operator_informer_errors_total",
	     "Failed lists and watches of an informer."},
	    {"loraplane_operator_informer_expired_total",
	     "Watches that ended with 410 Gone (a relist follows)."},
	};
	const char *res[2] = {"loraadapters", "pods"};
	struct kube_informer_stats st[2];
	size_t f, i;
	int rc = 0;

	kube_informer_stats(r->adapters, &st[0]);
	kube_informer_stats(r->pods, &st[1]);
	for (f = 0; !rc && f < sizeof(fams) / sizeof(fams[0]); f++) {
		rc = family(out, err, fams[f].name, "counter", fams[f].help);
		for (i = 0; !rc && i < 2; i++) {
			unsigned long v = f == 0   ? st[i].lists
			                  : f == 1 ? st[i].watches
			                  : f == 2 ? st[i].events
			                  : f == 3 ? st[i].errors
			                           : st[i].expired;

			rc = lp_buf_appendf(out, err, "%s{resource=\"%s\"} %lu\n", fams[f].name,
			                    res[i], v);
		}
	}
	return rc;
}

int reconciler_metrics(struct reconciler *r, struct lp_buf *out, struct lp_err *err)
{
	struct kube_client_stats ks;
	json_int_t total = 0, ready = 0;
	size_t adapters = 0;
	const char *key;
	json_t *st, *all;
	int rc;

	pthread_mutex_lock(&r->state_lock);
	json_object_foreach(r->state, key, st)
	{
		total += json_integer_value(json_object_get(st, "total"));
		ready += json_integer_value(json_object_get(st, "ready"));
	}
	pthread_mutex_unlock(&r->state_lock);
	all = kube_informer_list(r->adapters);
	adapters = json_array_size(all);
	json_decref(all);
	kube_client_stats(r->cfg.client, &ks);
	rc = lp_buf_appendf(
	    out, err,
	    "# HELP loraplane_operator_reconciles_total Reconciles of LoraAdapters by result.\n"
	    "# TYPE loraplane_operator_reconciles_total counter\n"
	    "loraplane_operator_reconciles_total{result=\"success\"} %lu\n"
	    "loraplane_operator_reconciles_total{result=\"retry\"} %lu\n"
	    "loraplane_operator_reconciles_total{result=\"error\"} %lu\n"
	    "# HELP loraplane_operator_reconcile_seconds_total Time spent reconciling, over all "
	    "workers.\n"
	    "# TYPE loraplane_operator_reconcile_seconds_total counter\n"
	    "loraplane_operator_reconcile_seconds_total %.6f\n"
	    "# HELP loraplane_operator_agent_loads_total POST /v1/loras calls by result.\n"
	    "# TYPE loraplane_operator_agent_loads_total counter\n"
	    "loraplane_operator_agent_loads_total{result=\"success\"} %lu\n"
	    "loraplane_operator_agent_loads_total{result=\"failure\"} %lu\n"
	    "# HELP loraplane_operator_agent_unloads_total DELETE /v1/loras calls by result.\n"
	    "# TYPE loraplane_operator_agent_unloads_total counter\n"
	    "loraplane_operator_agent_unloads_total{result=\"success\"} %lu\n"
	    "loraplane_operator_agent_unloads_total{result=\"failure\"} %lu\n"
	    "# HELP loraplane_operator_agent_verifications_total GET /v1/loras checks.\n"
	    "# TYPE loraplane_operator_agent_verifications_total counter\n"
	    "loraplane_operator_agent_verifications_total %lu\n"
	    "# HELP loraplane_operator_events_total Kubernetes Events emitted.\n"
	    "# TYPE loraplane_operator_events_total counter\n"
	    "loraplane_operator_events_total %lu\n"
	    "# HELP loraplane_operator_workqueue_depth Keys waiting (ready and delayed).\n"
	    "# TYPE loraplane_operator_workqueue_depth gauge\n"
	    "loraplane_operator_workqueue_depth %zu\n"
	    "# HELP loraplane_operator_adapters LoraAdapter resources in the informer's cache.\n"
	    "# TYPE loraplane_operator_adapters gauge\n"
	    "loraplane_operator_adapters %zu\n"
	    "# HELP loraplane_operator_endpoints Agent pods over all adapters (TOTAL, READY).\n"
	    "# TYPE loraplane_operator_endpoints gauge\n"
	    "loraplane_operator_endpoints{state=\"total\"} %lld\n"
	    "loraplane_operator_endpoints{state=\"ready\"} %lld\n"
	    "# HELP loraplane_operator_known_pods Agent pods whose loaded adapters the operator "
	    "remembers.\n"
	    "# TYPE loraplane_operator_known_pods gauge\n"
	    "loraplane_operator_known_pods %zu\n"
	    "# HELP loraplane_operator_kube_requests_total API server requests by outcome.\n"
	    "# TYPE loraplane_operator_kube_requests_total counter\n"
	    "loraplane_operator_kube_requests_total{class=\"2xx\"} %lu\n"
	    "loraplane_operator_kube_requests_total{class=\"4xx\"} %lu\n"
	    "loraplane_operator_kube_requests_total{class=\"5xx\"} %lu\n"
	    "loraplane_operator_kube_requests_total{class=\"transport\"} %lu\n",
	    atomic_load(&r->n_ok), atomic_load(&r->n_retry), atomic_load(&r->n_error),
	    (double)atomic_load(&r->reconcile_us) / 1e6, atomic_load(&r->n_loads_ok),
	    atomic_load(&r->n_loads_failed), atomic_load(&r->n_unloads_ok),
	    atomic_load(&r->n_unloads_failed), atomic_load(&r->n_verifies),
	    atomic_load(&r->n_events), workqueue_len(r->queue) + workqueue_delayed(r->queue),
	    adapters, (long long)total, (long long)ready, holdings_pods(r->holdings), ks.ok,
	    ks.client_errors, ks.server_errors, ks.transport_errors);
	if (!rc)
		rc = informer_metrics(r, out, err);
	return rc;
}
