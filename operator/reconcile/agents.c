/* Agent HTTP client; see agents.h. */
#include "operator/reconcile/agents.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>

#include "common/buf.h"
#include "operator/kube/encoding.h"

#define AGENT_BODY_MAX (4u << 20)

struct sink {
	struct lp_buf body;
	bool too_big;
};

static size_t on_write(char *ptr, size_t size, size_t nmemb, void *userp)
{
	struct sink *s = userp;

	if (lp_buf_append(&s->body, ptr, size * nmemb, NULL)) {
		s->too_big = true;
		return 0;
	}
	return size * nmemb;
}

/* The human part of an error body: {"error": {"message"}} (OpenAI
 * shape), {"message"}, or the text itself. */
static void error_message(const char *body, size_t len, char *out, size_t size)
{
	json_t *root = body && len ? json_loadb(body, len, 0, NULL) : NULL;
	const char *msg = NULL;
	size_t i, n;

	out[0] = '\0';
	if (root) {
		json_t *e = json_object_get(root, "error");

		msg = json_string_value(json_object_get(e, "message"));
		if (!msg)
			msg = json_string_value(e);
		if (!msg)
			msg = json_string_value(json_object_get(root, "message"));
	}
	if (msg) {
		snprintf(out, size, "%s", msg);
	} else if (body) {
		n = len < size - 1 ? len : size - 1;
		memcpy(out, body, n);
		out[n] = '\0';
	}
	for (i = 0; out[i]; i++)
		if (out[i] == '\n' || out[i] == '\r')
			out[i] = ' ';
	json_decref(root);
}

/* Kept curl handles, one per agent port, so that the next call to the same
 * agent reuses its open connection (the agents keep connections alive):
 * at 200 adapters on 20 pods that is 20 connections, not 4000. A handle is
 * lent to one call at a time; a second concurrent call to the same port,
 * or one when every slot is lent, uses a handle of its own, closed after
 * the call. The least recently used idle handle makes room for a new
 * port. A connection the agent has closed (restart) is noticed by curl,
 * which connects again. */
#define POOL_SLOTS 256

struct pool_slot {
	char key[96]; /* host:port; "" when free */
	CURL *h;
	bool lent;
	uint64_t stamp;
};

static struct {
	pthread_mutex_t mu;
	struct pool_slot slots[POOL_SLOTS];
	uint64_t clock;
} pool = {PTHREAD_MUTEX_INITIALIZER, {{"", NULL, false, 0}}, 0};

/* A handle for key, with no options set, and the slot it belongs to (-1:
 * a handle of its own). */
static CURL *pool_get(const char *key, int *slot)
{
	int found = -1, victim = -1;

	*slot = -1;
	pthread_mutex_lock(&pool.mu);
	for (int i = 0; i < POOL_SLOTS; i++) {
		struct pool_slot *e = &pool.slots[i];
		if (e->h && strcmp(e->key, key) == 0) {
			found = e->lent ? -2 : i;
			break;
		}
		if (!e->lent && (victim < 0 || !e->h ||
		                 (pool.slots[victim].h && e->stamp < pool.slots[victim].stamp)))
			victim = i;
	}
	if (found == -2 || (found < 0 && victim < 0)) {
		pthread_mutex_unlock(&pool.mu);
		return curl_easy_init();
	}
	if (found < 0) {
		struct pool_slot *e = &pool.slots[victim];
		if (e->h)
			curl_easy_cleanup(e->h); /* closes its connection */
		e->h = curl_easy_init();
		snprintf(e->key, sizeof(e->key), "%s", key);
		found = victim;
		if (!e->h) {
			e->key[0] = '\0';
			pthread_mutex_unlock(&pool.mu);
			return NULL;
		}
	}
	pool.slots[found].lent = true;
	pool.slots[found].stamp = ++pool.clock;
	*slot = found;
	pthread_mutex_unlock(&pool.mu);
	return pool.slots[found].h;
}

static void pool_put(CURL *h, int slot)
{
	if (slot < 0) {
		curl_easy_cleanup(h);
		return;
	}
	/* forget the call's options (they point at its stack); the connection
	 * stays open */
	curl_easy_reset(h);
	pthread_mutex_lock(&pool.mu);
	pool.slots[slot].lent = false;
	pthread_mutex_unlock(&pool.mu);
}

void agent_client_cleanup(void)
{
	pthread_mutex_lock(&pool.mu);
	for (int i = 0; i < POOL_SLOTS; i++) {
		struct pool_slot *e = &pool.slots[i];
		if (e->h && !e->lent) {
			curl_easy_cleanup(e->h);
			e->h = NULL;
			e->key[0] = '\0';
		}
	}
	pthread_mutex_unlock(&pool.mu);
}

/* One request; 0 when an answer arrived (any status) with *body holding
 * it (caller releases); else the transport errno. */
static int call(const struct agent_addr *a, const struct agent_opts *o, bool admin,
                const char *method, const char *path, const char *body, struct sink *s,
                struct agent_reply *r, struct lp_err *err)
{
	char url[2048], errbuf[CURL_ERROR_SIZE] = "", auth[1100];
	struct curl_slist *hdrs = NULL;
	int port = admin ? a->admin_port : a->http_port;
	char key[96];
	CURLcode cc;
	CURL *h;
	int rc = 0, slot;

	memset(r, 0, sizeof(*r));
	lp_buf_init(&s->body, AGENT_BODY_MAX);
	s->too_big = false;
	snprintf(url, sizeof(url), strchr(a->host, ':') ? "http://[%s]:%d%s" : "http://%s:%d%s",
	         a->host, port, path);
	snprintf(key, sizeof(key), "%s:%d", a->host, port);
	h = pool_get(key, &slot);
	if (!h)
		return lp_errf(err, -ENOMEM, "cannot create a curl handle");
	hdrs = curl_slist_append(hdrs, "Accept: application/json");
	if (body)
		hdrs = curl_slist_append(hdrs, "Content-Type: application/json");
	if (admin && o->token && *o->token) {
		snprintf(auth, sizeof(auth), "Authorization: Bearer %.1000s", o->token);
		hdrs = curl_slist_append(hdrs, auth);
	}
	curl_easy_setopt(h, CURLOPT_URL, url);
	curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
	if (body) {
		curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
		curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)strlen(body));
	}
	curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
	curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS,
	                 (long)((o->connect_timeout > 0 ? o->connect_timeout : 2.0) * 1000));
	curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)((o->timeout > 0 ? o->timeout : 30) * 1000));
	curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
	curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_write);
	curl_easy_setopt(h, CURLOPT_WRITEDATA, s);
	cc = curl_easy_perform(h);
	if (cc == CURLE_OK) {
		curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &r->http_status);
	} else if (s->too_big) {
		rc = lp_errf(err, -E2BIG, "%s %s: reply larger than %u bytes", method, url,
		             AGENT_BODY_MAX);
	} else {
		rc = lp_errf(err,
		             cc == CURLE_OPERATION_TIMEDOUT ? -ETIMEDOUT
		             : cc == CURLE_COULDNT_CONNECT  ? -ECONNREFUSED
		                                            : -EIO,
		             "%s %s: %s", method, url, errbuf[0] ? errbuf : curl_easy_strerror(cc));
		snprintf(r->message, sizeof(r->message), "%s",
		         cc == CURLE_OPERATION_TIMEDOUT ? "timed out"
		         : errbuf[0]                    ? errbuf
		                                        : curl_easy_strerror(cc));
	}
	curl_slist_free_all(hdrs);
	pool_put(h, slot);
	if (rc)
		lp_buf_release(&s->body);
	return rc;
}

static int http_error(const char *what, struct sink *s, struct agent_reply *r, struct lp_err *err)
{
	error_message(s->body.data, s->body.len, r->message, sizeof(r->message));
	return lp_errf(err, r->http_status == 409 ? -EEXIST : -EIO, "%s: %ld %s", what,
	               r->http_status, r->message);
}

int agent_base_model(const struct agent_addr *a, const struct agent_opts *o, char *base,
                     size_t size, struct agent_reply *r, struct lp_err *err)
{
	struct sink s;
	json_t *root = NULL, *m;
	size_t i;
	int rc;

	base[0] = '\0';
	/* on the admin port, with the admin token: the public port may want an
	 * API key the operator does not have */
	rc = call(a, o, true, "GET", "/v1/models", NULL, &s, r, err);
	if (rc)
		return rc;
	if (r->http_status != 200) {
		rc = http_error("GET /v1/models", &s, r, err);
		goto out;
	}
	root = json_loadb(s.body.data ? s.body.data : "", s.body.len, 0, NULL);
	json_array_foreach(json_object_get(root, "data"), i, m)
	{
		json_t *parent = json_object_get(m, "parent");
		const char *id = json_string_value(json_object_get(m, "id"));

		if (id && (!parent || json_is_null(parent))) {
			snprintf(base, size, "%s", id);
			break;
		}
	}
	if (!base[0]) {
		snprintf(r->message, sizeof(r->message), "no base model in GET /v1/models");
		rc = lp_errf(err, -EBADMSG, "GET /v1/models: no entry with a null parent");
	}
out:
	json_decref(root);
	lp_buf_release(&s.body);
	return rc;
}

bool agent_lora_from_json(json_t *entry, struct agent_lora *out)
{
	json_t *src = json_object_get(entry, "source");
	const char *uri = json_is_object(src) ? json_string_value(json_object_get(src, "uri"))
	                                      : json_string_value(src);
	const char *sha = json_string_value(json_object_get(entry, "sha256"));
	size_t i;

	memset(out, 0, sizeof(*out));
	if (!sha && json_is_object(src))
		sha = json_string_value(json_object_get(src, "sha256"));
	if (!uri)
		return false;
	snprintf(out->source, sizeof(out->source), "%s", uri);
	snprintf(out->sha256, sizeof(out->sha256), "%s", sha ? sha : "");
	for (i = 0; out->sha256[i]; i++)
		if (out->sha256[i] >= 'A' && out->sha256[i] <= 'F')
			out->sha256[i] = (char)(out->sha256[i] | 0x20);
	return true;
}

int agent_load(const struct agent_addr *a, const struct agent_opts *o, const char *name,
               const char *uri, const char *sha256, json_t *creds, bool inplace,
               struct agent_lora *out, struct agent_reply *r, struct lp_err *err)
{
	json_t *req = json_pack("{s:s, s:{s:s}}", "lora_name", name, "source", "uri", uri), *root;
	char *body;
	struct sink s;
	int rc;

	memset(out, 0, sizeof(*out));
	if (!req)
		return lp_errf(err, -ENOMEM, "out of memory");
	if (sha256 && *sha256)
		json_object_set_new(json_object_get(req, "source"), "sha256", json_string(sha256));
	if (creds)
		json_object_set(json_object_get(req, "source"), "credentials", creds);
	if (inplace)
		json_object_set_new(req, "load_inplace", json_true());
	body = json_dumps(req, JSON_COMPACT);
	json_decref(req);
	if (!body)
		return lp_errf(err, -ENOMEM, "out of memory");
	rc = call(a, o, true, "POST", "/v1/loras", body, &s, r, err);
	explicit_bzero(body, strlen(body)); /* it may hold credentials */
	free(body);
	if (rc)
		return rc;
	if (r->http_status != 200 && r->http_status != 201) {
		rc = http_error("POST /v1/loras", &s, r, err);
		goto out;
	}
	root = json_loadb(s.body.data ? s.body.data : "", s.body.len, 0, NULL);
	if (!agent_lora_from_json(root, out)) {
		/* an agent that answers success without details: trust the request */
		snprintf(out->source, sizeof(out->source), "%s", uri);
		snprintf(out->sha256, sizeof(out->sha256), "%s", sha256 ? sha256 : "");
	}
	json_decref(root);
out:
	lp_buf_release(&s.body);
	return rc;
}

int agent_list(const struct agent_addr *a, const struct agent_opts *o, json_t **loras,
               struct agent_reply *r, struct lp_err *err)
{
	json_t *root, *l;
	struct sink s;
	int rc;

	*loras = NULL;
	rc = call(a, o, true, "GET", "/v1/loras", NULL, &s, r, err);
	if (rc)
		return rc;
	if (r->http_status != 200) {
		rc = http_error("GET /v1/loras", &s, r, err);
		goto out;
	}
	root = json_loadb(s.body.data ? s.body.data : "", s.body.len, 0, NULL);
	l = json_object_get(root, "loras");
	if (!json_is_object(l)) {
		snprintf(r->message, sizeof(r->message), "GET /v1/loras without a 'loras' object");
		rc = lp_errf(err, -EBADMSG, "GET /v1/loras: no 'loras' object in the reply");
	} else {
		*loras = json_incref(l);
	}
	json_decref(root);
out:
	lp_buf_release(&s.body);
	return rc;
}

int agent_unload(const struct agent_addr *a, const struct agent_opts *o, const char *name,
                 struct agent_reply *r, struct lp_err *err)
{
	struct lp_buf path;
	struct sink s;
	int rc;

	lp_buf_init(&path, 1024);
	rc = lp_buf_appendf(&path, err, "/v1/loras/");
	if (!rc)
		rc = kube_percent_encode(&path, name, false, err);
	if (!rc)
		rc = call(a, o, true, "DELETE", path.data, NULL, &s, r, err);
	lp_buf_release(&path);
	if (rc)
		return rc;
	if (r->http_status != 200 && r->http_status != 404 && r->http_status != 204)
		rc = http_error("DELETE /v1/loras", &s, r, err);
	lp_buf_release(&s.body);
	return rc;
}
