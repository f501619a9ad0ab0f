/* Watch streams; see watch.h. */
#include "operator/kube/watch.h"

#include <errno.h>
#include <string.h>

#include "operator/kube/encoding.h"

const char *kube_event_type_name(enum kube_event_type t)
{
	switch (t) {
	case KUBE_EVENT_ADDED:
		return "ADDED";
	case KUBE_EVENT_MODIFIED:
		return "MODIFIED";
	case KUBE_EVENT_DELETED:
		return "DELETED";
	case KUBE_EVENT_BOOKMARK:
		return "BOOKMARK";
	case KUBE_EVENT_ERROR:
		return "ERROR";
	}
	return "?";
}

void kube_line_splitter_init(struct kube_line_splitter *s, size_t max_line)
{
	lp_buf_init(&s->partial, max_line);
}

void kube_line_splitter_release(struct kube_line_splitter *s)
{
	lp_buf_release(&s->partial);
}

static int emit(const char *line, size_t len, kube_line_fn fn, void *user)
{
	if (len > 0 && line[len - 1] == '\r')
		len--;
	if (len == 0)
		return 0;
	return fn(user, line, len);
}

int kube_line_splitter_feed(struct kube_line_splitter *s, const char *data, size_t len,
                            kube_line_fn fn, void *user, struct lp_err *err)
{
	while (len > 0) {
		const char *nl = memchr(data, '\n', len);
		size_t n = nl ? (size_t)(nl - data) : len;
		int rc;

		if (!nl)
			return lp_buf_append(&s->partial, data, n, err)
			           ? lp_errf(err, -E2BIG, "watch event longer than %zu bytes",
			                     s->partial.max)
			           : 0;
		if (s->partial.len > 0) {
			if (lp_buf_append(&s->partial, data, n, err))
				return lp_errf(err, -E2BIG, "watch event longer than %zu bytes",
				               s->partial.max);
			rc = emit(s->partial.data, s->partial.len, fn, user);
			lp_buf_reset(&s->partial);
		} else {
			if (n > s->partial.max)
				return lp_errf(err, -E2BIG, "watch event longer than %zu bytes",
				               s->partial.max);
			rc = emit(data, n, fn, user);
		}
		if (rc)
			return rc;
		data += n + 1;
		len -= n + 1;
	}
	return 0;
}

int kube_watch_parse_line(const char *line, size_t len, enum kube_event_type *type, json_t **object,
                          long *error_code, struct lp_err *err)
{
	static const char *const names[] = {"ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"};
	json_error_t jerr;
	json_t *root, *obj;
	const char *t;
	size_t i;
	int rc = 0;

	*object = NULL;
	*error_code = 0;
	root = json_loadb(line, len, 0, &jerr);
	if (!root)
		return lp_errf(err, -EBADMSG, "watch event is not JSON: %s", jerr.text);
	t = json_string_value(json_object_get(root, "type"));
	obj = json_object_get(root, "object");
	if (!t) {
		rc = lp_errf(err, -EBADMSG, "watch event without a 'type'");
		goto out;
	}
	for (i = 0; i < sizeof(names) / sizeof(names[0]); i++)
		if (strcmp(t, names[i]) == 0)
			break;
	if (i == sizeof(names) / sizeof(names[0])) {
		rc = lp_errf(err, -EBADMSG, "unknown watch event type '%.32s'", t);
		goto out;
	}
	if (!json_is_object(obj)) {
		rc = lp_errf(err, -EBADMSG, "%s watch event without an 'object'", t);
		goto out;
	}
	*type = (enum kube_event_type)i;
	if (*type == KUBE_EVENT_ERROR) {
		json_t *code = json_object_get(obj, "code");

		*error_code = json_is_integer(code) ? (long)json_integer_value(code) : 0;
	} else if (!json_is_object(json_object_get(obj, "metadata"))) {
		rc = lp_errf(err, -EBADMSG, "%s watch event object without 'metadata'", t);
		goto out;
	}
	*object = json_incref(obj);
out:
	json_decref(root);
	return rc;
}

int kube_watch_url(struct lp_buf *b, const struct kube_watch_opts *o, struct lp_err *err)
{
	int rc = lp_buf_appendf(b, err, "%s?watch=1", o->path);

	if (!rc && o->bookmarks)
		rc = lp_buf_appendf(b, err, "&allowWatchBookmarks=true");
	if (!rc && o->timeout_seconds > 0)
		rc = lp_buf_appendf(b, err, "&timeoutSeconds=%d", o->timeout_seconds);
	if (!rc && o->resource_version && *o->resource_version) {
		rc = lp_buf_appendf(b, err, "&resourceVersion=");
		if (!rc)
			rc = kube_percent_encode(b, o->resource_version, false, err);
	}
	if (!rc && o->label_selector && *o->label_selector) {
		rc = lp_buf_appendf(b, err, "&labelSelector=");
		if (!rc)
			rc = kube_percent_encode(b, o->label_selector, false, err);
	}
	return rc;
}

struct watch_state {
	struct kube_line_splitter split;
	kube_watch_fn fn;
	void *user;
	int result; /* why the stream was stopped from inside */
	struct lp_err err;
};

static int on_line(void *user, const char *line, size_t len)
{
	struct watch_state *w = user;
	enum kube_event_type type;
	json_t *obj;
	long code;
	int rc;

	rc = kube_watch_parse_line(line, len, &type, &obj, &code, &w->err);
	if (rc) {
		w->result = rc;
		return rc;
	}
	if (type == KUBE_EVENT_ERROR) {
		const char *msg = json_string_value(json_object_get(obj, "message"));

		w->result = lp_errf(&w->err, code == 410 ? -ESTALE : -EIO,
		                    "watch error %ld: %.300s", code, msg ? msg : "(no message)");
		json_decref(obj);
		return w->result;
	}
	rc = w->fn(w->user, type, obj);
	json_decref(obj);
	if (rc) {
		w->result = lp_errf(&w->err, -ECANCELED, "watch ended by its handler");
		return rc;
	}
	return 0;
}

static int on_chunk(void *user, const char *data, size_t len)
{
	struct watch_state *w = user;
	int rc = kube_line_splitter_feed(&w->split, data, len, on_line, w, &w->err);

	if (rc && !w->result)
		w->result = rc < 0 ? rc : -EIO;
	return rc;
}

int kube_watch(struct kube_client *c, const struct kube_watch_opts *o, kube_watch_fn fn, void *user,
               const atomic_bool *stop, struct lp_err *err)
{
	struct watch_state w = {.fn = fn, .user = user};
	struct kube_response resp;
	struct lp_buf url;
	long limit;
	int rc;

	lp_buf_init(&url, 65536);
	rc = kube_watch_url(&url, o, err);
	if (rc) {
		lp_buf_release(&url);
		return rc;
	}
	kube_line_splitter_init(&w.split, KUBE_WATCH_LINE_MAX);
	kube_response_init(&resp);
	/* the server ends the watch after timeoutSeconds; give it slack */
	limit = o->timeout_seconds > 0 ? o->timeout_seconds + 30 : 3600;
	rc = kube_stream(c, url.data, limit, on_chunk, &w, stop, &resp, err);
	if (w.result) {
		/* the stream was cut from inside: report why */
		rc = w.result;
		if (err)
			*err = w.err;
	} else if (rc == -ESTALE || (rc == 0 && resp.http_status == 410)) {
		rc = -ESTALE;
	} else if (rc == -ETIMEDOUT && resp.http_status >= 200 && resp.http_status < 300) {
		rc = 0; /* our own deadline after a healthy stream: re-watch */
	}
	kube_response_release(&resp);
	kube_line_splitter_release(&w.split);
	lp_buf_release(&url);
	return rc;
}
