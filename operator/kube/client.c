/* Kubernetes REST client; see client.h. */
#include "operator/kube/client.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>

#include "operator/kube/encoding.h"

#define POOL_MAX           8
#define TOKEN_REREAD_S     60.0
#define CONNECT_TIMEOUT_MS 5000L
#define REQUEST_TIMEOUT_S  30L

const struct kube_gvr KUBE_GVR_PODS = {"", "v1", "pods", "Pod"};
const struct kube_gvr KUBE_GVR_SERVICES = {"", "v1", "services", "Service"};
const struct kube_gvr KUBE_GVR_EVENTS = {"", "v1", "events", "Event"};
const struct kube_gvr KUBE_GVR_SECRETS = {"", "v1", "secrets", "Secret"};
const struct kube_gvr KUBE_GVR_ENDPOINTSLICES = {"discovery.k8s.io", "v1", "endpointslices",
                                                 "EndpointSlice"};
const struct kube_gvr KUBE_GVR_LEASES = {"coordination.k8s.io", "v1", "leases", "Lease"};
const struct kube_gvr KUBE_GVR_LORAADAPTERS = {"loraplane.io", "v1alpha1", "loraadapters",
                                               "LoraAdapter"};

struct kube_client {
	struct kube_config cfg;
	pthread_mutex_t lock; /* guards token, token_read_at, pool */
	char *token;
	double token_read_at;
	CURL *pool[POOL_MAX];
	int npool;
	atomic_ulong n_ok, n_client, n_server, n_transport, n_token;
};

/* State of one transfer, shared with the curl callbacks. */
struct transfer {
	CURL *h;
	struct kube_response *resp;
	kube_stream_fn on_data;
	void *user;
	const atomic_bool *stop;
	bool too_big;
	bool cancelled;
};

static int reload_token(struct kube_client *c, struct lp_err *err)
{
	struct lp_buf b;
	int rc;

	lp_buf_init(&b, 1 << 20);
	rc = lp_buf_read_file(&b, c->cfg.token_file, 1 << 20, err);
	if (rc) {
		lp_buf_release(&b);
		return rc;
	}
	while (b.len > 0 &&
	       (b.data[b.len - 1] == '\n' || b.data[b.len - 1] == '\r' || b.data[b.len - 1] == ' '))
		b.data[--b.len] = '\0';
	free(c->token);
	c->token = lp_buf_detach(&b, NULL);
	c->token_read_at = kube_now_mono();
	atomic_fetch_add(&c->n_token, 1);
	return 0;
}

/* A copy of the bearer token to send (NULL for none), re-read from the
 * token file when older than a minute or when force is set. A failed
 * re-read keeps the previous token. */
static int current_token(struct kube_client *c, bool force, char **out, struct lp_err *err)
{
	int rc = 0;

	*out = NULL;
	pthread_mutex_lock(&c->lock);
	if (c->cfg.token_file &&
	    (force || !c->token || kube_now_mono() - c->token_read_at >= TOKEN_REREAD_S)) {
		rc = reload_token(c, err);
		if (rc && c->token)
			rc = 0;
	}
	if (!rc && c->token) {
		*out = strdup(c->token);
		if (!*out)
			rc = lp_errf(err, -ENOMEM, "out of memory");
	}
	pthread_mutex_unlock(&c->lock);
	return rc;
}

int kube_client_new(struct kube_client **out, struct kube_config *cfg, struct lp_err *err)
{
	struct kube_client *c;
	int rc;

	*out = NULL;
	c = calloc(1, sizeof(*c));
	if (!c)
		return lp_errf(err, -ENOMEM, "out of memory");
	c->cfg = *cfg;
	memset(cfg, 0, sizeof(*cfg));
	pthread_mutex_init(&c->lock, NULL);
	if (c->cfg.token && !c->cfg.token_file) {
		c->token = strdup(c->cfg.token);
		if (!c->token) {
			kube_client_free(c);
			return lp_errf(err, -ENOMEM, "out of memory");
		}
	}
	if (c->cfg.token_file && !c->cfg.token) {
		rc = reload_token(c, err);
		if (rc) {
			kube_client_free(c);
			return lp_err_prefix(err, "token file");
		}
	} else if (c->cfg.token_file) {
		/* in-cluster: the token was read once already */
		c->token = c->cfg.token;
		c->cfg.token = NULL;
		c->token_read_at = kube_now_mono();
	}
	*out = c;
	return 0;
}

void kube_client_free(struct kube_client *c)
{
	int i;

	if (!c)
		return;
	for (i = 0; i < c->npool; i++)
		curl_easy_cleanup(c->pool[i]);
	free(c->token);
	kube_config_release(&c->cfg);
	pthread_mutex_destroy(&c->lock);
	free(c);
}

const struct kube_config *kube_client_config(const struct kube_client *c)
{
	return &c->cfg;
}

void kube_client_stats(struct kube_client *c, struct kube_client_stats *out)
{
	out->ok = atomic_load(&c->n_ok);
	out->client_errors = atomic_load(&c->n_client);
	out->server_errors = atomic_load(&c->n_server);
	out->transport_errors = atomic_load(&c->n_transport);
	out->token_reloads = atomic_load(&c->n_token);
}

void kube_response_init(struct kube_response *r)
{
	memset(r, 0, sizeof(*r));
	lp_buf_init(&r->body, KUBE_BODY_MAX);
}

void kube_response_release(struct kube_response *r)
{
	lp_buf_release(&r->body);
	memset(&r->status, 0, sizeof(r->status));
	r->http_status = 0;
}

static CURL *pool_take(struct kube_client *c)
{
	CURL *h = NULL;

	pthread_mutex_lock(&c->lock);
	if (c->npool > 0)
		h = c->pool[--c->npool];
	pthread_mutex_unlock(&c->lock);
	return h ? h : curl_easy_init();
}

static void pool_give(struct kube_client *c, CURL *h)
{
	curl_easy_reset(h); /* keeps the connection cache */
	pthread_mutex_lock(&c->lock);
	if (c->npool < POOL_MAX) {
		c->pool[c->npool++] = h;
		h = NULL;
	}
	pthread_mutex_unlock(&c->lock);
	if (h)
		curl_easy_cleanup(h);
}

static size_t on_write(char *ptr, size_t size, size_t nmemb, void *userp)
{
	struct transfer *t = userp;
	size_t n = size * nmemb;
	long code = 0;

	curl_easy_getinfo(t->h, CURLINFO_RESPONSE_CODE, &code);
	if (t->on_data && code >= 200 && code < 300) {
		if (t->on_data(t->user, ptr, n)) {
			t->cancelled = true;
			return 0;
		}
		return n;
	}
	if (lp_buf_append(&t->resp->body, ptr, n, NULL)) {
		t->too_big = true;
		return 0;
	}
	return n;
}

static int on_progress(void *userp, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal,
                       curl_off_t ulnow)
{
	struct transfer *t = userp;

	if (t->stop && atomic_load(t->stop)) {
		t->cancelled = true;
		return 1;
	}
	return 0;
}

int kube_http_errno(long http, const char *reason)
{
	if (http >= 200 && http < 300)
		return 0;
	switch (http) {
	case 400:
		return -EBADMSG;
	case 401:
		return -EACCES;
	case 403:
		return -EPERM;
	case 404:
		return -ENOENT;
	case 405:
		return -ENOTSUP;
	case 409:
		return reason && strcmp(reason, "AlreadyExists") == 0 ? -EEXIST : -EBUSY;
	case 410:
		return -ESTALE;
	case 413:
		return -E2BIG;
	case 415:
		return -EPROTO;
	case 422:
		return -EINVAL;
	case 429:
		return -EAGAIN;
	default:
		return http >= 500 ? -EIO : -EPROTO;
	}
}

static void copy_text(char *dst, size_t size, const char *src, size_t len)
{
	size_t i, n = len < size - 1 ? len : size - 1;

	for (i = 0; i < n; i++) {
		char ch = src[i];

		dst[i] = (ch == '\n' || ch == '\r' || ch == '\t') ? ' ' : ch;
	}
	while (n > 0 && dst[n - 1] == ' ')
		n--;
	dst[n] = '\0';
}

void kube_status_parse(const char *body, size_t len, long http, struct kube_status *st)
{
	json_t *root;
	json_error_t jerr;

	memset(st, 0, sizeof(*st));
	st->code = http;
	if (!body || !len)
		return;
	root = json_loadb(body, len, 0, &jerr);
	if (json_is_object(root)) {
		json_t *code = json_object_get(root, "code");
		const char *reason = json_string_value(json_object_get(root, "reason"));
		const char *msg = json_string_value(json_object_get(root, "message"));

		if (json_is_integer(code) && json_integer_value(code) > 0)
			st->code = (long)json_integer_value(code);
		if (reason)
			copy_text(st->reason, sizeof(st->reason), reason, strlen(reason));
		if (msg)
			copy_text(st->message, sizeof(st->message), msg, strlen(msg));
	} else {
		copy_text(st->message, sizeof(st->message), body, len);
	}
	json_decref(root);
}

static int transport_errno(CURLcode cc)
{
	switch (cc) {
	case CURLE_COULDNT_CONNECT:
	case CURLE_COULDNT_RESOLVE_HOST:
		return -ECONNREFUSED;
	case CURLE_OPERATION_TIMEDOUT:
		return -ETIMEDOUT;
	case CURLE_ABORTED_BY_CALLBACK:
		return -ECANCELED;
	default:
		return -EIO;
	}
}

static void set_blob(CURL *h, CURLoption opt, unsigned char *data, size_t len)
{
	struct curl_blob blob = {.data = data, .len = len, .flags = CURL_BLOB_COPY};

	curl_easy_setopt(h, opt, &blob);
}

/* One attempt. Returns 0 when a response arrived (any status), else the
 * transport errno with err set. */
static int attempt(struct kube_client *c, CURL *h, const char *method, const char *path,
                   const char *content_type, const char *body, long timeout_s, bool force_token,
                   struct transfer *t, struct lp_err *err)
{
	struct curl_slist *hdrs = NULL;
	char errbuf[CURL_ERROR_SIZE] = "";
	char *token = NULL, *auth = NULL, ctype[128];
	struct lp_buf url;
	size_t n;
	CURLcode cc;
	int rc;

	lp_buf_init(&url, 16384);
	rc = lp_buf_appendf(&url, err, "%s%s", c->cfg.server, path);
	if (rc)
		goto out;
	rc = current_token(c, force_token, &token, err);
	if (rc)
		goto out;
	hdrs = curl_slist_append(hdrs, "Accept: application/json");
	hdrs = curl_slist_append(hdrs, "User-Agent: loraplane-operator");
	if (content_type) {
		snprintf(ctype, sizeof(ctype), "Content-Type: %s", content_type);
		hdrs = curl_slist_append(hdrs, ctype);
	}
	if (token && *token) {
		n = strlen(token) + 32;
		auth = malloc(n);
		if (!auth) {
			rc = lp_errf(err, -ENOMEM, "out of memory");
			goto out;
		}
		snprintf(auth, n, "Authorization: Bearer %s", token);
		hdrs = curl_slist_append(hdrs, auth);
	}
	curl_easy_setopt(h, CURLOPT_URL, url.data);
	curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
	if (strcmp(method, "HEAD") == 0)
		curl_easy_setopt(h, CURLOPT_NOBODY, 1L);
	if (body) {
		curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
		curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)strlen(body));
	}
	curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
	curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, CONNECT_TIMEOUT_MS);
	curl_easy_setopt(h, CURLOPT_TIMEOUT, timeout_s);
	curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
	curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_write);
	curl_easy_setopt(h, CURLOPT_WRITEDATA, t);
	curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, on_progress);
	curl_easy_setopt(h, CURLOPT_XFERINFODATA, t);
	curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
	curl_easy_setopt(h, CURLOPT_TCP_KEEPALIVE, 1L);
	curl_easy_setopt(h, CURLOPT_ACCEPT_ENCODING, "");
	if (c->cfg.insecure) {
		curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, 0L);
		curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, 0L);
	}
	if (c->cfg.ca_file)
		curl_easy_setopt(h, CURLOPT_CAINFO, c->cfg.ca_file);
	if (c->cfg.ca_data)
		set_blob(h, CURLOPT_CAINFO_BLOB, c->cfg.ca_data, c->cfg.ca_data_len);
	if (c->cfg.cert_file)
		curl_easy_setopt(h, CURLOPT_SSLCERT, c->cfg.cert_file);
	if (c->cfg.cert_data)
		set_blob(h, CURLOPT_SSLCERT_BLOB, c->cfg.cert_data, c->cfg.cert_data_len);
	if (c->cfg.key_file)
		curl_easy_setopt(h, CURLOPT_SSLKEY, c->cfg.key_file);
	if (c->cfg.key_data)
		set_blob(h, CURLOPT_SSLKEY_BLOB, c->cfg.key_data, c->cfg.key_data_len);

	lp_buf_reset(&t->resp->body);
	t->resp->http_status = 0;
	t->too_big = false;
	t->cancelled = false;
	cc = curl_easy_perform(h);
	curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &t->resp->http_status);
	if (t->cancelled) {
		rc = lp_errf(err, -ECANCELED, "%s %.200s: cancelled", method, path);
	} else if (t->too_big) {
		rc = lp_errf(err, -E2BIG, "%s %.200s: response body larger than %u bytes", method,
		             path, KUBE_BODY_MAX);
	} else if (cc != CURLE_OK) {
		rc = lp_errf(err, transport_errno(cc), "%s %.200s: %s", method, path,
		             errbuf[0] ? errbuf : curl_easy_strerror(cc));
	}
	if (rc)
		atomic_fetch_add(&c->n_transport, 1);
out:
	curl_slist_free_all(hdrs);
	if (auth) {
		memset(auth, 0, strlen(auth));
		free(auth);
	}
	free(token);
	lp_buf_release(&url);
	return rc;
}

static int do_request(struct kube_client *c, const char *method, const char *path,
                      const char *content_type, const char *body, long timeout_s,
                      kube_stream_fn on_data, void *user, const atomic_bool *stop,
                      struct kube_response *resp, struct lp_err *err)
{
	struct transfer t = {.resp = resp, .on_data = on_data, .user = user, .stop = stop};
	long code;
	int rc;

	t.h = pool_take(c);
	if (!t.h)
		return lp_errf(err, -ENOMEM, "cannot create a curl handle");
	rc = attempt(c, t.h, method, path, content_type, body, timeout_s, false, &t, err);
	if (!rc && resp->http_status == 401 && c->cfg.token_file) {
		/* the service-account token may have rotated */
		curl_easy_reset(t.h);
		rc = attempt(c, t.h, method, path, content_type, body, timeout_s, true, &t, err);
	}
	pool_give(c, t.h);
	if (rc)
		return rc;
	code = resp->http_status;
	if (code >= 200 && code < 300) {
		atomic_fetch_add(&c->n_ok, 1);
		return 0;
	}
	atomic_fetch_add(code >= 500 ? &c->n_server : &c->n_client, 1);
	kube_status_parse(resp->body.data, resp->body.len, code, &resp->status);
	return lp_errf(err, kube_http_errno(code, resp->status.reason), "%s %.200s: %ld %s%s%s",
	               method, path, code, resp->status.reason[0] ? resp->status.reason : "",
	               resp->status.reason[0] && resp->status.message[0] ? ": " : "",
	               resp->status.message);
}

int kube_request(struct kube_client *c, const char *method, const char *path,
                 const char *content_type, const char *body, struct kube_response *resp,
                 struct lp_err *err)
{
	return do_request(c, method, path, content_type, body, REQUEST_TIMEOUT_S, NULL, NULL, NULL,
	                  resp, err);
}

int kube_stream(struct kube_client *c, const char *path, long timeout_s, kube_stream_fn on_data,
                void *user, const atomic_bool *stop, struct kube_response *resp, struct lp_err *err)
{
	return do_request(c, "GET", path, NULL, NULL, timeout_s, on_data, user, stop, resp, err);
}

int kube_path(struct lp_buf *b, const struct kube_gvr *gvr, const char *ns, const char *name,
              const char *sub, struct lp_err *err)
{
	int rc;

	if (gvr->group[0])
		rc = lp_buf_appendf(b, err, "/apis/%s/%s", gvr->group, gvr->version);
	else
		rc = lp_buf_appendf(b, err, "/api/%s", gvr->version);
	if (!rc && ns && *ns) {
		rc = lp_buf_appendf(b, err, "/namespaces/");
		if (!rc)
			rc = kube_percent_encode(b, ns, false, err);
	}
	if (!rc)
		rc = lp_buf_appendf(b, err, "/%s", gvr->plural);
	if (!rc && name) {
		rc = lp_buf_append(b, "/", 1, err);
		if (!rc)
			rc = kube_percent_encode(b, name, false, err);
		if (!rc && sub)
			rc = lp_buf_appendf(b, err, "/%s", sub);
	}
	return rc;
}

static int decode_body(struct kube_response *resp, const char *what, json_t **out,
                       struct lp_err *err)
{
	json_error_t jerr;

	if (!out)
		return 0;
	*out = json_loadb(resp->body.data ? resp->body.data : "", resp->body.len, 0, &jerr);
	if (!*out)
		return lp_errf(err, -EBADMSG, "%.200s: invalid JSON in the response: %s", what,
		               jerr.text);
	return 0;
}

int kube_call_json(struct kube_client *c, const char *method, const char *path,
                   const char *content_type, json_t *obj, double timeout_s, json_t **out,
                   struct lp_err *err)
{
	long t = timeout_s > 0 ? (long)(timeout_s + 0.999) : REQUEST_TIMEOUT_S;
	struct kube_response resp;
	char *body = NULL;
	int rc;

	if (out)
		*out = NULL;
	if (obj) {
		body = json_dumps(obj, JSON_COMPACT);
		if (!body)
			return lp_errf(err, -ENOMEM, "cannot encode the request body");
	}
	kube_response_init(&resp);
	rc = do_request(c, method, path, content_type, body, t, NULL, NULL, NULL, &resp, err);
	if (!rc)
		rc = decode_body(&resp, path, out, err);
	kube_response_release(&resp);
	free(body);
	return rc;
}

static int json_call(struct kube_client *c, const char *method, const char *path,
                     const char *content_type, json_t *obj, json_t **out, struct lp_err *err)
{
	return kube_call_json(c, method, path, content_type, obj, 0, out, err);
}

int kube_get(struct kube_client *c, const char *path, json_t **out, struct lp_err *err)
{
	return json_call(c, "GET", path, NULL, NULL, out, err);
}

int kube_create(struct kube_client *c, const char *path, json_t *obj, json_t **out,
                struct lp_err *err)
{
	return json_call(c, "POST", path, "application/json", obj, out, err);
}

int kube_update(struct kube_client *c, const char *path, json_t *obj, json_t **out,
                struct lp_err *err)
{
	return json_call(c, "PUT", path, "application/json", obj, out, err);
}

int kube_patch(struct kube_client *c, const char *path, enum kube_patch_type type, json_t *patch,
               json_t **out, struct lp_err *err)
{
	const char *ct = type == KUBE_PATCH_JSON ? "application/json-patch+json"
	                                         : "application/merge-patch+json";

	return json_call(c, "PATCH", path, ct, patch, out, err);
}

int kube_delete(struct kube_client *c, const char *path, struct lp_err *err)
{
	return json_call(c, "DELETE", path, NULL, NULL, NULL, err);
}

static int list_page_path(struct lp_buf *b, const char *path, const char *selector, int limit,
                          const char *cont, struct lp_err *err)
{
	int rc;

	lp_buf_reset(b);
	rc = lp_buf_appendf(b, err, "%s?limit=%d", path, limit);
	if (!rc && selector && *selector) {
		rc = lp_buf_appendf(b, err, "&labelSelector=");
		if (!rc)
			rc = kube_percent_encode(b, selector, false, err);
	}
	if (!rc && cont && *cont) {
		rc = lp_buf_appendf(b, err, "&continue=");
		if (!rc)
			rc = kube_percent_encode(b, cont, false, err);
	}
	return rc;
}

int kube_list(struct kube_client *c, const char *path, const char *label_selector, int limit,
              json_t **items, char **resource_version, struct lp_err *err)
{
	struct lp_buf url;
	json_t *all, *page = NULL;
	char *cont = NULL;
	bool restarted = false;
	int rc;

	*items = NULL;
	*resource_version = NULL;
	all = json_array();
	if (!all)
		return lp_errf(err, -ENOMEM, "out of memory");
	lp_buf_init(&url, 65536);
	for (;;) {
		json_t *meta, *arr;
		const char *rv, *next;

		rc = list_page_path(&url, path, label_selector, limit > 0 ? limit : 500, cont, err);
		if (rc)
			goto out;
		rc = kube_get(c, url.data, &page, err);
		if (rc == -ESTALE && cont && !restarted) {
			/* the continue token expired: start over once, whole */
			restarted = true;
			free(cont);
			cont = NULL;
			json_array_clear(all);
			continue;
		}
		if (rc)
			goto out;
		arr = json_object_get(page, "items");
		meta = json_object_get(page, "metadata");
		if (!json_is_array(arr) && !json_is_null(arr) && arr) {
			rc = lp_errf(err, -EBADMSG, "list %.200s: 'items' is not an array", path);
			goto out;
		}
		if (json_is_array(arr) && json_array_extend(all, arr)) {
			rc = lp_errf(err, -ENOMEM, "out of memory");
			goto out;
		}
		rv = json_string_value(json_object_get(meta, "resourceVersion"));
		next = json_string_value(json_object_get(meta, "continue"));
		if (rv) {
			free(*resource_version);
			*resource_version = strdup(rv);
		}
		free(cont);
		cont = next && *next ? strdup(next) : NULL;
		json_decref(page);
		page = NULL;
		if (!cont)
			break;
	}
	if (!*resource_version) {
		rc = lp_errf(err, -EBADMSG, "list %.200s: no metadata.resourceVersion", path);
		goto out;
	}
	*items = all;
	all = NULL;
out:
	json_decref(page);
	json_decref(all);
	free(cont);
	lp_buf_release(&url);
	if (rc) {
		free(*resource_version);
		*resource_version = NULL;
	}
	return rc;
}
