/* kubeconfig and in-cluster configuration; see config.h.
 *
 * The kubeconfig is parsed with libyaml's document API into a node tree,
 * then the three lists (contexts, clusters, users) are searched by name. */
#include "operator/kube/config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <yaml.h>

#include "common/buf.h"
#include "operator/kube/encoding.h"

#define KUBECONFIG_MAX (4u << 20)

void kube_config_release(struct kube_config *cfg)
{
	if (!cfg)
		return;
	free(cfg->server);
	free(cfg->namespace_);
	free(cfg->context);
	free(cfg->ca_file);
	free(cfg->ca_data);
	free(cfg->cert_file);
	free(cfg->cert_data);
	free(cfg->key_file);
	free(cfg->key_data);
	free(cfg->token);
	free(cfg->token_file);
	memset(cfg, 0, sizeof(*cfg));
}

static yaml_node_t *map_get(yaml_document_t *doc, yaml_node_t *map, const char *key)
{
	yaml_node_pair_t *pair;

	if (!map || map->type != YAML_MAPPING_NODE)
		return NULL;
	for (pair = map->data.mapping.pairs.start; pair < map->data.mapping.pairs.top; pair++) {
		yaml_node_t *k = yaml_document_get_node(doc, pair->key);

		if (k && k->type == YAML_SCALAR_NODE && k->data.scalar.length == strlen(key) &&
		    memcmp(k->data.scalar.value, key, k->data.scalar.length) == 0)
			return yaml_document_get_node(doc, pair->value);
	}
	return NULL;
}

/* The scalar's text, or NULL when node is absent, not a scalar, or empty
 * (YAML null). */
static const char *scalar(yaml_node_t *node)
{
	const char *s;

	if (!node || node->type != YAML_SCALAR_NODE)
		return NULL;
	s = (const char *)node->data.scalar.value;
	if (!*s || (node->data.scalar.style == YAML_PLAIN_SCALAR_STYLE &&
	            (strcmp(s, "null") == 0 || strcmp(s, "~") == 0)))
		return NULL;
	return s;
}

/* Finds the entry {name: <name>, <field>: {...}} in the list named list
 * and returns its <field> mapping. */
static yaml_node_t *named_entry(yaml_document_t *doc, yaml_node_t *root, const char *list,
                                const char *field, const char *name)
{
	yaml_node_t *seq = map_get(doc, root, list);
	yaml_node_item_t *it;

	if (!seq || seq->type != YAML_SEQUENCE_NODE)
		return NULL;
	for (it = seq->data.sequence.items.start; it < seq->data.sequence.items.top; it++) {
		yaml_node_t *entry = yaml_document_get_node(doc, *it);
		const char *n = scalar(map_get(doc, entry, "name"));

		if (n && strcmp(n, name) == 0) {
			yaml_node_t *v = map_get(doc, entry, field);

			return v ? v : entry; /* an entry without a body is an empty one */
		}
	}
	return NULL;
}

static int dup_str(char **dst, const char *s, struct lp_err *err)
{
	*dst = NULL;
	if (!s)
		return 0;
	*dst = strdup(s);
	return *dst ? 0 : lp_errf(err, -ENOMEM, "out of memory");
}

static int dup_path(char **dst, const char *s, const char *base_dir, struct lp_err *err)
{
	size_t n;

	*dst = NULL;
	if (!s)
		return 0;
	if (s[0] == '/' || !base_dir || !*base_dir)
		return dup_str(dst, s, err);
	n = strlen(base_dir) + strlen(s) + 2;
	*dst = malloc(n);
	if (!*dst)
		return lp_errf(err, -ENOMEM, "out of memory");
	snprintf(*dst, n, "%s/%s", base_dir, s);
	return 0;
}

static int decode_field(unsigned char **dst, size_t *dst_len, const char *s, const char *what,
                        const char *entry, struct lp_err *err)
{
	int rc;

	if (!s)
		return 0;
	rc = kube_base64_decode(s, strlen(s), dst, dst_len, err);
	if (rc)
		return lp_err_prefix(err, "'%s' of '%s'", what, entry);
	return 0;
}

static bool yaml_true(const char *s)
{
	return s && (strcasecmp(s, "true") == 0 || strcasecmp(s, "yes") == 0 ||
	             strcasecmp(s, "on") == 0 || strcmp(s, "1") == 0);
}

static int fill_cluster(struct kube_config *cfg, yaml_document_t *doc, yaml_node_t *cl,
                        const char *name, const char *base_dir, struct lp_err *err)
{
	const char *server = scalar(map_get(doc, cl, "server"));
	size_t n;
	int rc;

	if (!server)
		return lp_errf(err, -EINVAL, "cluster '%s' has no 'server'", name);
	if (strncmp(server, "https://", 8) != 0 && strncmp(server, "http://", 7) != 0)
		return lp_errf(err, -EINVAL, "cluster '%s': server '%.200s' is not an http(s) URL",
		               name, server);
	rc = dup_str(&cfg->server, server, err);
	if (rc)
		return rc;
	n = strlen(cfg->server);
	while (n > 0 && cfg->server[n - 1] == '/')
		cfg->server[--n] = '\0';
	cfg->insecure = yaml_true(scalar(map_get(doc, cl, "insecure-skip-tls-verify")));
	rc = dup_path(&cfg->ca_file, scalar(map_get(doc, cl, "certificate-authority")), base_dir,
	              err);
	if (!rc)
		rc = decode_field(&cfg->ca_data, &cfg->ca_data_len,
		                  scalar(map_get(doc, cl, "certificate-authority-data")),
		                  "certificate-authority-data", name, err);
	return rc;
}

static int fill_user(struct kube_config *cfg, yaml_document_t *doc, yaml_node_t *u,
                     const char *name, const char *base_dir, struct lp_err *err)
{
	int rc;

	if (map_get(doc, u, "exec"))
		return lp_errf(err, -ENOTSUP,
		               "user '%s' uses an exec credential plugin, which is not supported "
		               "(use a token, tokenFile or client certificate)",
		               name);
	if (map_get(doc, u, "auth-provider"))
		return lp_errf(err, -ENOTSUP,
		               "user '%s' uses an auth-provider, which is not supported", name);
	rc = dup_str(&cfg->token, scalar(map_get(doc, u, "token")), err);
	if (!rc)
		rc =
		    dup_path(&cfg->token_file, scalar(map_get(doc, u, "tokenFile")), base_dir, err);
	if (!rc)
		rc = dup_path(&cfg->cert_file, scalar(map_get(doc, u, "client-certificate")),
		              base_dir, err);
	if (!rc)
		rc = dup_path(&cfg->key_file, scalar(map_get(doc, u, "client-key")), base_dir, err);
	if (!rc)
		rc = decode_field(&cfg->cert_data, &cfg->cert_data_len,
		                  scalar(map_get(doc, u, "client-certificate-data")),
		                  "client-certificate-data", name, err);
	if (!rc)
		rc = decode_field(&cfg->key_data, &cfg->key_data_len,
		                  scalar(map_get(doc, u, "client-key-data")), "client-key-data",
		                  name, err);
	if (rc)
		return rc;
	if ((cfg->cert_file || cfg->cert_data) != (cfg->key_file || cfg->key_data))
		return lp_errf(
		    err, -EINVAL,
		    "user '%s' has a client certificate without a key or a key without a "
		    "certificate",
		    name);
	return 0;
}

int kube_config_parse(struct kube_config *cfg, const char *text, size_t len, const char *base_dir,
                      const char *context, struct lp_err *err)
{
	yaml_parser_t parser;
	yaml_document_t doc;
	yaml_node_t *root, *ctx, *cl, *user;
	const char *ctx_name, *cl_name, *user_name;
	int rc = 0;

	memset(cfg, 0, sizeof(*cfg));
	if (!yaml_parser_initialize(&parser))
		return lp_errf(err, -ENOMEM, "out of memory");
	yaml_parser_set_input_string(&parser, (const unsigned char *)text, len);
	if (!yaml_parser_load(&parser, &doc)) {
		rc = lp_errf(err, -EINVAL, "invalid YAML at line %zu: %s",
		             parser.problem_mark.line + 1,
		             parser.problem ? parser.problem : "parse error");
		goto out_parser;
	}
	root = yaml_document_get_root_node(&doc);
	if (!root || root->type != YAML_MAPPING_NODE) {
		rc = lp_errf(err, -EINVAL, "not a kubeconfig: the document is not a mapping");
		goto out_doc;
	}
	ctx_name = context && *context ? context : scalar(map_get(&doc, root, "current-context"));
	if (!ctx_name) {
		rc = lp_errf(err, -EINVAL, "no current-context set and no context given");
		goto out_doc;
	}
	ctx = named_entry(&doc, root, "contexts", "context", ctx_name);
	if (!ctx) {
		rc = lp_errf(err, -ENOENT, "context '%s' not found", ctx_name);
		goto out_doc;
	}
	cl_name = scalar(map_get(&doc, ctx, "cluster"));
	user_name = scalar(map_get(&doc, ctx, "user"));
	if (!cl_name) {
		rc = lp_errf(err, -EINVAL, "context '%s' names no cluster", ctx_name);
		goto out_doc;
	}
	cl = named_entry(&doc, root, "clusters", "cluster", cl_name);
	if (!cl) {
		rc = lp_errf(err, -ENOENT, "cluster '%s' of context '%s' not found", cl_name,
		             ctx_name);
		goto out_doc;
	}
	rc = dup_str(&cfg->context, ctx_name, err);
	if (!rc)
		rc = dup_str(&cfg->namespace_, scalar(map_get(&doc, ctx, "namespace")), err);
	if (!rc)
		rc = fill_cluster(cfg, &doc, cl, cl_name, base_dir, err);
	if (rc)
		goto out_doc;
	if (user_name) {
		user = named_entry(&doc, root, "users", "user", user_name);
		if (!user) {
			rc = lp_errf(err, -ENOENT, "user '%s' of context '%s' not found", user_name,
			             ctx_name);
			goto out_doc;
		}
		rc = fill_user(cfg, &doc, user, user_name, base_dir, err);
	}
out_doc:
	yaml_document_delete(&doc);
out_parser:
	yaml_parser_delete(&parser);
	if (rc)
		kube_config_release(cfg);
	return rc;
}

int kube_config_load_file(struct kube_config *cfg, const char *path, const char *context,
                          struct lp_err *err)
{
	struct lp_buf b;
	char *dir = NULL;
	const char *slash;
	int rc;

	memset(cfg, 0, sizeof(*cfg));
	lp_buf_init(&b, KUBECONFIG_MAX);
	rc = lp_buf_read_file(&b, path, KUBECONFIG_MAX, err);
	if (rc) {
		lp_err_prefix(err, "kubeconfig");
		goto out;
	}
	slash = strrchr(path, '/');
	if (slash) {
		dir = strndup(path, slash == path ? 1 : (size_t)(slash - path));
		if (!dir) {
			rc = lp_errf(err, -ENOMEM, "out of memory");
			goto out;
		}
	}
	rc = kube_config_parse(cfg, b.data, b.len, dir, context, err);
	if (rc)
		lp_err_prefix(err, "kubeconfig '%s'", path);
out:
	free(dir);
	lp_buf_release(&b);
	return rc;
}

static int read_trimmed(const char *path, char **out, struct lp_err *err)
{
	struct lp_buf b;
	int rc;

	*out = NULL;
	lp_buf_init(&b, 1 << 20);
	rc = lp_buf_read_file(&b, path, 1 << 20, err);
	if (rc) {
		lp_buf_release(&b);
		return rc;
	}
	while (b.len > 0 &&
	       (b.data[b.len - 1] == '\n' || b.data[b.len - 1] == '\r' || b.data[b.len - 1] == ' '))
		b.data[--b.len] = '\0';
	*out = lp_buf_detach(&b, NULL);
	return 0;
}

int kube_config_in_cluster(struct kube_config *cfg, const char *sa_dir, struct lp_err *err)
{
	const char *host = getenv("KUBERNETES_SERVICE_HOST");
	const char *port = getenv("KUBERNETES_SERVICE_PORT");
	char path[4096], server[512];
	int rc;

	memset(cfg, 0, sizeof(*cfg));
	if (!sa_dir)
		sa_dir = KUBE_SA_DIR;
	if (!host || !*host || !port || !*port)
		return lp_errf(
		    err, -ENOENT,
		    "not in a cluster: KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT "
		    "are not set");
	/* an IPv6 service address needs brackets in a URL */
	snprintf(server, sizeof(server), strchr(host, ':') ? "https://[%s]:%s" : "https://%s:%s",
	         host, port);
	rc = dup_str(&cfg->server, server, err);
	if (rc)
		goto fail;
	snprintf(path, sizeof(path), "%s/token", sa_dir);
	rc = dup_str(&cfg->token_file, path, err);
	if (rc)
		goto fail;
	rc = read_trimmed(path, &cfg->token, err); /* fail early when the account is missing */
	if (rc)
		goto fail;
	snprintf(path, sizeof(path), "%s/ca.crt", sa_dir);
	rc = dup_str(&cfg->ca_file, path, err);
	if (rc)
		goto fail;
	snprintf(path, sizeof(path), "%s/namespace", sa_dir);
	if (read_trimmed(path, &cfg->namespace_, NULL) == 0 && !cfg->namespace_[0]) {
		free(cfg->namespace_);
		cfg->namespace_ = NULL;
	}
	return 0;
fail:
	kube_config_release(cfg);
	return lp_err_prefix(err, "in-cluster config");
}

int kube_config_auto(struct kube_config *cfg, const char *path, const char *context,
                     struct lp_err *err)
{
	const char *env, *home, *host;
	char buf[4096];

	if (path && *path)
		return kube_config_load_file(cfg, path, context, err);
	host = getenv("KUBERNETES_SERVICE_HOST");
	if (host && *host)
		return kube_config_in_cluster(cfg, NULL, err);
	env = getenv("KUBECONFIG");
	if (env && *env) {
		const char *colon = strchr(env, ':');
		size_t n = colon ? (size_t)(colon - env) : strlen(env);

		if (n >= sizeof(buf))
			return lp_errf(err, -ENAMETOOLONG, "KUBECONFIG path too long");
		memcpy(buf, env, n);
		buf[n] = '\0';
		return kube_config_load_file(cfg, buf, context, err);
	}
	home = getenv("HOME");
	if (!home || !*home)
		return lp_errf(
		    err, -ENOENT,
		    "no kubeconfig: give --kubeconfig, set KUBECONFIG or HOME, or run in "
		    "a cluster");
	snprintf(buf, sizeof(buf), "%s/.kube/config", home);
	return kube_config_load_file(cfg, buf, context, err);
}
