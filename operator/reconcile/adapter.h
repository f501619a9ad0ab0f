/* The pure parts of reconciling a LoraAdapter (docs/operator.md): reading
 * the resource and agent pods out of their JSON, deciding which pods
 * serve a resource, naming the per-adapter Service, and building the
 * status, Ready condition, Service and EndpointSlices from what the
 * agents answered. No I/O here: reconcile.c does the talking. */
#ifndef LP_OPERATOR_RECONCILE_ADAPTER_H
#define LP_OPERATOR_RECONCILE_ADAPTER_H

#include <stdbool.h>
#include <stddef.h>

#include <jansson.h>

#include "common/err.h"

#define LP_FINALIZER        "loraplane.io/unload"
#define LP_LABEL_BASE_HASH  "loraplane.io/base-model-hash"
#define LP_ANNOT_BASE_MODEL "loraplane.io/base-model"
#define LP_LABEL_ADAPTER    "loraplane.io/adapter"
#define LP_MANAGED_BY       "loraplane-operator"
#define LP_API_VERSION      "loraplane.io/v1alpha1"
#define LP_DEFAULT_HTTP     8000
#define LP_DEFAULT_ADMIN    8001

/* A LoraAdapter as the reconciler needs it. */
struct adapter_spec {
	char ns[64];
	char name[254];
	char uid[64];
	long long generation;
	long long observed_generation; /* status.observedGeneration, 0 if none */
	char lora_name[129];           /* spec.modelName, default metadata.name */
	char base_model[256];          /* spec.baseModelName */
	char base_hash[9];             /* first 8 hex of sha256(baseModelName) */
	char uri[1024];                /* spec.source.uri */
	char sha256[65];               /* spec.source.sha256, lowercase, or "" */
	char secret[254];              /* spec.source.secretRef.name, or "" */
	bool service_enabled;          /* spec.service.enabled, default true */
	bool deleting;                 /* metadata.deletionTimestamp set */
	bool has_finalizer;
	char invalid[256]; /* why the spec cannot be acted on, or "" */
};

/* Reads obj into s. Fails (-EINVAL) only without a name/namespace; a
 * spec the operator cannot act on is reported in s->invalid. */
int adapter_spec_parse(json_t *obj, struct adapter_spec *s, struct lp_err *err);

/* First 8 hex digits of sha256(base_model). */
void adapter_base_hash(const char *base_model, char out[9]);

/* The Service name for resource `name`: the name itself when it is a
 * valid DNS-1035 label; otherwise a sanitised form ("lora-" prefix when
 * it does not start with a letter) cut to fit and suffixed with 8 hex of
 * sha256(name), so that distinct names never share a Service. */
void adapter_service_name(const char *name, char *out, size_t size);

/* An agent pod as the reconciler needs it. */
struct pod_info {
	char ns[64];
	char name[254];
	char uid[64];
	char ip[64];    /* status.podIP, "" when not assigned */
	int http_port;  /* container port named "http", default 8000 */
	int admin_port; /* container port named "admin", default 8001 */
	bool running;   /* phase Running and not terminating: counts toward TOTAL */
	bool ready;     /* condition Ready is True */
	int restarts;   /* sum of the containers' restartCount */
	char base_hash[9];
	char base_model[256];
};

/* False when pod has no name or uid. */
bool pod_info_parse(json_t *pod, struct pod_info *p);

/* True when p is an agent pod of s's base model: same namespace, label
 * hash and annotation. */
bool pod_serves(const struct pod_info *p, const struct adapter_spec *s);

/* What reconciling found for one pod. */
struct endpoint_state {
	struct pod_info pod;
	bool loaded;       /* the agent holds the wanted source (and digest) */
	bool ready;        /* loaded and the pod is Ready: traffic may go there */
	bool failed;       /* an agent call failed or the base model is wrong */
	char sha256[65];   /* digest the agent reports */
	char message[256]; /* why not ready, "" when ready */
};

enum adapter_reason {
	ADAPTER_ALL_READY,    /* AllEndpointsReady */
	ADAPTER_PARTIAL,      /* PartiallyReady */
	ADAPTER_NO_ENDPOINTS, /* NoEndpoints */
	ADAPTER_LOAD_FAILED,  /* LoadFailed */
	ADAPTER_UNLOADING,    /* Unloading */
};

const char *adapter_reason_name(enum adapter_reason r);

struct adapter_condition {
	bool status; /* Ready True/False */
	enum adapter_reason reason;
	char message[512];
};

/* The Ready condition for eps[0..n) of s (a spec problem in s->invalid
 * is reported as LoadFailed; s->deleting as Unloading). */
void adapter_condition(const struct adapter_spec *s, const struct endpoint_state *eps, size_t n,
                       struct adapter_condition *c);

/* The status object: observedGeneration, totalEndpoints, readyEndpoints,
 * endpoints[] (sorted by pod name as given), conditions[] with Ready
 * (lastTransitionTime kept from old_status when the Ready status did not
 * change; other condition types kept as they were). now is RFC 3339.
 * Returns a new reference. */
json_t *adapter_status_json(const struct adapter_spec *s, const struct endpoint_state *eps,
                            size_t n, const struct adapter_condition *c, json_t *old_status,
                            const char *now);

/* The Ready condition's reason in a status object, or NULL. */
const char *adapter_status_reason(json_t *status);

/* The owner reference to the resource obj (controller, blocks deletion). */
json_t *adapter_owner_ref(const struct adapter_spec *s);

/* The selector-less Service for the adapter (new reference). */
json_t *adapter_service_json(const struct adapter_spec *s, const char *svc_name);

/* EndpointSlices listing exactly the ready endpoints: one per distinct
 * http port, named "<svc>-<port>". Returns a new object name -> slice
 * (empty when nothing is ready). */
json_t *adapter_slices_json(const struct adapter_spec *s, const char *svc_name,
                            const struct endpoint_state *eps, size_t n);

#endif
