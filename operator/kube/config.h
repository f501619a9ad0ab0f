/* Where the Kubernetes API is and how to authenticate to it: a kubeconfig
 * file (current context, or a named one) or the in-cluster service
 * account. The struct owns every string and blob in it. */
#ifndef LP_OPERATOR_KUBE_CONFIG_H
#define LP_OPERATOR_KUBE_CONFIG_H

#include <stdbool.h>
#include <stddef.h>

#include "common/err.h"

#define KUBE_SA_DIR "/var/run/secrets/kubernetes.io/serviceaccount"

struct kube_config {
	char *server;           /* "https://host:port", no trailing slash */
	char *namespace_;       /* namespace of the context / service account; may be NULL */
	char *context;          /* name of the context used; NULL in-cluster */
	bool insecure;          /* insecure-skip-tls-verify */
	char *ca_file;          /* certificate-authority, absolute path */
	unsigned char *ca_data; /* certificate-authority-data, decoded PEM */
	size_t ca_data_len;
	char *cert_file;          /* client-certificate */
	unsigned char *cert_data; /* client-certificate-data, decoded PEM */
	size_t cert_data_len;
	char *key_file;          /* client-key */
	unsigned char *key_data; /* client-key-data, decoded PEM */
	size_t key_data_len;
	char *token;      /* static bearer token (user.token) */
	char *token_file; /* bearer token re-read from here (user.tokenFile, in-cluster) */
};

/* Parses kubeconfig YAML text[0..len). Relative file paths are resolved
 * against base_dir (the kubeconfig's directory; NULL = as given). context
 * names the context to use; NULL or "" means current-context. Fills cfg
 * (zeroed first); on failure cfg holds nothing and err says which field of
 * which entry is wrong. */
int kube_config_parse(struct kube_config *cfg, const char *text, size_t len, const char *base_dir,
                      const char *context, struct lp_err *err);

/* Reads and parses the kubeconfig file at path (at most 4 MiB). */
int kube_config_load_file(struct kube_config *cfg, const char *path, const char *context,
                          struct lp_err *err);

/* In-cluster config: server from KUBERNETES_SERVICE_HOST/_PORT, token,
 * ca.crt and namespace under sa_dir (NULL = KUBE_SA_DIR). The token is
 * read from the file (token_file is set) so that rotation is noticed. */
int kube_config_in_cluster(struct kube_config *cfg, const char *sa_dir, struct lp_err *err);

/* What kubectl would use: path when given; else in-cluster when
 * KUBERNETES_SERVICE_HOST is set; else the first file of $KUBECONFIG;
 * else ~/.kube/config. */
int kube_config_auto(struct kube_config *cfg, const char *path, const char *context,
                     struct lp_err *err);

/* Frees everything cfg owns; cfg is zeroed and may be released again. */
void kube_config_release(struct kube_config *cfg);

#endif
