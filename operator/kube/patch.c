/* Patch builders; see patch.h. */
#include "operator/kube/patch.h"

#include <stdio.h>
#include <string.h>

int kube_json_pointer_escape(struct lp_buf *b, const char *key, struct lp_err *err)
{
	int rc = 0;

	for (; *key && !rc; key++) {
		if (*key == '~')
			rc = lp_buf_append(b, "~0", 2, err);
		else if (*key == '/')
			rc = lp_buf_append(b, "~1", 2, err);
		else
			rc = lp_buf_append(b, key, 1, err);
	}
	return rc ? rc : lp_buf_append(b, "", 0, err);
}

static json_t *finalizers(json_t *obj)
{
	json_t *f = json_object_get(json_object_get(obj, "metadata"), "finalizers");

	return json_is_array(f) ? f : NULL;
}

bool kube_has_finalizer(json_t *obj, const char *name)
{
	json_t *list = finalizers(obj), *v;
	size_t i;

	json_array_foreach(list, i, v)
	{
		const char *s = json_string_value(v);

		if (s && strcmp(s, name) == 0)
			return true;
	}
	return false;
}

json_t *kube_patch_add_finalizer(json_t *obj, const char *name)
{
	json_t *list = finalizers(obj), *patch;
	const char *rv;

	if (kube_has_finalizer(obj, name))
		return NULL;
	rv =
	    json_string_value(json_object_get(json_object_get(obj, "metadata"), "resourceVersion"));
	if (list && json_array_size(list) > 0)
		patch = json_pack("[{s:s, s:s, s:O}, {s:s, s:s, s:s}]", "op", "test", "path",
		                  "/metadata/finalizers", "value", list, "op", "add", "path",
		                  "/metadata/finalizers/-", "value", name);
	else
		patch = json_pack("[{s:s, s:s, s:s}, {s:s, s:s, s:[s]}]", "op", "test", "path",
		                  "/metadata/resourceVersion", "value", rv ? rv : "", "op", "add",
		                  "path", "/metadata/finalizers", "value", name);
	return patch;
}

json_t *kube_patch_remove_finalizer(json_t *obj, const char *name)
{
	json_t *list = finalizers(obj), *patch;
	size_t i;

	if (!kube_has_finalizer(obj, name))
		return NULL;
	patch = json_array();
	if (!patch)
		return NULL;
	for (i = json_array_size(list); i-- > 0;) {
		const char *s = json_string_value(json_array_get(list, i));
		char path[64];

		if (!s || strcmp(s, name) != 0)
			continue;
		snprintf(path, sizeof(path), "/metadata/finalizers/%zu", i);
		if (json_array_append_new(patch, json_pack("{s:s, s:s, s:s}", "op", "test", "path",
		                                           path, "value", name)) ||
		    json_array_append_new(patch,
		                          json_pack("{s:s, s:s}", "op", "remove", "path", path))) {
			json_decref(patch);
			return NULL;
		}
	}
	return patch;
}
