/* The decisions of a LoraAdapter reconcile that users see: which pods
 * count (Running, not terminating, right label hash and annotation),
 * where the operator reaches an agent (podIP + container ports "http" /
 * "admin"), the Ready condition's reason and message, the status fields
 * and when lastTransitionTime moves, the Service name derived from the
 * resource name, the EndpointSlices listing exactly the ready pods, and
 * the per-pod memory that an agent restart or a verification resets. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "operator/kube/encoding.h"
#include "operator/reconcile/adapter.h"
#include "operator/reconcile/holdings.h"
#include "tests/test.h"

static const char *BASE = "meta-llama/Llama-3.2-3B-Instruct";

static json_t *adapter_obj(const char *extra_spec)
{
	char text[2048];

	snprintf(text, sizeof(text),
	         "{\"apiVersion\":\"loraplane.io/v1alpha1\",\"kind\":\"LoraAdapter\","
	         "\"metadata\":{\"name\":\"sql\",\"namespace\":\"team-a\",\"uid\":\"u-1\","
	         "\"generation\":3,\"finalizers\":[\"loraplane.io/unload\"]},"
	         "\"spec\":{\"baseModelName\":\"%s\",\"source\":{\"uri\":\"s3://loras/sql/v3\"}%s},"
	         "\"status\":{\"observedGeneration\":2}}",
	         BASE, extra_spec);
	return json_loads(text, 0, NULL);
}

static void test_spec_defaults_and_hash(void)
{
	json_t *o = adapter_obj("");
	struct adapter_spec s;
	struct lp_err err = {0};
	char hex[65];

	CHECK_OK(adapter_spec_parse(o, &s, &err), &err);
	CHECK_EQ_STR(s.ns, "team-a");
	CHECK_EQ_STR(s.lora_name, "sql"); /* modelName defaults to the name */
	CHECK_EQ_STR(s.uri, "s3://loras/sql/v3");
	CHECK_EQ_STR(s.sha256, "");
	CHECK(s.service_enabled);
	CHECK(s.has_finalizer);
	CHECK(!s.deleting);
	CHECK_EQ_INT(s.generation, 3);
	CHECK_EQ_INT(s.observed_generation, 2);
	CHECK_EQ_STR(s.invalid, "");
	kube_sha256_hex(BASE, strlen(BASE), hex);
	CHECK(strlen(s.base_hash) == 8 && strncmp(s.base_hash, hex, 8) == 0);
	json_decref(o);

	o = adapter_obj(",\"modelName\":\"sql-lora\",\"service\":{\"enabled\":false}");
	json_object_set_new(
	    json_object_get(json_object_get(o, "spec"), "source"), "sha256",
	    json_string("9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08"));
	json_object_set_new(json_object_get(o, "metadata"), "deletionTimestamp",
	                    json_string("2024-05-01T10:00:00Z"));
	CHECK_OK(adapter_spec_parse(o, &s, &err), &err);
	CHECK_EQ_STR(s.lora_name, "sql-lora");
	CHECK(!s.service_enabled);
	CHECK(s.deleting);
	CHECK_EQ_STR(s.sha256, "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08");
	json_decref(o);
}

static void test_spec_problems_are_reported(void)
{
	struct adapter_spec s;
	struct lp_err err = {0};
	json_t *o = adapter_obj(",\"modelType\":\"embedding\"");

	CHECK_OK(adapter_spec_parse(o, &s, &err), &err);
	CHECK_EQ_STR(s.invalid, "spec.modelType 'embedding' is not supported (lora or adapter)");
	json_decref(o);
	o = adapter_obj(",\"modelType\":\"adapter\"");
	CHECK_OK(adapter_spec_parse(o, &s, &err), &err);
	CHECK_EQ_STR(s.invalid, "");
	json_object_del(json_object_get(json_object_get(o, "spec"), "source"), "uri");
	CHECK_OK(adapter_spec_parse(o, &s, &err), &err);
	CHECK_EQ_STR(s.invalid, "spec.source.uri is required");
	json_decref(o);
	o = adapter_obj("");
	json_object_set_new(json_object_get(json_object_get(o, "spec"), "source"), "sha256",
	                    json_string("abc"));
	CHECK_OK(adapter_spec_parse(o, &s, &err), &err);
	CHECK_EQ_STR(s.invalid, "spec.source.sha256 must be 64 hex characters");
	json_object_del(json_object_get(o, "metadata"), "namespace");
	CHECK_EQ_INT(adapter_spec_parse(o, &s, &err), -EINVAL);
	json_decref(o);
}

static void test_service_names(void)
{
	char out[64], hex[65];

	adapter_service_name("sql", out, sizeof(out));
	CHECK_EQ_STR(out, "sql");
	adapter_service_name("sql-v2", out, sizeof(out));
	CHECK_EQ_STR(out, "sql-v2");
	/* dots, a leading digit, upper case: sanitised, prefixed, suffixed */
	kube_sha256_hex("9-lives.v1", 10, hex);
	adapter_service_name("9-lives.v1", out, sizeof(out));
	CHECK(strncmp(out, "lora-9-lives-v1-", 16) == 0 && strncmp(out + 16, hex, 8) == 0);
	adapter_service_name("a.b", out, sizeof(out));
	{
		char other[64];

		adapter_service_name("a-b", other, sizeof(other));
		CHECK(strcmp(out, other) != 0); /* never the same Service */
	}
	/* a 253-character name still gives a label of at most 63 */
	{
		char longname[254];

		memset(longname, 'x', 253);
		longname[253] = '\0';
		longname[10] = '.';
		adapter_service_name(longname, out, sizeof(out));
		CHECK(strlen(out) <= 63);
		CHECK(out[0] == 'x');
	}
}

static json_t *pod_obj(const char *name, const char *phase, bool ready, const char *base,
                       const char *extra_meta)
{
	char text[4096], hash[9];

	adapter_base_hash(base, hash);
	snprintf(text, sizeof(text),
	         "{\"metadata\":{\"name\":\"%s\",\"namespace\":\"team-a\",\"uid\":\"uid-%s\","
	         "\"labels\":{\"loraplane.io/base-model-hash\":\"%s\"},"
	         "\"annotations\":{\"loraplane.io/base-model\":\"%s\"}%s},"
	         "\"spec\":{\"containers\":[{\"name\":\"sidecar\",\"ports\":[{\"name\":\"metrics\","
	         "\"containerPort\":9090}]},{\"name\":\"agent\",\"ports\":[{\"name\":\"http\","
	         "\"containerPort\":18000},{\"name\":\"admin\",\"containerPort\":18001}]}]},"
	         "\"status\":{\"phase\":\"%s\",\"podIP\":\"10.1.2.3\",\"conditions\":[{\"type\":"
	         "\"Ready\",\"status\":\"%s\"}],\"containerStatuses\":[{\"restartCount\":2},"
	         "{\"restartCount\":1}]}}",
	         name, name, hash, base, extra_meta, phase, ready ? "True" : "False");
	return json_loads(text, 0, NULL);
}

static void test_pods(void)
{
	json_t *o = adapter_obj(""), *p;
	struct adapter_spec s;
	struct pod_info pi;

	adapter_spec_parse(o, &s, NULL);
	p = pod_obj("agent-0", "Running", true, BASE, "");
	CHECK(pod_info_parse(p, &pi));
	CHECK_EQ_STR(pi.ip, "10.1.2.3");
	CHECK_EQ_INT(pi.http_port, 18000);
	CHECK_EQ_INT(pi.admin_port, 18001);
	CHECK(pi.running && pi.ready);
	CHECK_EQ_INT(pi.restarts, 3);
	CHECK(pod_serves(&pi, &s));
	json_decref(p);

	/* terminating pods and pods not Running do not count */
	p = pod_obj("agent-1", "Running", true, BASE,
	            ",\"deletionTimestamp\":\"2024-05-01T10:00:00Z\"");
	CHECK(pod_info_parse(p, &pi));
	CHECK(!pi.running);
	json_decref(p);
	p = pod_obj("agent-2", "Pending", false, BASE, "");
	CHECK(pod_info_parse(p, &pi));
	CHECK(!pi.running && !pi.ready);
	json_decref(p);

	/* another base model: another hash and annotation */
	p = pod_obj("agent-3", "Running", true, "Qwen/Qwen2.5-7B", "");
	CHECK(pod_info_parse(p, &pi));
	CHECK(!pod_serves(&pi, &s));
	/* the right hash with a wrong annotation (a collision) is not ours */
	snprintf(pi.base_hash, sizeof(pi.base_hash), "%s", s.base_hash);
	CHECK(!pod_serves(&pi, &s));
	json_decref(p);

	/* no named ports: the defaults 8000 / 8001 */
	p = json_loads("{\"metadata\":{\"name\":\"x\",\"uid\":\"u\"},\"spec\":{\"containers\":"
	               "[{\"name\":\"a\"}]},\"status\":{\"phase\":\"Running\"}}",
	               0, NULL);
	CHECK(pod_info_parse(p, &pi));
	CHECK_EQ_INT(pi.http_port, 8000);
	CHECK_EQ_INT(pi.admin_port, 8001);
	CHECK_EQ_STR(pi.ip, "");
	json_decref(p);
	p = json_loads("{\"metadata\":{\"name\":\"x\"}}", 0, NULL);
	CHECK(!pod_info_parse(p, &pi)); /* no uid */
	json_decref(p);
	json_decref(o);
}

static void make_ep(struct endpoint_state *e, const char *name, int port, bool ready, bool failed,
                    const char *msg)
{
	memset(e, 0, sizeof(*e));
	snprintf(e->pod.name, sizeof(e->pod.name), "%s", name);
	snprintf(e->pod.ns, sizeof(e->pod.ns), "team-a");
	snprintf(e->pod.uid, sizeof(e->pod.uid), "uid-%s", name);
	snprintf(e->pod.ip, sizeof(e->pod.ip), "10.0.0.%d", port % 250);
	e->pod.http_port = port;
	e->ready = ready;
	e->loaded = ready;
	e->failed = failed;
	if (ready)
		snprintf(e->sha256, sizeof(e->sha256), "%064d", 7);
	snprintf(e->message, sizeof(e->message), "%s", msg);
}

static void test_conditions(void)
{
	json_t *o = adapter_obj("");
	struct adapter_spec s;
	struct adapter_condition c;
	struct endpoint_state eps[3];

	adapter_spec_parse(o, &s, NULL);
	adapter_condition(&s, eps, 0, &c);
	CHECK(!c.status);
	CHECK_EQ_STR(adapter_reason_name(c.reason), "NoEndpoints");
	CHECK(strstr(c.message, BASE) != NULL);

	make_ep(&eps[0], "a", 8000, true, false, "");
	make_ep(&eps[1], "b", 8000, true, false, "");
	make_ep(&eps[2], "c", 8000, true, false, "");
	adapter_condition(&s, eps, 3, &c);
	CHECK(c.status);
	CHECK_EQ_STR(adapter_reason_name(c.reason), "AllEndpointsReady");
	CHECK_EQ_STR(c.message, "3/3 endpoints ready");

	make_ep(&eps[1], "b", 8000, false, false, "pod is not Ready");
	adapter_condition(&s, eps, 3, &c);
	CHECK(!c.status);
	CHECK_EQ_STR(adapter_reason_name(c.reason), "PartiallyReady");
	CHECK_EQ_STR(c.message, "2/3 endpoints ready; pod b: pod is not Ready");

	/* a failure outranks a pod that is merely not ready */
	make_ep(&eps[2], "c", 8000, false, true, "load failed: 500 injected failure");
	adapter_condition(&s, eps, 3, &c);
	CHECK_EQ_STR(adapter_reason_name(c.reason), "LoadFailed");
	CHECK_EQ_STR(c.message, "1/3 endpoints ready; pod c: load failed: 500 injected failure");

	s.deleting = true;
	adapter_condition(&s, eps, 3, &c);
	CHECK_EQ_STR(adapter_reason_name(c.reason), "Unloading");
	s.deleting = false;
	snprintf(s.invalid, sizeof(s.invalid), "spec.source.uri is required");
	adapter_condition(&s, eps, 3, &c);
	CHECK_EQ_STR(adapter_reason_name(c.reason), "LoadFailed");
	CHECK_EQ_STR(c.message, "spec.source.uri is required");
	json_decref(o);
}

static void test_status_json(void)
{
	json_t *o = adapter_obj(""), *st, *old, *cond, *ep;
	struct adapter_spec s;
	struct adapter_condition c;
	struct endpoint_state eps[2];

	adapter_spec_parse(o, &s, NULL);
	make_ep(&eps[0], "a", 8000, true, false, "");
	make_ep(&eps[1], "b", 8001, false, true, "load failed: timed out");
	adapter_condition(&s, eps, 2, &c);
	old = json_loads("{\"conditions\":[{\"type\":\"Ready\",\"status\":\"False\",\"reason\":"
	                 "\"NoEndpoints\",\"lastTransitionTime\":\"2024-01-01T00:00:00Z\"},"
	                 "{\"type\":\"Degraded\",\"status\":\"True\"}]}",
	                 0, NULL);
	st = adapter_status_json(&s, eps, 2, &c, old, "2024-05-01T10:00:00Z");
	CHECK_EQ_INT(json_integer_value(json_object_get(st, "observedGeneration")), 3);
	CHECK_EQ_INT(json_integer_value(json_object_get(st, "totalEndpoints")), 2);
	CHECK_EQ_INT(json_integer_value(json_object_get(st, "readyEndpoints")), 1);
	ep = json_array_get(json_object_get(st, "endpoints"), 0);
	CHECK_EQ_STR(json_string_value(json_object_get(ep, "podName")), "a");
	CHECK_EQ_STR(json_string_value(json_object_get(ep, "address")), "10.0.0.0:8000");
	CHECK(json_is_true(json_object_get(ep, "ready")));
	CHECK_EQ_INT(strlen(json_string_value(json_object_get(ep, "sha256"))), 64);
	CHECK(json_object_get(ep, "message") == NULL);
	ep = json_array_get(json_object_get(st, "endpoints"), 1);
	CHECK_EQ_STR(json_string_value(json_object_get(ep, "message")), "load failed: timed out");
	CHECK(json_object_get(ep, "sha256") == NULL);
	cond = json_array_get(json_object_get(st, "conditions"), 0);
	CHECK_EQ_STR(json_string_value(json_object_get(cond, "reason")), "LoadFailed");
	CHECK_EQ_STR(json_string_value(json_object_get(cond, "status")), "False");
	/* still False: the transition time stays */
	CHECK_EQ_STR(json_string_value(json_object_get(cond, "lastTransitionTime")),
	             "2024-01-01T00:00:00Z");
	CHECK_EQ_INT(json_integer_value(json_object_get(cond, "observedGeneration")), 3);
	/* conditions of other types are kept */
	CHECK_EQ_STR(json_string_value(json_object_get(
	                 json_array_get(json_object_get(st, "conditions"), 1), "type")),
	             "Degraded");
	CHECK_EQ_STR(adapter_status_reason(st), "LoadFailed");
	json_decref(st);

	make_ep(&eps[1], "b", 8001, true, false, "");
	adapter_condition(&s, eps, 2, &c);
	st = adapter_status_json(&s, eps, 2, &c, old, "2024-05-01T10:00:00Z");
	cond = json_array_get(json_object_get(st, "conditions"), 0);
	CHECK_EQ_STR(json_string_value(json_object_get(cond, "status")), "True");
	CHECK_EQ_STR(json_string_value(json_object_get(cond, "lastTransitionTime")),
	             "2024-05-01T10:00:00Z");
	json_decref(st);
	json_decref(old);
	json_decref(o);
}

static void test_service_and_slices(void)
{
	json_t *o = adapter_obj(""), *svc, *slices, *sl, *ref;
	struct adapter_spec s;
	struct endpoint_state eps[4];

	adapter_spec_parse(o, &s, NULL);
	svc = adapter_service_json(&s, "sql");
	CHECK(json_object_get(json_object_get(svc, "spec"), "selector") == NULL);
	ref =
	    json_array_get(json_object_get(json_object_get(svc, "metadata"), "ownerReferences"), 0);
	CHECK_EQ_STR(json_string_value(json_object_get(ref, "uid")), "u-1");
	CHECK_EQ_STR(json_string_value(json_object_get(ref, "kind")), "LoraAdapter");
	CHECK(json_is_true(json_object_get(ref, "controller")));
	json_decref(svc);

	make_ep(&eps[0], "a", 8000, true, false, "");
	make_ep(&eps[1], "b", 8000, false, true, "x");
	make_ep(&eps[2], "c", 9000, true, false, "");
	make_ep(&eps[3], "d", 8000, true, false, "");
	slices = adapter_slices_json(&s, "sql", eps, 4);
	CHECK_EQ_INT(json_object_size(slices), 2); /* one per distinct port */
	sl = json_object_get(slices, "sql-8000");
	CHECK(sl != NULL);
	CHECK_EQ_INT(json_array_size(json_object_get(sl, "endpoints")), 2); /* a and d, not b */
	CHECK_EQ_STR(
	    json_string_value(json_object_get(
	        json_object_get(json_array_get(json_object_get(sl, "endpoints"), 1), "targetRef"),
	        "name")),
	    "d");
	CHECK_EQ_STR(json_string_value(
	                 json_object_get(json_object_get(json_object_get(sl, "metadata"), "labels"),
	                                 "kubernetes.io/service-name")),
	             "sql");
	CHECK_EQ_STR(json_string_value(json_object_get(sl, "addressType")), "IPv4");
	CHECK_EQ_INT(json_integer_value(
	                 json_object_get(json_array_get(json_object_get(sl, "ports"), 0), "port")),
	             8000);
	CHECK(json_object_get(slices, "sql-9000") != NULL);
	json_decref(slices);
	/* nothing ready, no slices */
	slices = adapter_slices_json(&s, "sql", &eps[1], 1);
	CHECK_EQ_INT(json_object_size(slices), 0);
	json_decref(slices);
	json_decref(o);
}

static void test_holdings(void)
{
	struct holdings *h;
	struct agent_lora l = {0}, got;
	json_t *listing, *live;
	char base[64];

	CHECK_OK(holdings_new(&h, NULL), &(struct lp_err){0});
	CHECK(!holdings_observe_restarts(h, "p1", 0));
	snprintf(l.source, sizeof(l.source), "s3://a");
	snprintf(l.sha256, sizeof(l.sha256), "abc");
	holdings_set(h, "p1", "sql", &l);
	holdings_set_base(h, "p1", "base-model");
	CHECK(holdings_get(h, "p1", "sql", &got));
	CHECK_EQ_STR(got.source, "s3://a");
	CHECK(holdings_base(h, "p1", base, sizeof(base)));
	CHECK_EQ_STR(base, "base-model");
	CHECK(!holdings_get(h, "p2", "sql", &got));

	/* the same restart count keeps the belief; a new one drops it */
	CHECK(!holdings_observe_restarts(h, "p1", 0));
	CHECK(holdings_get(h, "p1", "sql", &got));
	CHECK(holdings_observe_restarts(h, "p1", 1));
	CHECK(!holdings_get(h, "p1", "sql", &got));
	CHECK(!holdings_base(h, "p1", base, sizeof(base)));

	/* a verification replaces the belief with what the agent reports */
	holdings_set(h, "p1", "sql", &l);
	CHECK(!holdings_verified_within(h, "p1", 60));
	long long begin = holdings_verify_begin(h, "p1");
	listing =
	    json_loads("{\"chat\":{\"source\":\"hf://org/chat\",\"sha256\":\"ABCD\"}}", 0, NULL);
	holdings_set_verified(h, "p1", listing, begin);
	json_decref(listing);
	CHECK(holdings_verified_within(h, "p1", 60));
	CHECK(!holdings_get(h, "p1", "sql", &got)); /* the agent lost it */
	CHECK(holdings_get(h, "p1", "chat", &got));
	CHECK_EQ_STR(got.sha256, "abcd");

	/* a load and an unload that land while the list is in flight win
	 * over the list, which was taken before them */
	begin = holdings_verify_begin(h, "p1");
	holdings_set(h, "p1", "late", &l);
	holdings_forget(h, "p1", "chat");
	listing =
	    json_loads("{\"chat\":{\"source\":\"hf://org/chat\",\"sha256\":\"ABCD\"}}", 0, NULL);
	holdings_set_verified(h, "p1", listing, begin);
	json_decref(listing);
	CHECK(holdings_get(h, "p1", "late", &got));
	CHECK(!holdings_get(h, "p1", "chat", &got));
	/* the next verification trusts the agent again */
	begin = holdings_verify_begin(h, "p1");
	listing =
	    json_loads("{\"chat\":{\"source\":\"hf://org/chat\",\"sha256\":\"ABCD\"}}", 0, NULL);
	holdings_set_verified(h, "p1", listing, begin);
	json_decref(listing);
	CHECK(!holdings_get(h, "p1", "late", &got));
	CHECK(holdings_get(h, "p1", "chat", &got));

	holdings_set(h, "p2", "sql", &l);
	CHECK_EQ_INT(holdings_pods(h), 2);
	live = json_loads("{\"p2\":true}", 0, NULL);
	holdings_prune(h, live);
	json_decref(live);
	CHECK_EQ_INT(holdings_pods(h), 1);
	CHECK(holdings_get(h, "p2", "sql", &got));
	holdings_forget_pod(h, "p2");
	CHECK_EQ_INT(holdings_pods(h), 0);
	holdings_free(h);
}

int main(void)
{
	TEST_MAIN_BEGIN("test-reconcile");
	RUN(test_spec_defaults_and_hash);
	RUN(test_spec_problems_are_reported);
	RUN(test_service_names);
	RUN(test_pods);
	RUN(test_conditions);
	RUN(test_status_json);
	RUN(test_service_and_slices);
	RUN(test_holdings);
	TEST_MAIN_END();
}
