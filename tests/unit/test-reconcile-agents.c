/* The operator's agent client against a scripted agent: which base model
 * a pod serves, what a load request carries (name, source, pin,
 * load_inplace, the admin token), how each answer is reported (201/200
 * success with the digest, 409 as "loaded from another source", errors
 * with the agent's own message), timeouts, and unloads of names with
 * '/' (percent-encoded; 404 counts as done). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <curl/curl.h>

#include "operator/kube/encoding.h"
#include "operator/reconcile/agents.h"
#include "tests/test.h"
#include "tests/unit/kube-fake-server.h"

struct agent_script {
	int mode;
	struct fake_request last;
};

static void ahandler(int fd, const struct fake_request *req, void *user)
{
	struct agent_script *s = user;

	s->last = *req;
	switch (s->mode) {
	case 0:
		if (strcmp(req->path, "/v1/models") == 0)
			fake_respond(fd, 200,
			             "{\"object\":\"list\",\"data\":["
			             "{\"id\":\"sql\",\"parent\":\"base/m\",\"root\":\"s3://x\"},"
			             "{\"id\":\"base/m\",\"parent\":null}]}");
		else if (strcmp(req->method, "POST") == 0)
			fake_respond(fd, 201,
			             "{\"status\":\"success\",\"lora_name\":\"sql\",\"source\":"
			             "\"s3://loras/sql\",\"sha256\":\"ABCDEF\",\"rank\":8}");
		else if (strcmp(req->method, "GET") == 0)
			fake_respond(fd, 200,
			             "{\"status\":\"success\",\"loras\":{\"sql\":{\"source\":"
			             "\"s3://loras/sql\",\"sha256\":\"abcdef\"}},\"count\":1}");
		else
			fake_respond(fd, 404,
			             "{\"error\":{\"message\":\"adapter 'org/x' is not loaded\"}}");
		break;
	case 1:
		fake_respond(fd, 409,
		             "{\"error\":{\"message\":\"'sql' is loaded from 's3://old'; set "
		             "load_inplace\",\"type\":\"conflict\",\"code\":409}}");
		break;
	case 2:
		fake_respond(fd, 500, "internal\nerror");
		break;
	case 3:
		usleep(1500000); /* longer than the client's timeout */
		fake_respond(fd, 200, "{}");
		break;
	case 4:
		fake_respond(fd, 200,
		             "{\"object\":\"list\",\"data\":[{\"id\":\"x\",\"parent\":\"y\"}]}");
		break;
	}
}

static struct agent_addr addr_of(int port)
{
	struct agent_addr a;

	snprintf(a.host, sizeof(a.host), "127.0.0.1");
	a.http_port = port;
	a.admin_port = port;
	return a;
}

static void test_base_model(void)
{
	struct agent_script s = {0};
	struct fake_server srv;
	struct agent_opts o = {.timeout = 2};
	struct agent_reply r;
	struct agent_addr a;
	struct lp_err err = {0};
	char base[64];

	CHECK(fake_server_start(&srv, ahandler, &s) == 0);
	a = addr_of(srv.port);
	CHECK_OK(agent_base_model(&a, &o, base, sizeof(base), &r, &err), &err);
	CHECK_EQ_STR(base, "base/m"); /* the entry whose parent is null */
	CHECK_EQ_STR(s.last.path, "/v1/models");
	s.mode = 4;
	CHECK_EQ_INT(agent_base_model(&a, &o, base, sizeof(base), &r, &err), -EBADMSG);
	CHECK(strstr(err.msg, "null parent") != NULL);
	fake_server_stop(&srv);
}

static void test_load(void)
{
	struct agent_script s = {0};
	struct fake_server srv;
	struct agent_opts o = {.timeout = 2, .token = "admin-secret"};
	struct agent_reply r;
	struct agent_lora got;
	struct agent_addr a;
	struct lp_err err = {0};
	json_t *body;

	CHECK(fake_server_start(&srv, ahandler, &s) == 0);
	a = addr_of(srv.port);
	CHECK_OK(agent_load(&a, &o, "sql", "s3://loras/sql", "abcdef", NULL, true, &got, &r, &err),
	         &err);
	CHECK_EQ_INT(r.http_status, 201);
	CHECK_EQ_STR(got.source, "s3://loras/sql");
	CHECK_EQ_STR(got.sha256, "abcdef"); /* lowercased */
	CHECK_EQ_STR(s.last.path, "/v1/loras");
	CHECK_EQ_STR(s.last.auth, "Bearer admin-secret");
	body = json_loads(s.last.body, 0, NULL);
	CHECK_EQ_STR(json_string_value(json_object_get(body, "lora_name")), "sql");
	CHECK_EQ_STR(json_string_value(json_object_get(json_object_get(body, "source"), "uri")),
	             "s3://loras/sql");
	CHECK_EQ_STR(json_string_value(json_object_get(json_object_get(body, "source"), "sha256")),
	             "abcdef");
	CHECK(json_is_true(json_object_get(body, "load_inplace")));
	json_decref(body);
	CHECK_OK(agent_load(&a, &o, "sql", "s3://loras/sql", NULL, NULL, false, &got, &r, &err),
	         &err);
	body = json_loads(s.last.body, 0, NULL);
	CHECK(json_object_get(body, "load_inplace") == NULL);
	CHECK(json_object_get(json_object_get(body, "source"), "sha256") == NULL);
	CHECK(json_object_get(json_object_get(body, "source"), "credentials") == NULL);
	json_decref(body);
	/* credentials from a secretRef travel as source.credentials */
	json_t *creds =
	    json_pack("{s:s, s:s}", "AWS_ACCESS_KEY_ID", "AKID", "AWS_SECRET_ACCESS_KEY", "shh");
	CHECK_OK(agent_load(&a, &o, "sql", "s3://loras/sql", NULL, creds, false, &got, &r, &err),
	         &err);
	body = json_loads(s.last.body, 0, NULL);
	CHECK(json_equal(json_object_get(json_object_get(body, "source"), "credentials"), creds));
	CHECK_EQ_INT(creds->refcount, 1); /* borrowed, not kept */
	json_decref(body);
	json_decref(creds);

	s.mode = 1;
	CHECK_EQ_INT(agent_load(&a, &o, "sql", "s3://new", NULL, NULL, false, &got, &r, &err),
	             -EEXIST);
	CHECK_EQ_INT(r.http_status, 409);
	CHECK_EQ_STR(r.message, "'sql' is loaded from 's3://old'; set load_inplace");
	s.mode = 2;
	CHECK_EQ_INT(agent_load(&a, &o, "sql", "s3://new", NULL, NULL, false, &got, &r, &err),
	             -EIO);
	CHECK_EQ_INT(r.http_status, 500);
	CHECK_EQ_STR(r.message, "internal error");
	CHECK(strstr(err.msg, "POST /v1/loras: 500 internal error") != NULL);

	s.mode = 3;
	o.timeout = 0.3;
	CHECK_EQ_INT(agent_load(&a, &o, "sql", "s3://new", NULL, NULL, false, &got, &r, &err),
	             -ETIMEDOUT);
	CHECK_EQ_INT(r.http_status, 0);
	CHECK_EQ_STR(r.message, "timed out");
	fake_server_stop(&srv);
}

static void test_list_and_unload(void)
{
	struct agent_script s = {0};
	struct fake_server srv;
	struct agent_opts o = {.timeout = 2};
	struct agent_reply r;
	struct agent_lora l;
	struct agent_addr a;
	struct lp_err err = {0};
	json_t *loras;
	int port;

	CHECK(fake_server_start(&srv, ahandler, &s) == 0);
	a = addr_of(srv.port);
	CHECK_OK(agent_list(&a, &o, &loras, &r, &err), &err);
	CHECK(agent_lora_from_json(json_object_get(loras, "sql"), &l));
	CHECK_EQ_STR(l.source, "s3://loras/sql");
	json_decref(loras);
	s.mode = 4; /* an answer without 'loras' */
	CHECK_EQ_INT(agent_list(&a, &o, &loras, &r, &err), -EBADMSG);
	s.mode = 0;
	CHECK_OK(agent_unload(&a, &o, "org/x y", &r, &err), &err); /* 404: not loaded is fine */
	CHECK_EQ_STR(s.last.method, "DELETE");
	CHECK_EQ_STR(s.last.path, "/v1/loras/org%2Fx%20y");
	s.mode = 2;
	CHECK_EQ_INT(agent_unload(&a, &o, "sql", &r, &err), -EIO);
	port = srv.port;
	fake_server_stop(&srv);
	a = addr_of(port);
	CHECK_EQ_INT(agent_list(&a, &o, &loras, &r, &err), -ECONNREFUSED);
	CHECK(r.message[0] != '\0');
}

int main(void)
{
	TEST_MAIN_BEGIN("test-reconcile-agents");
	curl_global_init(CURL_GLOBAL_ALL);
	RUN(test_base_model);
	RUN(test_load);
	RUN(test_list_and_unload);
	curl_global_cleanup();
	TEST_MAIN_END();
}
