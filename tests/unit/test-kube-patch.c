/* What the operator writes to the API: finalizer edits as JSON patches
 * guarded by test ops (so a concurrent edit makes the server refuse
 * rather than lose it), JSON-pointer escaping, Events with the fields
 * `kubectl describe` shows, RFC 3339 times (MicroTime for Leases), and
 * the watch reconnect backoff (0.8 s doubling to 30 s, jittered). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "operator/kube/backoff.h"
#include "operator/kube/encoding.h"
#include "operator/kube/events.h"
#include "operator/kube/patch.h"
#include "tests/test.h"

static char *dump(json_t *j)
{
	static char buf[4096];
	char *s = json_dumps(j, JSON_COMPACT);

	snprintf(buf, sizeof(buf), "%s", s ? s : "(null)");
	free(s);
	return buf;
}

static void test_add_finalizer(void)
{
	json_t *none =
	    json_loads("{\"metadata\":{\"name\":\"sql\",\"resourceVersion\":\"17\"}}", 0, NULL);
	json_t *other = json_loads("{\"metadata\":{\"name\":\"sql\",\"resourceVersion\":\"18\","
	                           "\"finalizers\":[\"example.com/x\"]}}",
	                           0, NULL);
	json_t *has =
	    json_loads("{\"metadata\":{\"finalizers\":[\"a\",\"loraplane.io/unload\"]}}", 0, NULL);
	json_t *p;

	p = kube_patch_add_finalizer(none, "loraplane.io/unload");
	CHECK_EQ_STR(dump(p), "[{\"op\":\"test\",\"path\":\"/metadata/resourceVersion\",\"value\":"
	                      "\"17\"},{\"op\":\"add\",\"path\":\"/metadata/finalizers\",\"value\":"
	                      "[\"loraplane.io/unload\"]}]");
	json_decref(p);
	p = kube_patch_add_finalizer(other, "loraplane.io/unload");
	CHECK_EQ_STR(dump(p), "[{\"op\":\"test\",\"path\":\"/metadata/finalizers\",\"value\":"
	                      "[\"example.com/x\"]},{\"op\":\"add\",\"path\":"
	                      "\"/metadata/finalizers/-\",\"value\":\"loraplane.io/unload\"}]");
	json_decref(p);
	CHECK(kube_has_finalizer(has, "loraplane.io/unload"));
	CHECK(!kube_has_finalizer(other, "loraplane.io/unload"));
	CHECK(kube_patch_add_finalizer(has, "loraplane.io/unload") == NULL);
	json_decref(none);
	json_decref(other);
	json_decref(has);
}

static void test_remove_finalizer(void)
{
	json_t *obj = json_loads("{\"metadata\":{\"finalizers\":[\"loraplane.io/unload\",\"x\","
	                         "\"loraplane.io/unload\"]}}",
	                         0, NULL);
	json_t *p = kube_patch_remove_finalizer(obj, "loraplane.io/unload");

	/* highest index first so the lower one stays valid */
	CHECK_EQ_STR(dump(p), "[{\"op\":\"test\",\"path\":\"/metadata/finalizers/2\",\"value\":"
	                      "\"loraplane.io/unload\"},{\"op\":\"remove\",\"path\":"
	                      "\"/metadata/finalizers/2\"},{\"op\":\"test\",\"path\":"
	                      "\"/metadata/finalizers/0\",\"value\":\"loraplane.io/unload\"},"
	                      "{\"op\":\"remove\",\"path\":\"/metadata/finalizers/0\"}]");
	json_decref(p);
	CHECK(kube_patch_remove_finalizer(obj, "absent") == NULL);
	json_decref(obj);
}

static void test_json_pointer(void)
{
	struct lp_buf b;

	lp_buf_init(&b, 256);
	CHECK_OK(kube_json_pointer_escape(&b, "loraplane.io/base-model~x", NULL),
	         &(struct lp_err){0});
	CHECK_EQ_STR(b.data, "loraplane.io~1base-model~0x");
	lp_buf_release(&b);
}

static void test_event(void)
{
	json_t *obj =
	    json_loads("{\"apiVersion\":\"loraplane.io/v1alpha1\",\"kind\":\"LoraAdapter\","
	               "\"metadata\":{\"name\":\"sql\",\"namespace\":\"team-a\",\"uid\":"
	               "\"u-1\",\"resourceVersion\":\"5\"}}",
	               0, NULL);
	json_t *ev = kube_event_build(obj, "Warning", "LoadFailed", "pod p: 500 boom",
	                              "loraplane-operator", "host-1");
	json_t *ref = json_object_get(ev, "involvedObject");
	json_t *ev2 = kube_event_build(obj, "Normal", "Ready", "ok", "c", NULL);
	const char *name =
	    json_string_value(json_object_get(json_object_get(ev, "metadata"), "name"));
	struct timespec t;

	CHECK(ev && ev2);
	CHECK(strncmp(name, "sql.", 4) == 0);
	CHECK(strcmp(name, json_string_value(
	                       json_object_get(json_object_get(ev2, "metadata"), "name"))) != 0);
	CHECK_EQ_STR(
	    json_string_value(json_object_get(json_object_get(ev, "metadata"), "namespace")),
	    "team-a");
	CHECK_EQ_STR(json_string_value(json_object_get(ref, "kind")), "LoraAdapter");
	CHECK_EQ_STR(json_string_value(json_object_get(ref, "uid")), "u-1");
	CHECK_EQ_STR(json_string_value(json_object_get(ref, "apiVersion")),
	             "loraplane.io/v1alpha1");
	CHECK_EQ_STR(json_string_value(json_object_get(ev, "type")), "Warning");
	CHECK_EQ_STR(json_string_value(json_object_get(ev, "reason")), "LoadFailed");
	CHECK_EQ_STR(json_string_value(json_object_get(ev, "message")), "pod p: 500 boom");
	CHECK_EQ_STR(json_string_value(json_object_get(json_object_get(ev, "source"), "component")),
	             "loraplane-operator");
	CHECK_EQ_STR(json_string_value(json_object_get(ev, "reportingInstance")), "host-1");
	CHECK_EQ_INT(json_integer_value(json_object_get(ev, "count")), 1);
	CHECK_OK(kube_time_parse(json_string_value(json_object_get(ev, "lastTimestamp")), &t, NULL),
	         &(struct lp_err){0});
	json_decref(ev);
	json_decref(ev2);
	CHECK(kube_event_build(json_object_get(obj, "nothing"), "Normal", "R", "m", "c", NULL) ==
	      NULL);
	json_decref(obj);
}

static void test_times(void)
{
	struct timespec t = {.tv_sec = 1714557600, .tv_nsec = 123456789};
	struct lp_err err = {0};
	char s[40];

	kube_time_format(&t, false, s, sizeof(s));
	CHECK_EQ_STR(s, "2024-05-01T10:00:00Z");
	kube_time_format(&t, true, s, sizeof(s));
	CHECK_EQ_STR(s, "2024-05-01T10:00:00.123456Z");
	CHECK_OK(kube_time_parse("2024-05-01T10:00:00.123456Z", &t, &err), &err);
	CHECK_EQ_INT(t.tv_sec, 1714557600);
	CHECK_EQ_INT(t.tv_nsec, 123456000);
	CHECK_OK(kube_time_parse("2024-05-01T12:30:00+02:30", &t, &err), &err);
	CHECK_EQ_INT(t.tv_sec, 1714557600);
	CHECK_EQ_INT(kube_time_parse("2024-05-01 10:00:00", &t, &err), -EINVAL);
	CHECK(strstr(err.msg, "invalid RFC 3339 time '2024-05-01 10:00:00'") != NULL);
	CHECK_EQ_INT(kube_time_parse("2024-13-01T10:00:00Z", &t, &err), -EINVAL);
	CHECK_EQ_INT(kube_time_parse("2024-05-01T10:00:00", &t, &err), -EINVAL);
}

static void test_watch_backoff(void)
{
	struct kube_backoff b;
	double expect = 0.8, d;
	int i;

	kube_backoff_init(&b);
	for (i = 0; i < 12; i++) {
		d = kube_backoff_next(&b);
		/* jitter only lengthens, by at most 20%, and never past the cap */
		CHECK_MSG(d >= (expect < 30 ? expect : 30) - 1e-9 && d <= expect * 1.2 + 1e-9 &&
		              d <= 30 + 1e-9,
		          "step %d: %.3f for base %.3f", i, d, expect);
		expect = expect * 2 > 30 ? 30 : expect * 2;
	}
	kube_backoff_reset(&b);
	d = kube_backoff_next(&b);
	CHECK(d >= 0.8 && d <= 0.96 + 1e-9);
}

static void test_sha256_hex(void)
{
	char hex[65];

	kube_sha256_hex("meta-llama/Llama-3.2-3B-Instruct", 32, hex);
	CHECK_EQ_INT(strlen(hex), 64);
	kube_sha256_hex("abc", 3, hex);
	CHECK_EQ_STR(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

int main(void)
{
	TEST_MAIN_BEGIN("test-kube-patch");
	RUN(test_add_finalizer);
	RUN(test_remove_finalizer);
	RUN(test_json_pointer);
	RUN(test_event);
	RUN(test_times);
	RUN(test_watch_backoff);
	RUN(test_sha256_hex);
	TEST_MAIN_END();
}
