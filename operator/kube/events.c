/* Events; see events.h. */
#include "operator/kube/events.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "operator/kube/encoding.h"

json_t *kube_event_build(json_t *involved, const char *type, const char *reason,
                         const char *message, const char *component, const char *instance)
{
	static atomic_uint counter;
	json_t *meta = json_object_get(involved, "metadata"), *ev, *ref;
	const char *name = json_string_value(json_object_get(meta, "name"));
	const char *ns = json_string_value(json_object_get(meta, "namespace"));
	const char *uid = json_string_value(json_object_get(meta, "uid"));
	const char *rv = json_string_value(json_object_get(meta, "resourceVersion"));
	const char *api = json_string_value(json_object_get(involved, "apiVersion"));
	const char *kind = json_string_value(json_object_get(involved, "kind"));
	char evname[300], now[40], msg[1025];
	struct timespec ts;

	if (!name)
		return NULL;
	clock_gettime(CLOCK_REALTIME, &ts);
	/* unique per reporter: the object's name, the time, a counter */
	snprintf(evname, sizeof(evname), "%.200s.%llx%04x", name,
	         (unsigned long long)ts.tv_sec * 1000000000ull + (unsigned long long)ts.tv_nsec,
	         atomic_fetch_add(&counter, 1) & 0xffffu);
	kube_time_format(&ts, false, now, sizeof(now));
	snprintf(msg, sizeof(msg), "%s", message ? message : "");

	ref = json_pack("{s:s}", "name", name);
	if (!ref)
		return NULL;
	if (ns)
		json_object_set_new(ref, "namespace", json_string(ns));
	if (uid)
		json_object_set_new(ref, "uid", json_string(uid));
	if (rv)
		json_object_set_new(ref, "resourceVersion", json_string(rv));
	if (api)
		json_object_set_new(ref, "apiVersion", json_string(api));
	if (kind)
		json_object_set_new(ref, "kind", json_string(kind));
	ev = json_pack("{s:s, s:s, s:{s:s}, s:o, s:s, s:s, s:s, s:{s:s}, s:s, s:s, s:i, s:s, s:s}",
	               "apiVersion", "v1", "kind", "Event", "metadata", "name", evname,
	               "involvedObject", ref, "type", type, "reason", reason, "message", msg,
	               "source", "component", component, "firstTimestamp", now, "lastTimestamp",
	               now, "count", 1, "reportingComponent", component, "reportingInstance",
	               instance ? instance : component);
	if (ev && ns)
		json_object_set_new(json_object_get(ev, "metadata"), "namespace", json_string(ns));
	return ev;
}

int kube_event_emit(struct kube_client *c, json_t *involved, const char *type, const char *reason,
                    const char *message, const char *component, const char *instance,
                    struct lp_err *err)
{
	json_t *ev = kube_event_build(involved, type, reason, message, component, instance);
	const char *ns;
	struct lp_buf path;
	int rc;

	if (!ev)
		return lp_errf(err, -EINVAL, "cannot build an event: the object has no name");
	ns = json_string_value(json_object_get(json_object_get(ev, "metadata"), "namespace"));
	lp_buf_init(&path, 1024);
	rc = kube_path(&path, &KUBE_GVR_EVENTS, ns ? ns : "default", NULL, NULL, err);
	if (!rc)
		rc = kube_create(c, path.data, ev, NULL, err);
	lp_buf_release(&path);
	json_decref(ev);
	return rc;
}
