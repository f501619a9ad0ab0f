/* Adapter sources: turns an adapter URI into a local directory (or .nemo
 * file) that lp_lora_load() can open, downloading into a cache when the
 * URI is remote.
 *
 *   file:///abs/dir, /abs/dir   used in place; through the API only below
 *                                an allowed root (after realpath)
 *   s3://bucket/prefix          every object under the prefix (ListObjectsV2,
 *                                path-style, SigV4 from AWS_* variables)
 *   hf://org/repo[@revision]    the adapter files of a Hugging Face repo
 *   https://host/dir/           the known adapter file names under dir/
 *   https://host/x.nemo         that one file
 *
 * In model mode (lp_source_config.model, for loraplane-agent fetch) the
 * URI names a base model instead, fetched with lp_source_fetch_model()
 * into a directory of the caller's: see that function and
 * docs/model-fetch.md.
 *
 * A download lands in <cache>/<scheme>-<32 hex of sha256(uri)>.tmp.<pid>.<n>
 * and is renamed to <cache>/<scheme>-<hash> whole, so a cache entry is
 * complete or absent. A complete entry is reused without any network
 * request when every file still has the size and sha256 its metadata
 * records (and a sha256 pin matches); otherwise it is removed and
 * downloaded again. Callers fetching the same URI at once share one
 * download (the others wait for it). The cache directory must belong to
 * this process's user and be writable by no one else (it is created
 * 0700). Complete entries together stay below max_cache_bytes: the least
 * recently used entries that no fetch holds and no loaded adapter uses
 * (in_use) are removed to make room.
 *
 * Environment, read once by lp_source_cache_new(): AWS_ACCESS_KEY_ID,
 * AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION (or
 * AWS_DEFAULT_REGION; default us-east-1), AWS_ENDPOINT_URL_S3 or
 * AWS_ENDPOINT_URL, AWS_CA_BUNDLE; HF_ENDPOINT, HF_TOKEN (or
 * HUGGING_FACE_HUB_TOKEN); CURL_CA_BUNDLE. One fetch may carry its own
 * credentials instead (struct lp_source_credentials). See
 * docs/adapter-sources.md. */
#ifndef LP_ADAPTERS_SOURCE_H
#define LP_ADAPTERS_SOURCE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/err.h"

#define LP_SOURCE_URI_MAX 4096

/* Progress of one fetch: bytes downloaded so far for uri, and the total
 * when the source announced every size (0 when unknown). Called on the
 * fetching thread, at most once per progress_interval_ms and once when
 * the download completes; several fetches may call it at once. */
typedef void (*lp_source_progress_fn)(void *arg, const char *uri, uint64_t done, uint64_t total);

/* Settings; a 0 field takes the default in brackets. Everything is copied
 * by lp_source_cache_new(). */
struct lp_source_config {
	const char *cache_dir;    /* created (with parents) when missing */
	uint64_t max_file_bytes;  /* one file [8 GiB] */
	uint64_t max_total_bytes; /* one adapter, all files [16 GiB] */
	int max_files;            /* one adapter [64] */
	int max_attempts;         /* tries per request [4] */
	long backoff_initial_ms;  /* first retry delay, doubling [250] */
	long backoff_max_ms;      /* cap on one delay [8000] */
	long connect_timeout_s;   /* [10] */
	long low_speed_bytes;     /* a try slower than this many bytes/s ... [1024] */
	long low_speed_time_s;    /* ... for this long is abandoned [60] */
	int s3_list_page_size;    /* ListObjectsV2 max-keys [1000] */
	/* Directories below which file:// sources requested through the API
	 * may lie (NULL-terminated; NULL or empty: such requests are refused).
	 * Each must exist; it is resolved with realpath. */
	const char *const *allowed_roots;
	lp_source_progress_fn progress; /* optional */
	void *progress_arg;
	long progress_interval_ms; /* [1000] */
	uint64_t max_cache_bytes;  /* all complete entries together [32 GiB] */
	/* Plain http:// endpoints in a fetch's credentials (AWS_ENDPOINT_URL,
	 * HF_ENDPOINT) are refused unless this is set; the environment's
	 * endpoints are the administrator's and are never refused. */
	bool allow_insecure_endpoints;
	/* Optional: whether a loaded adapter uses the cache entry name
	 * (lp_source_cache_name); such an entry is never evicted. Called
	 * without any lock of the cache held, from fetching threads. */
	bool (*in_use)(void *arg, const char *entry_name);
	void *in_use_arg;
	/* Model mode: URIs name a base model, fetched with
	 * lp_source_fetch_model() only (lp_source_fetch() and
	 * lp_source_evict() refuse). cache_dir, max_cache_bytes,
	 * allowed_roots and in_use are not used; the limits default to
	 * [256 GiB] per file, [1 TiB] in all and [4096] files;
	 * allow_insecure_endpoints also admits plain http:// model URIs. */
	bool model;
};

/* Credentials and endpoints for one fetch, named as the environment
 * variables they replace (what a Kubernetes Secret of the operator's
 * spec.source.secretRef holds); NULL fields keep the environment's value,
 * except that an endpoint given here is used only with the secrets given
 * here: with AWS_ENDPOINT_URL the environment's AWS keys and session
 * token are dropped, with HF_ENDPOINT its HF_TOKEN (requests without
 * secrets of their own go anonymously). Such an endpoint must be https://
 * (http:// only with allow_insecure_endpoints). An access key id and a
 * secret key come together. A region without an endpoint derives the
 * endpoint (s3.<region>.amazonaws.com, so it must look like an AWS region
 * name) when the environment set none. Borrowed for the call; never
 * stored, logged or written into the cache. */
struct lp_source_credentials {
	const char *aws_access_key_id;     /* AWS_ACCESS_KEY_ID */
	const char *aws_secret_access_key; /* AWS_SECRET_ACCESS_KEY */
	const char *aws_session_token;     /* AWS_SESSION_TOKEN */
	const char *aws_region;            /* AWS_REGION */
	const char *aws_endpoint_url;      /* AWS_ENDPOINT_URL */
	const char *hf_token;              /* HF_TOKEN */
	const char *hf_endpoint;           /* HF_ENDPOINT */
};

/* Sets the field that key (one of lp_credential_keys, common/credentials.h)
 * names to value (borrowed); -EINVAL for another key. */
int lp_source_credentials_set(struct lp_source_credentials *c, const char *key, const char *value);

struct lp_source_result {
	/* hex SHA-256 of the weights file (adapter_model.safetensors, else
	 * adapter_model.bin, else model.lora_weights.npy, or the .nemo file);
	 * "" when the path holds none of these */
	char sha256[65];
	uint64_t bytes_downloaded; /* by this call; 0 for file://, cache hits, joins */
	uint64_t bytes_total;      /* size of the local copy's files */
	int files;                 /* files in the local copy */
	bool from_cache;           /* a complete cache entry was used, no network */
	bool joined;               /* waited for another caller's download */
	bool held;                 /* the entry is held: call lp_source_release() */
	int http_status;           /* status of the remote response behind an error, else 0 */
	/* The directory every file of the adapter must be opened below
	 * (lp_lora_load's root): the allowed root that holds a file://
	 * source requested through the API, the cache directory for a
	 * remote source, "" for a file source named by the operator
	 * (command line, --lora-dir), which may lie anywhere. */
	char root[4096];
};

struct lp_source_cache;

/* Creates a cache (mkdir -p cache_dir, the last directory 0700; resolve the
 * allowed roots, read the environment, remove leftover .tmp directories of
 * dead processes). -EINVAL for a bad config, -ENOENT for a missing root,
 * -EPERM for a cache directory owned by another user or writable by group
 * or others, -errno for other cache directory errors. Free with
 * lp_source_cache_free(). */
int lp_source_cache_new(struct lp_source_cache **out, const struct lp_source_config *cfg,
                        struct lp_err *err);

/* Frees c; no fetch may be running. NULL is fine. */
void lp_source_cache_free(struct lp_source_cache *c);

/* Checks creds (borrowed) as lp_source_fetch() would before any request:
 * values, pairs, region, endpoints (https://, or http:// when allowed).
 * 0 or -EINVAL with a message naming the variable. */
int lp_source_credentials_check(const struct lp_source_cache *c,
                                const struct lp_source_credentials *creds, struct lp_err *err);

/* Resolves uri (borrowed) to a local path written into local_path (cap
 * bytes), downloading into the cache when remote. sha256_or_null pins the
 * weights file's digest (64 hex characters, any case). from_api applies
 * the allowed-roots rule to file:// sources. creds (NULL: the
 * environment's) sign a download; a complete cache entry is used whatever
 * the credentials, and a caller that arrives while the same uri downloads
 * waits for it, then tries again with its own credentials if that
 * download was refused or found nothing. Thread-safe. Errors, each
 * with a message naming the source:
 *   -EINVAL   malformed or unsupported URI, bad pin, bad credentials
 *   -ENOENT   source not found (no such path, bucket, prefix, repo,
 *             revision or adapter files)
 *   -EACCES   refused: remote 401/403 (its code and message are passed
 *             on, res->http_status is set), or file:// outside the roots
 *   -EIO      network or server error after every retry, other remote
 *             status (res->http_status), cache I/O
 *   -EFBIG    a size or file-count limit
 *   -EBADMSG  the weights file does not match the pin
 *   -ENOSPC   the download does not fit in max_cache_bytes even after
 *             evicting every entry not in use
 *   -ENAMETOOLONG  local_path is too small
 * res (may be NULL) is cleared and then filled. On success with a remote
 * uri the cache entry is held (never evicted) until lp_source_release();
 * res->held says so. */
int lp_source_fetch(struct lp_source_cache *c, const char *uri, const char *sha256_or_null,
                    bool from_api, const struct lp_source_credentials *creds, char *local_path,
                    size_t cap, struct lp_source_result *res, struct lp_err *err);

/* Model mode: fetches the base model uri (borrowed) into the directory
 * dest, which is created (with its parents) when missing and must
 * otherwise be an empty directory or an earlier fetch's; any other
 * directory is refused (-EEXIST), as are a symbolic link (-EINVAL) and a
 * mount point (-EBUSY: dest is renamed, so it must lie inside the volume).
 *
 *   s3://bucket/prefix        every object under the prefix
 *   s3://bucket/dir/x.gguf    that one object
 *   hf://org/repo[@rev]       the model files of the repo: config.json,
 *                             generation_config.json, tokenizer.json,
 *                             tokenizer_config.json, special_tokens_map.json,
 *                             tokenizer.model, model.safetensors.index.json
 *                             and every top-level *.safetensors; a repo
 *                             without config.json and safetensors: its one
 *                             top-level .gguf file
 *   hf://org/repo[@rev]/path/x.gguf   that one file
 *   https://host/dir/         config.json (required), the optional files
 *                             above, model.safetensors or the index and
 *                             the shards it names
 *   https://host/x.gguf       that one file (http:// too with
 *                             allow_insecure_endpoints)
 *   file:///path              a local .gguf file, or the model files of a
 *                             local directory (as for hf), copied
 *
 * The files land directly in dest (a single file under its base name),
 * with the metadata file .loraplane-source.json (uri, each file's size and
 * sha256). They are written into the sibling <parent>/.<name>.tmp.<pid>.<n>
 * and renamed to dest whole (an earlier dest is swapped out and removed),
 * so dest is complete or untouched. When dest already holds a complete
 * fetch of the same uri, whose every file still has its recorded size and
 * sha256, nothing is downloaded (res->from_cache). Fetches into one dest
 * take turns on the lock file <parent>/.<name>.lock; the one holding it
 * removes the .tmp and .old directories that killed fetches left.
 *
 * sha256_or_null pins the file of a single-file model (a uri ending in
 * .gguf); with a directory model it is refused (-EINVAL). local_path
 * (cap bytes) receives dest, or dest/<file> for a single-file model;
 * res->sha256 is that file's digest ("" for a directory). Errors as for
 * lp_source_fetch(), plus -EEXIST, -EBUSY, -ENOTDIR for dest. Credentials
 * are the environment's. */
int lp_source_fetch_model(struct lp_source_cache *c, const char *uri, const char *sha256_or_null,
                          const char *dest, char *local_path, size_t cap,
                          struct lp_source_result *res, struct lp_err *err);

/* Ends the hold of a successful lp_source_fetch() of uri (call it once per
 * such fetch with res->held, after the adapter is loaded or its load
 * failed). discard removes the entry too (its adapter failed to load) when
 * no other fetch holds it and no loaded adapter uses it. NULL c or a file
 * uri: nothing. */
void lp_source_release(struct lp_source_cache *c, const char *uri, bool discard);

/* Removes the cache entry of uri, if any, so that the next fetch
 * downloads again (an adapter reloaded in place from a changed source).
 * Readers that already opened its files keep them. -EINVAL for a URI that
 * is not remote. */
int lp_source_evict(struct lp_source_cache *c, const char *uri, struct lp_err *err);

/* Writes the cache entry name of a remote uri ("s3-<32 hex>") into out
 * (cap bytes); -EINVAL when uri is not a well-formed remote URI. */
int lp_source_cache_name(const char *uri, char *out, size_t cap, struct lp_err *err);

#endif
