/* Shared between the files of the sources module (source.c, the download
 * helpers and one file per remote scheme); not part of its API. */
#ifndef LP_ADAPTERS_SOURCE_INTERNAL_H
#define LP_ADAPTERS_SOURCE_INTERNAL_H

#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#include "agent/adapters/http-fetch.h"
#include "agent/adapters/source.h"
#include "common/buf.h"
#include "common/err.h"

/* Longest relative file name kept from a remote listing. */
#define SRC_NAME_MAX 1024
/* Metadata file written into every cache entry; a source may not hold a
 * file of this name. */
#define SRC_META_NAME ".loraplane-source.json"

enum src_scheme {
	SRC_FILE,
	SRC_S3,
	SRC_HF,
	SRC_HTTPS,
};

/* A parsed URI; which fields are set depends on the scheme. */
struct src_uri {
	enum src_scheme scheme;
	char path[PATH_MAX];         /* file: the absolute path */
	char bucket[256];            /* s3 */
	char prefix[SRC_NAME_MAX];   /* s3: may be "" */
	char repo[256];              /* hf: "org/name" or "name" */
	char revision[256];          /* hf: "main" unless given */
	char url[LP_SOURCE_URI_MAX]; /* https: the URI itself */
	bool single_file;            /* https: ends in .nemo */
	/* Model mode only (src_uri_parse_model): */
	char file[SRC_NAME_MAX]; /* hf: one file of the repo, "" for the model files */
	bool gguf;               /* https, http: the path ends in .gguf */
};

/* Environment read once at creation; NULL when unset or empty. */
struct src_env {
	char *aws_access_key;
	char *aws_secret_key;
	char *aws_session_token;
	char *aws_region;     /* never NULL */
	char *s3_endpoint;    /* never NULL */
	bool s3_endpoint_set; /* from AWS_ENDPOINT_URL(_S3), not the region */
	char *aws_ca_bundle;
	char *hf_endpoint; /* never NULL */
	char *hf_token;
	char *curl_ca_bundle;
};

struct src_inflight;

/* What the process knows of one cache entry: fetches holding it and when
 * it was last used (a counter, for LRU order). */
struct src_entry {
	char name[64]; /* lp_source_cache_name() */
	int holds;
	uint64_t gen;      /* bumped by every hold: an eviction check went stale */
	uint64_t last_use; /* 0: not used by this process */
};

struct lp_source_cache {
	bool model;         /* model mode: lp_source_fetch_model() only */
	const char *noun;   /* "adapter" or "model", for messages */
	char dir[PATH_MAX]; /* "" in model mode */
	uint64_t max_file_bytes;
	uint64_t max_total_bytes;
	uint64_t max_cache_bytes;
	bool allow_insecure_endpoints;
	bool (*in_use)(void *arg, const char *entry_name);
	void *in_use_arg;
	int max_files;
	int s3_list_page_size;
	struct lp_http_policy policy; /* ca_bundle set per scheme */
	char **roots;                 /* realpath'd allowed roots */
	int n_roots;
	lp_source_progress_fn progress;
	void *progress_arg;
	long progress_interval_ms;
	struct src_env env;
	pthread_mutex_t lock; /* guards inflight, tmp_counter and entries */
	struct src_inflight *inflight;
	unsigned long tmp_counter;
	struct src_entry *entries;
	int n_entries;
	uint64_t use_clock;
	/* taken around making room and installing an entry, so that two
	 * downloads finishing together do not both count the same room */
	pthread_mutex_t budget_lock;
};

/* The per-adapter byte limit of a download and whether it is the cache's
 * budget (max_cache_bytes) rather than max_total_bytes. */
uint64_t src_adapter_limit(const struct lp_source_cache *c, bool *is_cache_budget);

/* One file stored by a download. */
struct src_file {
	char *name; /* relative to the entry, '/'-separated */
	uint64_t size;
	char sha256[65];
};

/* One download into a temporary directory, driven by a scheme's fetch
 * function through the helpers below, which enforce the limits. */
struct src_download {
	struct lp_source_cache *cache;
	const struct src_env *env; /* the cache's, or one fetch's credentials */
	const struct src_uri *u;
	const char *uri;
	const char *dir; /* the temporary directory */
	struct lp_http_client http;
	struct src_file *files;
	int n_files;
	uint64_t bytes;         /* stored so far */
	uint64_t announced;     /* sum of sizes a listing gave, 0 when unknown */
	uint64_t progress_base; /* bytes of finished files */
	struct timespec last_progress;
	int http_status; /* status behind the error being returned */
};

/* Parses uri; -EINVAL with a message naming what is wrong. */
int src_uri_parse(struct src_uri *u, const char *uri, struct lp_err *err);
/* The same for a model URI: hf://org/repo[@rev]/path/file.gguf names one
 * file (u->file), an https path ending in .gguf is one file (u->gguf), and
 * plain http:// is taken like https:// when allow_http is set. */
int src_uri_parse_model(struct src_uri *u, const char *uri, bool allow_http, struct lp_err *err);
const char *src_scheme_name(enum src_scheme s);

/* Checks that name (a relative '/'-separated path from a listing) can be
 * stored below the entry: no empty, "." or ".." segment, no control
 * characters, not the metadata file. */
bool src_name_ok(const char *name);

/* Initialises the download's HTTP client with the cache's policy and the
 * CA bundle for this scheme (NULL: system CAs). */
int src_download_init(struct src_download *d, const char *ca_bundle, struct lp_err *err);
void src_download_release(struct src_download *d);

/* Checks that one more file, name, of announced_size bytes (0: unknown)
 * may be stored: a usable name not stored yet, the file count and the
 * size limits. 0 or -EINVAL, -EFBIG, -ENOSPC with a message. */
int src_file_admit(struct src_download *d, const char *name, uint64_t announced_size,
                   struct lp_err *err);

/* GETs g (with g->path and g->max_bytes filled here) into the file name of
 * the download, after checking the file count and announced_size (0:
 * unknown) against the limits. Returns 0 with res->status set (the file
 * exists and is recorded only for 2xx), or a negative code. */
int src_get_file(struct src_download *d, struct lp_http_get *g, const char *name,
                 uint64_t announced_size, struct lp_http_result *res, struct lp_err *err);

/* Copies the local regular file src into the file name of the download,
 * like src_get_file() for a remote one: the same limits, digest and
 * progress; the copy is fsynced. 0 or a negative code. */
int src_copy_file(struct src_download *d, const char *src, const char *name, struct lp_err *err);

/* GETs g into body (a listing or JSON document, at most max bytes).
 * Returns 0 with res->status set, or a negative code. */
int src_get_memory(struct src_download *d, struct lp_http_get *g, struct lp_buf *body,
                   struct lp_http_result *res, struct lp_err *err);

/* Reports progress now, whatever the interval (the end of a download). */
void src_progress_final(struct src_download *d);

/* Sets err for a non-2xx response: the code from lp_http_status_errno(),
 * "<what>: <status> <detail>" where detail is the remote's reason, and
 * remembers the status for the result. */
int src_http_error(struct src_download *d, long status, const char *detail, struct lp_err *err,
                   const char *what_fmt, ...) __attribute__((format(printf, 5, 6)));

/* Appends a URL-encoded form of s (slashes kept or not) to out. */
int src_url_append(struct lp_buf *out, const char *s, bool keep_slash, struct lp_err *err);

/* Fetch functions of the remote schemes: store the adapter's (in model
 * mode the model's) files in d->dir through src_get_file(). */
int src_s3_fetch(struct src_download *d, struct lp_err *err);
int src_hf_fetch(struct src_download *d, struct lp_err *err);
int src_https_fetch(struct src_download *d, struct lp_err *err);

/* ---- model mode (source-model.c) ---- */

/* Chooses the files of a model among n top-level file names (a hub
 * listing, a local directory): a directory model is config.json with at
 * least one *.safetensors, plus those of src_model_extra_names that are
 * there; otherwise one *.gguf file. pick (n entries, the caller's)
 * receives the indexes chosen, *n_pick their count. -ENOENT when there
 * is no model, -EINVAL for several .gguf files and no config.json (the
 * message lists them); what names the source in messages. */
int src_model_pick(const char *const *names, int n, int *pick, int *n_pick, const char *what,
                   struct lp_err *err);

/* The files of a directory model besides config.json and the weights,
 * fetched when present; NULL-terminated. */
extern const char *const src_model_extra_names[];

/* Whether name ends in .gguf (any case). */
bool src_is_gguf(const char *name);

/* Reads the shard names of the model.safetensors.index.json stored in
 * the download as index_name (its weight_map's values, each once) into
 * *names (malloc'd array of malloc'd strings; free with
 * src_names_free()). -EINVAL for an index that is not such a document
 * or names a file that cannot be stored. */
int src_model_index_shards(struct src_download *d, const char *index_name, char ***names, int *n,
                           struct lp_err *err);
void src_names_free(char **names, int n);

/* file:// in model mode: copies the .gguf file, or the model files of
 * the directory (src_model_pick), at d->u->path into d->dir. */
int src_file_model_fetch(struct src_download *d, struct lp_err *err);

#endif
