/* The Kubernetes REST client against a scripted local HTTP server: the
 * bearer token is sent and re-read from its file after a 401, error
 * bodies are kept and parsed as metav1.Status, HTTP codes map to errno
 * codes, lists are paginated (and restarted when the continue token
 * expires), patches carry their content types, paths are built right. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <curl/curl.h>

#include "operator/kube/client.h"
#include "tests/test.h"
#include "tests/unit/kube-fake-server.h"

struct script {
	int mode;
	int calls;
	struct fake_request last;
	char auths[8][512];
	char paths[8][2048];
};

static void handler(int fd, const struct fake_request *req, void *user)
{
	struct script *s = user;
	int i = s->calls++;

	s->last = *req;
	if (i < 8) {
		snprintf(s->auths[i], sizeof(s->auths[i]), "%s", req->auth);
		snprintf(s->paths[i], sizeof(s->paths[i]), "%s", req->path);
	}
	switch (s->mode) {
	case 0: /* echo the method and body */
		fake_write(fd,
		           "HTTP/1.1 200 OK\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n"
		           "{\"method\":\"%s\"}",
		           strlen(req->method) + 13, req->method);
		break;
	case 1: /* conflict with a Status body */
		fake_respond(fd, 409,
		             "{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"status\":\"Failure\","
		             "\"message\":\"Operation cannot be fulfilled on loraadapters "
		             "\\\"sql\\\": the object has been modified\",\"reason\":\"Conflict\","
		             "\"code\":409}");
		break;
	case 2: /* 401 unless the token is the rotated one */
		if (strcmp(req->auth, "Bearer token-2") == 0)
			fake_respond(fd, 200, "{\"ok\":true}");
		else
			fake_respond(fd, 401,
			             "{\"kind\":\"Status\",\"reason\":\"Unauthorized\","
			             "\"message\":\"Unauthorized\",\"code\":401}");
		break;
	case 3: /* three pages */
		if (!strstr(req->path, "continue="))
			fake_respond(fd, 200,
			             "{\"metadata\":{\"resourceVersion\":\"41\","
			             "\"continue\":\"p2\"},\"items\":[{\"metadata\":"
			             "{\"name\":\"a\"}},{\"metadata\":{\"name\":\"b\"}}]}");
		else if (strstr(req->path, "continue=p2"))
			fake_respond(fd, 200,
			             "{\"metadata\":{\"resourceVersion\":\"41\","
			             "\"continue\":\"p3\"},\"items\":[{\"metadata\":"
			             "{\"name\":\"c\"}}]}");
		else
			fake_respond(fd, 200,
			             "{\"metadata\":{\"resourceVersion\":\"41\"},"
			             "\"items\":[{\"metadata\":{\"name\":\"d\"}}]}");
		break;
	case 4: /* the continue token expires once */
		if (!strstr(req->path, "continue="))
			fake_respond(
			    fd, 200,
			    s->calls == 1
			        ? "{\"metadata\":{\"resourceVersion\":\"7\",\"continue\":\"x\"},"
			          "\"items\":[{\"metadata\":{\"name\":\"old\"}}]}"
			        : "{\"metadata\":{\"resourceVersion\":\"9\"},\"items\":"
			          "[{\"metadata\":{\"name\":\"new\"}}]}");
		else
			fake_respond(fd, 410,
			             "{\"kind\":\"Status\",\"reason\":\"Expired\",\"message\":"
			             "\"The provided continue parameter is too old\","
			             "\"code\":410}");
		break;
	case 6:
		fake_respond(fd, 401,
		             "{\"kind\":\"Status\",\"reason\":\"Unauthorized\","
		             "\"message\":\"Unauthorized\",\"code\":401}");
		break;
	case 5: /* a non-JSON error body from a proxy */
		fake_write(fd, "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 24\r\n"
		               "Connection: close\r\n\r\nupstream connect error\r\n");
		break;
	}
}

static struct kube_client *client_for(struct fake_server *srv, const char *token,
                                      const char *token_file)
{
	struct kube_config cfg;
	struct kube_client *c = NULL;
	struct lp_err err = {0};
	char url[64];

	memset(&cfg, 0, sizeof(cfg));
	snprintf(url, sizeof(url), "http://127.0.0.1:%d", srv->port);
	cfg.server = strdup(url);
	cfg.token = token ? strdup(token) : NULL;
	cfg.token_file = token_file ? strdup(token_file) : NULL;
	if (kube_client_new(&c, &cfg, &err))
		printf("client: %s\n", err.msg);
	return c;
}

static void test_bearer_token_and_methods(void)
{
	struct script s = {.mode = 0};
	struct fake_server srv;
	struct kube_client *c;
	struct lp_err err = {0};
	json_t *out = NULL, *patch = json_pack("{s:{s:i}}", "status", "readyEndpoints", 3);

	CHECK(fake_server_start(&srv, handler, &s) == 0);
	c = client_for(&srv, "secret-token", NULL);
	CHECK(c);
	CHECK_OK(kube_get(c, "/api/v1/pods", &out, &err), &err);
	CHECK_EQ_STR(json_string_value(json_object_get(out, "method")), "GET");
	json_decref(out);
	CHECK_EQ_STR(s.last.auth, "Bearer secret-token");
	CHECK_OK(kube_patch(c, "/x/status", KUBE_PATCH_MERGE, patch, &out, &err), &err);
	json_decref(out);
	CHECK_EQ_STR(s.last.method, "PATCH");
	CHECK_EQ_STR(s.last.ctype, "application/merge-patch+json");
	CHECK_EQ_STR(s.last.body, "{\"status\":{\"readyEndpoints\":3}}");
	CHECK_OK(kube_patch(c, "/x", KUBE_PATCH_JSON, patch, NULL, &err), &err);
	CHECK_EQ_STR(s.last.ctype, "application/json-patch+json");
	CHECK_OK(kube_update(c, "/x", patch, NULL, &err), &err);
	CHECK_EQ_STR(s.last.method, "PUT");
	CHECK_OK(kube_create(c, "/x", patch, NULL, &err), &err);
	CHECK_EQ_STR(s.last.method, "POST");
	CHECK_OK(kube_delete(c, "/x", &err), &err);
	CHECK_EQ_STR(s.last.method, "DELETE");
	json_decref(patch);
	kube_client_free(c);
	fake_server_stop(&srv);
}

static void test_error_body_kept_and_parsed(void)
{
	struct script s = {.mode = 1};
	struct fake_server srv;
	struct kube_client *c;
	struct kube_response resp;
	struct lp_err err = {0};
	int rc;

	CHECK(fake_server_start(&srv, handler, &s) == 0);
	c = client_for(&srv, NULL, NULL);
	kube_response_init(&resp);
	rc = kube_request(c, "PUT", "/apis/loraplane.io/v1alpha1/namespaces/a/loraadapters/sql",
	                  "application/json", "{}", &resp, &err);
	CHECK_EQ_INT(rc, -EBUSY);
	CHECK_EQ_INT(resp.http_status, 409);
	CHECK_EQ_STR(resp.status.reason, "Conflict");
	CHECK(strstr(resp.status.message, "the object has been modified") != NULL);
	CHECK(strstr(resp.body.data, "\"kind\":\"Status\"") != NULL);
	CHECK_MSG(strstr(err.msg, "PUT /apis/loraplane.io/v1alpha1/namespaces/a/loraadapters/sql: "
	                          "409 Conflict: Operation cannot be fulfilled") != NULL,
	          "message: %s", err.msg);
	CHECK(s.auths[0][0] == '\0'); /* no token configured, none sent */
	kube_response_release(&resp);

	s.mode = 5;
	kube_response_init(&resp);
	rc = kube_request(c, "GET", "/api/v1/pods", NULL, NULL, &resp, &err);
	CHECK_EQ_INT(rc, -EIO);
	CHECK_EQ_STR(resp.status.message, "upstream connect error");
	CHECK(strstr(err.msg, "502") != NULL && strstr(err.msg, "upstream connect error"));
	kube_response_release(&resp);
	kube_client_free(c);
	fake_server_stop(&srv);
}

static void test_token_file_reread_on_401(void)
{
	char path[] = "/tmp/lp-token-XXXXXX";
	int fd = mkstemp(path);
	struct script s = {.mode = 2};
	struct fake_server srv;
	struct kube_client *c;
	struct kube_client_stats st;
	struct lp_err err = {0};
	json_t *out = NULL;

	CHECK(fd >= 0);
	CHECK(write(fd, "token-1\n", 8) == 8);
	close(fd);
	CHECK(fake_server_start(&srv, handler, &s) == 0);
	c = client_for(&srv, NULL, path);
	CHECK(c);
	/* the token rotates on disk; the client notices on the 401 */
	fd = open(path, O_WRONLY | O_TRUNC);
	CHECK(write(fd, "token-2\n", 8) == 8);
	close(fd);
	CHECK_OK(kube_get(c, "/api", &out, &err), &err);
	json_decref(out);
	CHECK_EQ_INT(s.calls, 2);
	CHECK_EQ_STR(s.auths[0], "Bearer token-1");
	CHECK_EQ_STR(s.auths[1], "Bearer token-2");
	kube_client_stats(c, &st);
	CHECK_EQ_INT(st.token_reloads, 2);
	CHECK_EQ_INT(st.ok, 1);

	/* a token that stays wrong gives -EACCES after one retry */
	s.mode = 6;
	s.calls = 0;
	CHECK_EQ_INT(kube_get(c, "/api", &out, &err), -EACCES);
	CHECK_EQ_INT(s.calls, 2);
	CHECK(strstr(err.msg, "401 Unauthorized") != NULL);
	kube_client_free(c);
	fake_server_stop(&srv);
	unlink(path);
}

static void test_list_pagination(void)
{
	struct script s = {.mode = 3};
	struct fake_server srv;
	struct kube_client *c;
	struct lp_err err = {0};
	json_t *items = NULL;
	char *rv = NULL;

	CHECK(fake_server_start(&srv, handler, &s) == 0);
	c = client_for(&srv, NULL, NULL);
	CHECK_OK(kube_list(c, "/api/v1/pods", "loraplane.io/base-model-hash in (ab12cd34)", 2,
	                   &items, &rv, &err),
	         &err);
	CHECK_EQ_INT(json_array_size(items), 4);
	CHECK_EQ_STR(json_string_value(json_object_get(
	                 json_object_get(json_array_get(items, 3), "metadata"), "name")),
	             "d");
	CHECK_EQ_STR(rv, "41");
	CHECK_EQ_INT(s.calls, 3);
	CHECK_EQ_STR(s.paths[0], "/api/v1/pods?limit=2&labelSelector=loraplane.io%2Fbase-model-"
	                         "hash%20in%20%28ab12cd34%29");
	CHECK(strstr(s.paths[1], "&continue=p2") != NULL);
	json_decref(items);
	free(rv);

	s.mode = 4;
	s.calls = 0;
	CHECK_OK(kube_list(c, "/api/v1/pods", NULL, 0, &items, &rv, &err), &err);
	CHECK_EQ_INT(json_array_size(items), 1); /* the stale first page was dropped */
	CHECK_EQ_STR(json_string_value(json_object_get(
	                 json_object_get(json_array_get(items, 0), "metadata"), "name")),
	             "new");
	CHECK_EQ_STR(rv, "9");
	CHECK_EQ_STR(s.paths[0], "/api/v1/pods?limit=500");
	json_decref(items);
	free(rv);
	kube_client_free(c);
	fake_server_stop(&srv);
}

static void test_transport_errors(void)
{
	struct kube_config cfg;
	struct kube_client *c = NULL;
	struct lp_err err = {0};
	struct fake_server srv;
	struct script s = {0};
	char url[64];
	int port;

	/* a port nobody listens on: start and stop a server to find one */
	CHECK(fake_server_start(&srv, handler, &s) == 0);
	port = srv.port;
	fake_server_stop(&srv);
	memset(&cfg, 0, sizeof(cfg));
	snprintf(url, sizeof(url), "http://127.0.0.1:%d", port);
	cfg.server = strdup(url);
	CHECK_OK(kube_client_new(&c, &cfg, &err), &err);
	CHECK(cfg.server == NULL); /* ownership moved */
	CHECK_EQ_INT(kube_get(c, "/api", NULL, &err), -ECONNREFUSED);
	CHECK(strstr(err.msg, "GET /api: ") == err.msg);
	kube_client_free(c);
}

static void test_status_and_errno(void)
{
	struct kube_status st;

	const char *body = "{\"kind\":\"Status\",\"reason\":\"AlreadyExists\",\"message\":"
	                   "\"leases \\\"op\\\" already exists\",\"code\":409}";

	kube_status_parse(body, strlen(body), 409, &st);
	CHECK_EQ_INT(st.code, 409);
	CHECK_EQ_STR(st.reason, "AlreadyExists");
	CHECK_EQ_STR(st.message, "leases \"op\" already exists");
	CHECK_EQ_INT(kube_http_errno(409, st.reason), -EEXIST);
	CHECK_EQ_INT(kube_http_errno(409, "Conflict"), -EBUSY);
	CHECK_EQ_INT(kube_http_errno(410, "Expired"), -ESTALE);
	CHECK_EQ_INT(kube_http_errno(404, NULL), -ENOENT);
	CHECK_EQ_INT(kube_http_errno(422, NULL), -EINVAL);
	CHECK_EQ_INT(kube_http_errno(429, NULL), -EAGAIN);
	CHECK_EQ_INT(kube_http_errno(503, NULL), -EIO);
	CHECK_EQ_INT(kube_http_errno(201, NULL), 0);
	kube_status_parse("line one\nline two\n", 18, 500, &st);
	CHECK_EQ_INT(st.code, 500);
	CHECK_EQ_STR(st.message, "line one line two");
	kube_status_parse(NULL, 0, 503, &st);
	CHECK_EQ_INT(st.code, 503);
	CHECK_EQ_STR(st.message, "");
}

static void test_paths(void)
{
	struct lp_buf b;
	struct lp_err err = {0};

	lp_buf_init(&b, 1024);
	CHECK_OK(kube_path(&b, &KUBE_GVR_PODS, NULL, NULL, NULL, &err), &err);
	CHECK_EQ_STR(b.data, "/api/v1/pods");
	lp_buf_reset(&b);
	CHECK_OK(kube_path(&b, &KUBE_GVR_LORAADAPTERS, "team-a", "sql", "status", &err), &err);
	CHECK_EQ_STR(b.data,
	             "/apis/loraplane.io/v1alpha1/namespaces/team-a/loraadapters/sql/status");
	lp_buf_reset(&b);
	CHECK_OK(kube_path(&b, &KUBE_GVR_ENDPOINTSLICES, "ns", NULL, NULL, &err), &err);
	CHECK_EQ_STR(b.data, "/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices");
	lp_buf_reset(&b);
	CHECK_OK(kube_path(&b, &KUBE_GVR_LEASES, "ns", "a b", NULL, &err), &err);
	CHECK_EQ_STR(b.data, "/apis/coordination.k8s.io/v1/namespaces/ns/leases/a%20b");
	lp_buf_release(&b);
}

int main(void)
{
	TEST_MAIN_BEGIN("test-kube-client");
	curl_global_init(CURL_GLOBAL_ALL);
	RUN(test_bearer_token_and_methods);
	RUN(test_error_body_kept_and_parsed);
	RUN(test_token_file_reread_on_401);
	RUN(test_list_pagination);
	RUN(test_transport_errors);
	RUN(test_status_and_errno);
	RUN(test_paths);
	curl_global_cleanup();
	TEST_MAIN_END();
}
