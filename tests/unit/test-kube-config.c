/* kubeconfig and in-cluster configuration as kubectl users write them:
 * current context, named contexts, token / tokenFile / client
 * certificates as files (relative to the kubeconfig) or base64 data,
 * CA file or data, insecure-skip-tls-verify, and clear errors for what
 * is wrong or unsupported. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "operator/kube/config.h"
#include "operator/kube/encoding.h"
#include "tests/test.h"

static const char *KC = "apiVersion: v1\n"
                        "kind: Config\n"
                        "current-context: dev\n"
                        "clusters:\n"
                        "- name: dev-cluster\n"
                        "  cluster:\n"
                        "    server: https://10.0.0.1:6443/\n"
                        "    certificate-authority-data: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==\n"
                        "- name: prod-cluster\n"
                        "  cluster:\n"
                        "    server: https://prod.example:443\n"
                        "    certificate-authority: certs/ca.pem\n"
                        "    insecure-skip-tls-verify: true\n"
                        "contexts:\n"
                        "- name: dev\n"
                        "  context:\n"
                        "    cluster: dev-cluster\n"
                        "    user: dev-user\n"
                        "    namespace: team-a\n"
                        "- name: prod\n"
                        "  context: {cluster: prod-cluster, user: prod-user}\n"
                        "users:\n"
                        "- name: dev-user\n"
                        "  user:\n"
                        "    token: abc.def\n"
                        "- name: prod-user\n"
                        "  user:\n"
                        "    client-certificate-data: aGVsbG8gY2VydA==\n"
                        "    client-key: /abs/key.pem\n"
                        "    tokenFile: tok\n";

static void test_current_context_token_and_ca_data(void)
{
	struct kube_config c;
	struct lp_err err = {0};

	CHECK_OK(kube_config_parse(&c, KC, strlen(KC), "/home/u/.kube", NULL, &err), &err);
	CHECK_EQ_STR(c.context, "dev");
	CHECK_EQ_STR(c.server, "https://10.0.0.1:6443"); /* trailing slash dropped */
	CHECK_EQ_STR(c.namespace_, "team-a");
	CHECK_EQ_STR(c.token, "abc.def");
	CHECK(c.token_file == NULL);
	CHECK(!c.insecure);
	CHECK_EQ_INT(c.ca_data_len, 28);
	CHECK(memcmp(c.ca_data, "-----BEGIN CERTIFICATE-----\n", 28) == 0);
	CHECK(c.ca_file == NULL && c.cert_file == NULL && c.key_data == NULL);
	kube_config_release(&c);
	kube_config_release(&c); /* releasing twice is harmless */
}

static void test_named_context_files_relative_to_kubeconfig(void)
{
	struct kube_config c;
	struct lp_err err = {0};

	CHECK_OK(kube_config_parse(&c, KC, strlen(KC), "/home/u/.kube", "prod", &err), &err);
	CHECK_EQ_STR(c.server, "https://prod.example:443");
	CHECK(c.namespace_ == NULL);
	CHECK(c.insecure);
	CHECK_EQ_STR(c.ca_file, "/home/u/.kube/certs/ca.pem");
	CHECK_EQ_STR(c.key_file, "/abs/key.pem");
	CHECK_EQ_STR(c.token_file, "/home/u/.kube/tok");
	CHECK_EQ_INT(c.cert_data_len, 10);
	CHECK_EQ_STR((const char *)c.cert_data, "hello cert");
	kube_config_release(&c);
}

static void expect_error(const char *yaml, const char *ctx, int code, const char *needle)
{
	struct kube_config c;
	struct lp_err err = {0};
	int rc = kube_config_parse(&c, yaml, strlen(yaml), NULL, ctx, &err);

	CHECK_EQ_INT(rc, code);
	CHECK_MSG(strstr(err.msg, needle) != NULL, "message '%s' lacks '%s'", err.msg, needle);
	CHECK(c.server == NULL);
}

static void test_errors_name_the_problem(void)
{
	expect_error(KC, "staging", -ENOENT, "context 'staging' not found");
	expect_error("current-context: a\ncontexts:\n- name: a\n  context: {cluster: x}\n", NULL,
	             -ENOENT, "cluster 'x' of context 'a' not found");
	expect_error("clusters: []\n", NULL, -EINVAL, "no current-context");
	expect_error("- a\n- b\n", NULL, -EINVAL, "not a kubeconfig");
	expect_error("a: [\n", NULL, -EINVAL, "invalid YAML");
	expect_error("current-context: a\ncontexts:\n- name: a\n  context: {cluster: c}\n"
	             "clusters:\n- name: c\n  cluster: {insecure-skip-tls-verify: true}\n",
	             NULL, -EINVAL, "cluster 'c' has no 'server'");
	expect_error("current-context: a\ncontexts:\n- name: a\n  context: {cluster: c, user: u}\n"
	             "clusters:\n- name: c\n  cluster: {server: 'https://h'}\n"
	             "users:\n- name: u\n  user: {client-certificate-data: '!!notbase64'}\n",
	             NULL, -EINVAL, "'client-certificate-data' of 'u'");
	expect_error("current-context: a\ncontexts:\n- name: a\n  context: {cluster: c, user: u}\n"
	             "clusters:\n- name: c\n  cluster: {server: 'https://h'}\n"
	             "users:\n- name: u\n  user: {exec: {command: aws}}\n",
	             NULL, -ENOTSUP, "exec credential plugin");
	expect_error("current-context: a\ncontexts:\n- name: a\n  context: {cluster: c, user: u}\n"
	             "clusters:\n- name: c\n  cluster: {server: 'https://h'}\n"
	             "users:\n- name: u\n  user: {client-certificate: /c.pem}\n",
	             NULL, -EINVAL, "certificate without a key");
	expect_error("current-context: a\ncontexts:\n- name: a\n  context: {cluster: c}\n"
	             "clusters:\n- name: c\n  cluster: {server: 'ftp://h'}\n",
	             NULL, -EINVAL, "not an http(s) URL");
}

static void write_file(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");

	if (f) {
		fputs(text, f);
		fclose(f);
	}
}

static void test_load_file_and_auto(void)
{
	char dir[] = "/tmp/lp-kubecfg-XXXXXX", path[256];
	struct kube_config c;
	struct lp_err err = {0};
	const char *old_host = getenv("KUBERNETES_SERVICE_HOST");

	CHECK(mkdtemp(dir) != NULL);
	snprintf(path, sizeof(path), "%s/config", dir);
	write_file(path, KC);
	CHECK_OK(kube_config_load_file(&c, path, "prod", &err), &err);
	CHECK(strncmp(c.ca_file, dir, strlen(dir)) == 0);
	CHECK(strstr(c.ca_file, "/certs/ca.pem") != NULL);
	kube_config_release(&c);

	/* KUBECONFIG is honoured when no path is given and not in a cluster */
	unsetenv("KUBERNETES_SERVICE_HOST");
	setenv("KUBECONFIG", path, 1);
	CHECK_OK(kube_config_auto(&c, NULL, NULL, &err), &err);
	CHECK_EQ_STR(c.context, "dev");
	kube_config_release(&c);
	if (old_host)
		setenv("KUBERNETES_SERVICE_HOST", old_host, 1);
	unsetenv("KUBECONFIG");

	CHECK_EQ_INT(kube_config_load_file(&c, "/nonexistent/kubeconfig", NULL, &err), -ENOENT);
	CHECK(strstr(err.msg, "/nonexistent/kubeconfig") != NULL);
	unlink(path);
	rmdir(dir);
}

static void test_in_cluster(void)
{
	char dir[] = "/tmp/lp-sa-XXXXXX", path[256];
	struct kube_config c;
	struct lp_err err = {0};

	CHECK(mkdtemp(dir) != NULL);
	snprintf(path, sizeof(path), "%s/token", dir);
	write_file(path, "sa-token-1\n");
	snprintf(path, sizeof(path), "%s/namespace", dir);
	write_file(path, "loraplane-system");
	setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1", 1);
	setenv("KUBERNETES_SERVICE_PORT", "443", 1);
	CHECK_OK(kube_config_in_cluster(&c, dir, &err), &err);
	CHECK_EQ_STR(c.server, "https://10.96.0.1:443");
	CHECK_EQ_STR(c.token, "sa-token-1");
	CHECK(strstr(c.token_file, "/token") != NULL);
	CHECK(strstr(c.ca_file, "/ca.crt") != NULL);
	CHECK_EQ_STR(c.namespace_, "loraplane-system");
	kube_config_release(&c);

	setenv("KUBERNETES_SERVICE_HOST", "fd00::1", 1);
	CHECK_OK(kube_config_in_cluster(&c, dir, &err), &err);
	CHECK_EQ_STR(c.server, "https://[fd00::1]:443");
	kube_config_release(&c);

	snprintf(path, sizeof(path), "%s/token", dir);
	unlink(path);
	CHECK(kube_config_in_cluster(&c, dir, &err) == -ENOENT);
	CHECK(strstr(err.msg, "in-cluster config") != NULL);
	unsetenv("KUBERNETES_SERVICE_HOST");
	CHECK_EQ_INT(kube_config_in_cluster(&c, dir, &err), -ENOENT);
	CHECK(strstr(err.msg, "KUBERNETES_SERVICE_HOST") != NULL);
	unsetenv("KUBERNETES_SERVICE_PORT");
	snprintf(path, sizeof(path), "%s/namespace", dir);
	unlink(path);
	rmdir(dir);
}

static void test_base64(void)
{
	unsigned char *out;
	size_t n;
	struct lp_err err = {0};

	CHECK_OK(kube_base64_decode("aGk=", 4, &out, &n, &err), &err);
	CHECK_EQ_INT(n, 2);
	CHECK_EQ_STR((char *)out, "hi");
	free(out);
	CHECK_OK(kube_base64_decode("aGk", 3, &out, &n, &err), &err); /* unpadded */
	CHECK_EQ_STR((char *)out, "hi");
	free(out);
	/* line-wrapped PEM-style data */
	CHECK_OK(kube_base64_decode("aGVs\nbG8g\r\nd29y bGQ=", 20, &out, &n, &err), &err);
	CHECK_EQ_STR((char *)out, "hello world");
	free(out);
	CHECK_OK(kube_base64_decode("", 0, &out, &n, &err), &err);
	CHECK_EQ_INT(n, 0);
	free(out);
	CHECK_EQ_INT(kube_base64_decode("a*b=", 4, &out, &n, &err), -EINVAL);
	CHECK(out == NULL);
	CHECK_EQ_INT(kube_base64_decode("aGk=x", 5, &out, &n, &err), -EINVAL);
	CHECK_EQ_INT(kube_base64_decode("a", 1, &out, &n, &err), -EINVAL);
	/* lengths exclude the padding, given or not (the decoder counts a
	 * zero byte per '=') */
	{
		static const struct {
			const char *in, *want;
			size_t n;
		} cases[] = {
		    {"aGVs", "hel", 3},       {"aGVsbA==", "hell", 4},
		    {"aGVsbA", "hell", 4},    {"aGVsbG8=", "hello", 5},
		    {"aGVsbG8", "hello", 5},  {"AGI=", "\0b", 2}, /* a real zero byte is kept */
		    {"aGVsbG8h", "hello!", 6}};
		size_t i;

		for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
			CHECK_OK(
			    kube_base64_decode(cases[i].in, strlen(cases[i].in), &out, &n, &err),
			    &err);
			CHECK_EQ_INT(n, cases[i].n);
			if (cases[i].want[0] == '\0')
				CHECK(out[0] == 0 && out[1] == 'b');
			else
				CHECK_EQ_STR((char *)out, cases[i].want);
			free(out);
		}
	}
	CHECK_EQ_INT(kube_base64_decode("aG=k", 4, &out, &n, &err), -EINVAL); /* '=' inside */
	CHECK(strstr(err.msg, "offset 3") != NULL);
	CHECK_EQ_INT(kube_base64_decode("aGk===", 6, &out, &n, &err), -EINVAL);
	CHECK_EQ_INT(kube_base64_decode("aGk\0", 4, &out, &n, &err), -EINVAL);
	CHECK(out == NULL);
}

int main(void)
{
	TEST_MAIN_BEGIN("test-kube-config");
	RUN(test_current_context_token_and_ca_data);
	RUN(test_named_context_files_relative_to_kubeconfig);
	RUN(test_errors_name_the_problem);
	RUN(test_load_file_and_auto);
	RUN(test_in_cluster);
	RUN(test_base64);
	TEST_MAIN_END();
}
