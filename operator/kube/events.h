/* Kubernetes Events (core/v1) about an object, as `kubectl describe`
 * shows them. */
#ifndef LP_OPERATOR_KUBE_EVENTS_H
#define LP_OPERATOR_KUBE_EVENTS_H

#include <jansson.h>

#include "common/err.h"
#include "operator/kube/client.h"

/* Builds the Event object (new reference) about `involved` (borrowed; its
 * apiVersion, kind, metadata name/namespace/uid/resourceVersion are
 * copied). type is "Normal" or "Warning"; reason is CamelCase; message
 * is cut to 1024 bytes. component/instance name the reporter. NULL when
 * involved has no name or memory runs out. */
json_t *kube_event_build(json_t *involved, const char *type, const char *reason,
                         const char *message, const char *component, const char *instance);

/* Builds and creates the event in the involved object's namespace. */
int kube_event_emit(struct kube_client *c, json_t *involved, const char *type, const char *reason,
                    const char *message, const char *component, const char *instance,
                    struct lp_err *err);

#endif
