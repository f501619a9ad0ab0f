/* Watch streams: events split across chunks in any way arrive whole and
 * in order, bookmarks carry the version to resume from, a 410 (as an
 * HTTP status or an ERROR event) asks for a relist, bad lines are errors
 * with a reason, and a watch that hangs can be cancelled. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <curl/curl.h>

#include "operator/kube/encoding.h"
#include "operator/kube/watch.h"
#include "tests/test.h"
#include "tests/unit/kube-fake-server.h"

struct lines {
	int n;
	char text[8][128];
};

static int collect(void *user, const char *line, size_t len)
{
	struct lines *l = user;

	if (l->n < 8)
		snprintf(l->text[l->n], sizeof(l->text[0]), "%.*s", (int)len, line);
	l->n++;
	return 0;
}

static void test_splitter_any_chunking(void)
{
	const char *stream = "{\"a\":1}\n{\"b\":2}\r\n\n{\"c\":3}\n";
	size_t len = strlen(stream), cut;
	struct lp_err err = {0};

	/* every single cut point, and byte by byte */
	for (cut = 0; cut <= len; cut++) {
		struct kube_line_splitter s;
		struct lines l = {0};

		kube_line_splitter_init(&s, 1024);
		CHECK_OK(kube_line_splitter_feed(&s, stream, cut, collect, &l, &err), &err);
		CHECK_OK(kube_line_splitter_feed(&s, stream + cut, len - cut, collect, &l, &err),
		         &err);
		CHECK_EQ_INT(l.n, 3);
		CHECK_EQ_STR(l.text[0], "{\"a\":1}");
		CHECK_EQ_STR(l.text[1], "{\"b\":2}");
		CHECK_EQ_STR(l.text[2], "{\"c\":3}");
		kube_line_splitter_release(&s);
	}
	{
		struct kube_line_splitter s;
		struct lines l = {0};
		size_t i;

		kube_line_splitter_init(&s, 1024);
		for (i = 0; i < len; i++)
			CHECK_OK(kube_line_splitter_feed(&s, stream + i, 1, collect, &l, &err),
			         &err);
		CHECK_EQ_INT(l.n, 3);
		CHECK_EQ_STR(l.text[2], "{\"c\":3}");
		kube_line_splitter_release(&s);
	}
}

static void test_splitter_line_cap(void)
{
	struct kube_line_splitter s;
	struct lines l = {0};
	struct lp_err err = {0};
	char big[100];

	memset(big, 'x', sizeof(big));
	kube_line_splitter_init(&s, 64);
	CHECK_EQ_INT(kube_line_splitter_feed(&s, big, sizeof(big), collect, &l, &err), -E2BIG);
	CHECK(strstr(err.msg, "longer than 64 bytes") != NULL);
	kube_line_splitter_release(&s);
	kube_line_splitter_init(&s, 64);
	CHECK_EQ_INT(kube_line_splitter_feed(&s, "aa", 2, collect, &l, &err), 0);
	CHECK_EQ_INT(kube_line_splitter_feed(&s, big, sizeof(big), collect, &l, &err), -E2BIG);
	kube_line_splitter_release(&s);
}

static void test_parse_lines(void)
{
	enum kube_event_type t;
	json_t *obj;
	long code;
	struct lp_err err = {0};
	const char *added = "{\"type\":\"ADDED\",\"object\":{\"kind\":\"Pod\",\"metadata\":"
	                    "{\"name\":\"p\",\"resourceVersion\":\"12\"}}}";
	const char *bookmark = "{\"type\":\"BOOKMARK\",\"object\":{\"kind\":\"Pod\",\"metadata\":"
	                       "{\"resourceVersion\":\"99\"}}}";
	const char *gone = "{\"type\":\"ERROR\",\"object\":{\"kind\":\"Status\",\"status\":"
	                   "\"Failure\",\"message\":\"too old resource version: 5 (90)\","
	                   "\"reason\":\"Expired\",\"code\":410}}";

	CHECK_OK(kube_watch_parse_line(added, strlen(added), &t, &obj, &code, &err), &err);
	CHECK_EQ_INT(t, KUBE_EVENT_ADDED);
	CHECK_EQ_STR(json_string_value(json_object_get(json_object_get(obj, "metadata"), "name")),
	             "p");
	json_decref(obj);
	CHECK_OK(kube_watch_parse_line(bookmark, strlen(bookmark), &t, &obj, &code, &err), &err);
	CHECK_EQ_INT(t, KUBE_EVENT_BOOKMARK);
	CHECK_EQ_STR(kube_event_type_name(t), "BOOKMARK");
	json_decref(obj);
	CHECK_OK(kube_watch_parse_line(gone, strlen(gone), &t, &obj, &code, &err), &err);
	CHECK_EQ_INT(t, KUBE_EVENT_ERROR);
	CHECK_EQ_INT(code, 410);
	json_decref(obj);

	CHECK_EQ_INT(kube_watch_parse_line("{nope", 5, &t, &obj, &code, &err), -EBADMSG);
	CHECK(strstr(err.msg, "not JSON") != NULL);
	CHECK_EQ_INT(kube_watch_parse_line("{\"object\":{}}", 13, &t, &obj, &code, &err), -EBADMSG);
	CHECK(strstr(err.msg, "without a 'type'") != NULL);
	CHECK_EQ_INT(kube_watch_parse_line("{\"type\":\"RENAMED\",\"object\":{}}", 30, &t, &obj,
	                                   &code, &err),
	             -EBADMSG);
	CHECK(strstr(err.msg, "unknown watch event type 'RENAMED'") != NULL);
	CHECK_EQ_INT(kube_watch_parse_line("{\"type\":\"ADDED\",\"object\":{\"kind\":\"Pod\"}}", 39,
	                                   &t, &obj, &code, &err),
	             -EBADMSG);
	CHECK(obj == NULL);
}

static void test_watch_url(void)
{
	struct lp_buf b;
	struct lp_err err = {0};
	struct kube_watch_opts o = {.path = "/api/v1/pods",
	                            .label_selector = "loraplane.io/base-model-hash",
	                            .resource_version = "123",
	                            .timeout_seconds = 417,
	                            .bookmarks = true};

	lp_buf_init(&b, 1024);
	CHECK_OK(kube_watch_url(&b, &o, &err), &err);
	CHECK_EQ_STR(b.data, "/api/v1/pods?watch=1&allowWatchBookmarks=true&timeoutSeconds=417"
	                     "&resourceVersion=123&labelSelector=loraplane.io%2Fbase-model-hash");
	lp_buf_release(&b);
}

/* --- against a server --- */

struct wscript {
	int mode;
	char path[2048];
};

static void whandler(int fd, const struct fake_request *req, void *user)
{
	struct wscript *s = user;

	snprintf(s->path, sizeof(s->path), "%s", req->path);
	if (s->mode == 0) {
		/* events split mid-line across chunks, then a clean end */
		fake_stream_begin(fd);
		fake_stream_chunk(fd,
		                  "{\"type\":\"ADDED\",\"object\":{\"metadata\":{\"name\":\"a\","
		                  "\"resourceVersion\":\"5\"}}}\n{\"type\":\"MODI");
		usleep(20000);
		fake_stream_chunk(fd, "FIED\",\"object\":{\"metadata\":{\"name\":\"a\","
		                      "\"resourceVersion\":\"6\"}}}\n");
		fake_stream_chunk(fd, "{\"type\":\"BOOKMARK\",\"object\":{\"metadata\":"
		                      "{\"resourceVersion\":\"9\"}}}\n");
		fake_stream_end(fd);
	} else if (s->mode == 1) {
		fake_stream_begin(fd);
		fake_stream_chunk(fd, "{\"type\":\"ERROR\",\"object\":{\"kind\":\"Status\","
		                      "\"message\":\"too old resource version\",\"code\":410}}\n");
		fake_stream_end(fd);
	} else if (s->mode == 2) {
		fake_respond(fd, 410, "{\"kind\":\"Status\",\"reason\":\"Expired\",\"code\":410}");
	} else if (s->mode == 3) {
		/* hangs until the client goes away (or a minute has passed, so
		 * that a client ignoring its stop flag fails instead of hanging) */
		fake_stream_begin(fd);
		for (int i = 0; i < 6000; i++) {
			char c;

			if (recv(fd, &c, 1, MSG_DONTWAIT) == 0)
				break;
			usleep(10000);
		}
	} else {
		fake_stream_begin(fd);
		fake_stream_chunk(fd, "{\"type\":\"ERROR\",\"object\":{\"kind\":\"Status\","
		                      "\"message\":\"internal error\",\"code\":500}}\n");
		fake_stream_end(fd);
	}
}

struct seen {
	int n;
	enum kube_event_type types[8];
	char rvs[8][16];
};

static int on_ev(void *user, enum kube_event_type t, json_t *obj)
{
	struct seen *s = user;
	const char *rv =
	    json_string_value(json_object_get(json_object_get(obj, "metadata"), "resourceVersion"));

	if (s->n < 8) {
		s->types[s->n] = t;
		snprintf(s->rvs[s->n], sizeof(s->rvs[0]), "%s", rv ? rv : "");
	}
	s->n++;
	return 0;
}

static struct kube_client *local_client(int port)
{
	struct kube_config cfg;
	struct kube_client *c = NULL;
	char url[64];

	memset(&cfg, 0, sizeof(cfg));
	snprintf(url, sizeof(url), "http://127.0.0.1:%d", port);
	cfg.server = strdup(url);
	kube_client_new(&c, &cfg, NULL);
	return c;
}

static void test_watch_stream(void)
{
	struct wscript s = {.mode = 0};
	struct fake_server srv;
	struct kube_client *c;
	struct seen seen = {0};
	struct lp_err err = {0};
	struct kube_watch_opts o = {.path = "/api/v1/pods",
	                            .resource_version = "4",
	                            .timeout_seconds = 5,
	                            .bookmarks = true};
	atomic_bool stop = false;

	CHECK(fake_server_start(&srv, whandler, &s) == 0);
	c = local_client(srv.port);
	CHECK_OK(kube_watch(c, &o, on_ev, &seen, &stop, &err), &err);
	CHECK_EQ_INT(seen.n, 3);
	CHECK_EQ_INT(seen.types[0], KUBE_EVENT_ADDED);
	CHECK_EQ_INT(seen.types[1], KUBE_EVENT_MODIFIED);
	CHECK_EQ_STR(seen.rvs[1], "6");
	CHECK_EQ_INT(seen.types[2], KUBE_EVENT_BOOKMARK);
	CHECK_EQ_STR(seen.rvs[2], "9");
	CHECK(strstr(s.path, "resourceVersion=4") != NULL);

	s.mode = 1; /* ERROR event 410 */
	CHECK_EQ_INT(kube_watch(c, &o, on_ev, &seen, &stop, &err), -ESTALE);
	CHECK(strstr(err.msg, "410") != NULL);
	s.mode = 2; /* HTTP 410 */
	CHECK_EQ_INT(kube_watch(c, &o, on_ev, &seen, &stop, &err), -ESTALE);
	s.mode = 4; /* other ERROR events are errors, not relists */
	CHECK_EQ_INT(kube_watch(c, &o, on_ev, &seen, &stop, &err), -EIO);
	CHECK(strstr(err.msg, "internal error") != NULL);

	/* a hanging watch ends when stopped, as cancelled (a watch that
	 * ignored the flag would end cleanly when the server gives up) */
	s.mode = 3;
	atomic_store(&stop, true);
	CHECK_EQ_INT(kube_watch(c, &o, on_ev, &seen, &stop, &err), -ECANCELED);
	kube_client_free(c);
	fake_server_stop(&srv);
}

int main(void)
{
	TEST_MAIN_BEGIN("test-kube-watch");
	curl_global_init(CURL_GLOBAL_ALL);
	RUN(test_splitter_any_chunking);
	RUN(test_splitter_line_cap);
	RUN(test_parse_lines);
	RUN(test_watch_url);
	RUN(test_watch_stream);
	curl_global_cleanup();
	TEST_MAIN_END();
}
