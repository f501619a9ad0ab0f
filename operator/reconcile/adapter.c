/* LoraAdapter and pod parsing, naming and status building; see adapter.h. */
#include "operator/reconcile/adapter.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "operator/kube/encoding.h"
#include "operator/kube/patch.h"

static void copy_str(char *dst, size_t size, const char *src)
{
	snprintf(dst, size, "%s", src ? src : "");
}

static const char *meta_str(json_t *obj, const char *field)
{
	return json_string_value(json_object_get(json_object_get(obj, "metadata"), field));
}

void adapter_base_hash(const char *base_model, char out[9])
{
	char hex[65];

	kube_sha256_hex(base_model, strlen(base_model), hex);
	memcpy(out, hex, 8);
	out[8] = '\0';
}

int adapter_spec_parse(json_t *obj, struct adapter_spec *s, struct lp_err *err)
{
	json_t *spec = json_object_get(obj, "spec"), *src = json_object_get(spec, "source");
	json_t *svc = json_object_get(spec, "service");
	const char *name = meta_str(obj, "name"), *ns = meta_str(obj, "namespace");
	const char *model = json_string_value(json_object_get(spec, "modelName"));
	const char *base = json_string_value(json_object_get(spec, "baseModelName"));
	const char *type = json_string_value(json_object_get(spec, "modelType"));
	const char *uri = json_string_value(json_object_get(src, "uri"));
	const char *sha = json_string_value(json_object_get(src, "sha256"));
	const char *secret =
	    json_string_value(json_object_get(json_object_get(src, "secretRef"), "name"));
	json_t *enabled = json_object_get(svc, "enabled");
	json_t *gen = json_object_get(json_object_get(obj, "metadata"), "generation");
	json_t *ogen = json_object_get(json_object_get(obj, "status"), "observedGeneration");
	size_t i;

	memset(s, 0, sizeof(*s));
	if (!name || !*name || !ns || !*ns)
		return lp_errf(err, -EINVAL, "LoraAdapter without a name or namespace");
	copy_str(s->ns, sizeof(s->ns), ns);
	copy_str(s->name, sizeof(s->name), name);
	copy_str(s->uid, sizeof(s->uid), meta_str(obj, "uid"));
	s->generation = json_is_integer(gen) ? json_integer_value(gen) : 0;
	s->observed_generation = json_is_integer(ogen) ? json_integer_value(ogen) : 0;
	s->deleting = meta_str(obj, "deletionTimestamp") != NULL;
	s->has_finalizer = kube_has_finalizer(obj, LP_FINALIZER);
	s->service_enabled = !json_is_false(enabled);
	copy_str(s->lora_name, sizeof(s->lora_name), model && *model ? model : name);
	copy_str(s->base_model, sizeof(s->base_model), base);
	copy_str(s->uri, sizeof(s->uri), uri);
	copy_str(s->sha256, sizeof(s->sha256), sha);
	copy_str(s->secret, sizeof(s->secret), secret);
	for (i = 0; s->sha256[i]; i++)
		s->sha256[i] = (char)tolower((unsigned char)s->sha256[i]);
	if (base && *base)
		adapter_base_hash(base, s->base_hash);

	if (!base || !*base)
		snprintf(s->invalid, sizeof(s->invalid), "spec.baseModelName is required");
	else if (strlen(base) >= sizeof(s->base_model))
		snprintf(s->invalid, sizeof(s->invalid), "spec.baseModelName is too long");
	else if (!uri || !*uri)
		snprintf(s->invalid, sizeof(s->invalid), "spec.source.uri is required");
	else if (strlen(uri) >= sizeof(s->uri))
		snprintf(s->invalid, sizeof(s->invalid), "spec.source.uri is too long");
	else if (type && *type && strcmp(type, "lora") != 0 && strcmp(type, "adapter") != 0)
		snprintf(s->invalid, sizeof(s->invalid),
		         "spec.modelType '%.64s' is not supported (lora or adapter)", type);
	else if (model && strlen(model) >= sizeof(s->lora_name))
		snprintf(s->invalid, sizeof(s->invalid), "spec.modelName is longer than 128");
	else if (sha && *sha && (strlen(sha) != 64 || strspn(sha, "0123456789abcdefABCDEF") != 64))
		snprintf(s->invalid, sizeof(s->invalid),
		         "spec.source.sha256 must be 64 hex characters");
	else if (secret && strlen(secret) >= sizeof(s->secret))
		snprintf(s->invalid, sizeof(s->invalid), "spec.source.secretRef.name is too long");
	return 0;
}

static bool dns1035_label(const char *s)
{
	size_t n = strlen(s), i;

	if (n == 0 || n > 63 || !(s[0] >= 'a' && s[0] <= 'z') || s[n - 1] == '-')
		return false;
	for (i = 0; i < n; i++)
		if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= '0' && s[i] <= '9') || s[i] == '-'))
			return false;
	return true;
}

void adapter_service_name(const char *name, char *out, size_t size)
{
	char buf[64], hex[65];
	size_t n = 0, i;

	if (dns1035_label(name)) {
		snprintf(out, size, "%s", name);
		return;
	}
	kube_sha256_hex(name, strlen(name), hex);
	if (!(name[0] >= 'a' && name[0] <= 'z') && !(name[0] >= 'A' && name[0] <= 'Z')) {
		memcpy(buf, "lora-", 5);
		n = 5;
	}
	/* room for "-" and 8 hex after at most 54 characters */
	for (i = 0; name[i] && n < 54; i++) {
		char c = (char)tolower((unsigned char)name[i]);

		buf[n++] = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ? c : '-';
	}
	while (n > 0 && buf[n - 1] == '-')
		n--;
	buf[n] = '\0';
	snprintf(out, size, "%s-%.8s", buf, hex);
}

static int container_port(json_t *pod, const char *port_name, int dflt)
{
	json_t *containers = json_object_get(json_object_get(pod, "spec"), "containers"), *c, *p;
	size_t i, j;

	json_array_foreach(containers, i, c)
	{
		json_array_foreach(json_object_get(c, "ports"), j, p)
		{
			const char *n = json_string_value(json_object_get(p, "name"));
			json_t *num = json_object_get(p, "containerPort");

			if (n && strcmp(n, port_name) == 0 && json_is_integer(num) &&
			    json_integer_value(num) > 0 && json_integer_value(num) < 65536)
				return (int)json_integer_value(num);
		}
	}
	return dflt;
}

bool pod_info_parse(json_t *pod, struct pod_info *p)
{
	json_t *status = json_object_get(pod, "status"), *c;
	json_t *labels = json_object_get(json_object_get(pod, "metadata"), "labels");
	json_t *annots = json_object_get(json_object_get(pod, "metadata"), "annotations");
	const char *phase = json_string_value(json_object_get(status, "phase"));
	size_t i;

	memset(p, 0, sizeof(*p));
	if (!meta_str(pod, "name") || !meta_str(pod, "uid"))
		return false;
	copy_str(p->ns, sizeof(p->ns), meta_str(pod, "namespace"));
	copy_str(p->name, sizeof(p->name), meta_str(pod, "name"));
	copy_str(p->uid, sizeof(p->uid), meta_str(pod, "uid"));
	copy_str(p->ip, sizeof(p->ip), json_string_value(json_object_get(status, "podIP")));
	copy_str(p->base_hash, sizeof(p->base_hash),
	         json_string_value(json_object_get(labels, LP_LABEL_BASE_HASH)));
	copy_str(p->base_model, sizeof(p->base_model),
	         json_string_value(json_object_get(annots, LP_ANNOT_BASE_MODEL)));
	p->http_port = container_port(pod, "http", LP_DEFAULT_HTTP);
	p->admin_port = container_port(pod, "admin", LP_DEFAULT_ADMIN);
	p->running = phase && strcmp(phase, "Running") == 0 && !meta_str(pod, "deletionTimestamp");
	json_array_foreach(json_object_get(status, "conditions"), i, c)
	{
		const char *t = json_string_value(json_object_get(c, "type"));
		const char *st = json_string_value(json_object_get(c, "status"));

		if (t && st && strcmp(t, "Ready") == 0)
			p->ready = strcmp(st, "True") == 0;
	}
	json_array_foreach(json_object_get(status, "containerStatuses"), i, c)
	{
		json_t *n = json_object_get(c, "restartCount");

		if (json_is_integer(n))
			p->restarts += (int)json_integer_value(n);
	}
	return true;
}

bool pod_serves(const struct pod_info *p, const struct adapter_spec *s)
{
	return s->base_hash[0] && strcmp(p->ns, s->ns) == 0 &&
	       strcmp(p->base_hash, s->base_hash) == 0 && strcmp(p->base_model, s->base_model) == 0;
}

const char *adapter_reason_name(enum adapter_reason r)
{
	switch (r) {
	case ADAPTER_ALL_READY:
		return "AllEndpointsReady";
	case ADAPTER_PARTIAL:
		return "PartiallyReady";
	case ADAPTER_NO_ENDPOINTS:
		return "NoEndpoints";
	case ADAPTER_LOAD_FAILED:
		return "LoadFailed";
	case ADAPTER_UNLOADING:
		return "Unloading";
	}
	return "Unknown";
}

void adapter_condition(const struct adapter_spec *s, const struct endpoint_state *eps, size_t n,
                       struct adapter_condition *c)
{
	const struct endpoint_state *first_bad = NULL, *first_failed = NULL;
	size_t ready = 0, i;

	memset(c, 0, sizeof(*c));
	if (s->deleting) {
		c->reason = ADAPTER_UNLOADING;
		snprintf(c->message, sizeof(c->message), "unloading '%s' from %zu pods",
		         s->lora_name, n);
		return;
	}
	if (s->invalid[0]) {
		c->reason = ADAPTER_LOAD_FAILED;
		snprintf(c->message, sizeof(c->message), "%s", s->invalid);
		return;
	}
	if (n == 0) {
		c->reason = ADAPTER_NO_ENDPOINTS;
		snprintf(c->message, sizeof(c->message),
		         "no running agent pods serve base model '%.200s'", s->base_model);
		return;
	}
	for (i = 0; i < n; i++) {
		if (eps[i].ready) {
			ready++;
			continue;
		}
		if (!first_bad)
			first_bad = &eps[i];
		if (eps[i].failed && !first_failed)
			first_failed = &eps[i];
	}
	if (ready == n) {
		c->status = true;
		c->reason = ADAPTER_ALL_READY;
		snprintf(c->message, sizeof(c->message), "%zu/%zu endpoints ready", ready, n);
		return;
	}
	if (first_failed)
		first_bad = first_failed;
	c->reason = first_failed ? ADAPTER_LOAD_FAILED : ADAPTER_PARTIAL;
	snprintf(c->message, sizeof(c->message), "%zu/%zu endpoints ready; pod %.100s: %.250s",
	         ready, n, first_bad->pod.name, first_bad->message);
}

static json_t *find_condition(json_t *status, const char *type)
{
	json_t *c;
	size_t i;

	json_array_foreach(json_object_get(status, "conditions"), i, c)
	{
		const char *t = json_string_value(json_object_get(c, "type"));

		if (t && strcmp(t, type) == 0)
			return c;
	}
	return NULL;
}

const char *adapter_status_reason(json_t *status)
{
	return json_string_value(json_object_get(find_condition(status, "Ready"), "reason"));
}

json_t *adapter_status_json(const struct adapter_spec *s, const struct endpoint_state *eps,
                            size_t n, const struct adapter_condition *c, json_t *old_status,
                            const char *now)
{
	json_t *st, *list, *conds, *old_ready = find_condition(old_status, "Ready"), *oc;
	const char *cstatus = c->status ? "True" : "False";
	const char *old_st = json_string_value(json_object_get(old_ready, "status"));
	const char *old_time = json_string_value(json_object_get(old_ready, "lastTransitionTime"));
	size_t i, ready = 0;

	list = json_array();
	conds = json_array();
	st = json_object();
	if (!list || !conds || !st)
		goto fail;
	for (i = 0; i < n; i++) {
		char addr[96];
		json_t *e;

		if (eps[i].ready)
			ready++;
		snprintf(addr, sizeof(addr), strchr(eps[i].pod.ip, ':') ? "[%s]:%d" : "%s:%d",
		         eps[i].pod.ip, eps[i].pod.http_port);
		e = json_pack("{s:s, s:s, s:b}", "podName", eps[i].pod.name, "address",
		              eps[i].pod.ip[0] ? addr : "", "ready", eps[i].ready);
		if (!e)
			goto fail;
		if (eps[i].sha256[0])
			json_object_set_new(e, "sha256", json_string(eps[i].sha256));
		if (eps[i].message[0])
			json_object_set_new(e, "message", json_string(eps[i].message));
		json_array_append_new(list, e);
	}
	json_array_append_new(
	    conds, json_pack("{s:s, s:s, s:s, s:s, s:s, s:I}", "type", "Ready", "status", cstatus,
	                     "reason", adapter_reason_name(c->reason), "message", c->message,
	                     "lastTransitionTime",
	                     old_st && old_time && strcmp(old_st, cstatus) == 0 ? old_time : now,
	                     "observedGeneration", (json_int_t)s->generation));
	json_array_foreach(json_object_get(old_status, "conditions"), i, oc)
	{
		const char *t = json_string_value(json_object_get(oc, "type"));

		if (t && strcmp(t, "Ready") != 0)
			json_array_append(conds, oc);
	}
	json_object_set_new(st, "observedGeneration", json_integer(s->generation));
	if (s->lora_name[0])
		json_object_set_new(st, "modelName", json_string(s->lora_name));
	json_object_set_new(st, "totalEndpoints", json_integer((json_int_t)n));
	json_object_set_new(st, "readyEndpoints", json_integer((json_int_t)ready));
	json_object_set_new(st, "endpoints", list);
	json_object_set_new(st, "conditions", conds);
	return st;
fail:
	json_decref(list);
	json_decref(conds);
	json_decref(st);
	return NULL;
}

json_t *adapter_owner_ref(const struct adapter_spec *s)
{
	return json_pack("{s:s, s:s, s:s, s:s, s:b, s:b}", "apiVersion", LP_API_VERSION, "kind",
	                 "LoraAdapter", "name", s->name, "uid", s->uid, "controller", 1,
	                 "blockOwnerDeletion", 1);
}

json_t *adapter_service_json(const struct adapter_spec *s, const char *svc_name)
{
	return json_pack("{s:s, s:s, s:{s:s, s:s, s:{s:s, s:s}, s:[o]}, "
	                 "s:{s:[{s:s, s:s, s:i, s:i}]}}",
	                 "apiVersion", "v1", "kind", "Service", "metadata", "name", svc_name,
	                 "namespace", s->ns, "labels", "app.kubernetes.io/managed-by",
	                 LP_MANAGED_BY, LP_LABEL_ADAPTER, s->name, "ownerReferences",
	                 adapter_owner_ref(s), "spec", "ports", "name", "http", "protocol", "TCP",
	                 "port", 80, "targetPort", LP_DEFAULT_HTTP);
}

json_t *adapter_slices_json(const struct adapter_spec *s, const char *svc_name,
                            const struct endpoint_state *eps, size_t n)
{
	json_t *out = json_object();
	size_t i;

	if (!out)
		return NULL;
	for (i = 0; i < n; i++) {
		char name[96];
		json_t *slice, *ep;

		if (!eps[i].ready || !eps[i].pod.ip[0])
			continue;
		snprintf(name, sizeof(name), "%s-%d", svc_name, eps[i].pod.http_port);
		slice = json_object_get(out, name);
		if (!slice) {
			slice = json_pack("{s:s, s:s, s:{s:s, s:s, s:{s:s, s:s, s:s}, s:[o]}, s:s, "
			                  "s:[{s:s, s:s, s:i}], s:[]}",
			                  "apiVersion", "discovery.k8s.io/v1", "kind",
			                  "EndpointSlice", "metadata", "name", name, "namespace",
			                  s->ns, "labels", "kubernetes.io/service-name", svc_name,
			                  "endpointslice.kubernetes.io/managed-by", LP_MANAGED_BY,
			                  LP_LABEL_ADAPTER, s->name, "ownerReferences",
			                  adapter_owner_ref(s), "addressType",
			                  strchr(eps[i].pod.ip, ':') ? "IPv6" : "IPv4", "ports",
			                  "name", "http", "protocol", "TCP", "port",
			                  eps[i].pod.http_port, "endpoints");
			if (!slice || json_object_set_new(out, name, slice))
				goto fail;
		}
		ep = json_pack("{s:[s], s:{s:b, s:b, s:b}, s:{s:s, s:s, s:s, s:s}}", "addresses",
		               eps[i].pod.ip, "conditions", "ready", 1, "serving", 1, "terminating",
		               0, "targetRef", "kind", "Pod", "namespace", eps[i].pod.ns, "name",
		               eps[i].pod.name, "uid", eps[i].pod.uid);
		if (!ep || json_array_append_new(json_object_get(slice, "endpoints"), ep))
			goto fail;
	}
	return out;
fail:
	json_decref(out);
	return NULL;
}
