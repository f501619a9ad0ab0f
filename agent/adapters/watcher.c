/* The --lora-dir watcher; see watcher.h. */
#include "agent/adapters/watcher.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

/* Entries of the directory followed at once; more are skipped (reported). */
#define MAX_ENTRIES 4096

struct entry {
	char name[256];
	uint64_t fp;    /* fingerprint of the files at the last attempt */
	bool attempted; /* fp is meaningful */
	bool failed;    /* the attempt at fp failed (or was refused) */
	bool seen;      /* present in the current scan */
	bool conflict;  /* the name is taken by another source (reported) */
};

struct lp_watcher {
	char dir[PATH_MAX];
	struct lp_watcher_ops ops;
	void *ctx;
	struct entry *e;
	size_t n, cap;
	bool dir_failed; /* the last scan could not read dir */
	pthread_t thread;
	bool running;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	bool stop;
	double interval_s;
};

static uint64_t fnv1a(uint64_t h, const void *p, size_t n)
{
	const unsigned char *b = p;

	for (size_t i = 0; i < n; i++) {
		h ^= b[i];
		h *= 1099511628211ull;
	}
	return h;
}

/* A digest of the names, sizes, modification times and inodes of the
 * files directly inside path, independent of readdir order. */
static int fingerprint(const char *path, uint64_t *out, struct lp_err *err)
{
	char p[PATH_MAX];
	struct dirent *de;
	uint64_t sum = 0x9e3779b97f4a7c15ull;
	size_t files = 0;
	DIR *d = opendir(path);

	if (!d)
		return lp_errf(err, -errno, "cannot read '%s': %s", path, strerror(errno));
	while ((de = readdir(d))) {
		struct stat st;
		uint64_t h = 14695981039346656037ull;
		int n;

		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		n = snprintf(p, sizeof(p), "%s/%s", path, de->d_name);
		if (n < 0 || (size_t)n >= sizeof(p) || stat(p, &st) < 0)
			continue;
		h = fnv1a(h, de->d_name, strlen(de->d_name));
		h = fnv1a(h, &st.st_size, sizeof(st.st_size));
		h = fnv1a(h, &st.st_mtim.tv_sec, sizeof(st.st_mtim.tv_sec));
		h = fnv1a(h, &st.st_mtim.tv_nsec, sizeof(st.st_mtim.tv_nsec));
		h = fnv1a(h, &st.st_ino, sizeof(st.st_ino));
		h = fnv1a(h, &st.st_mode, sizeof(st.st_mode));
		sum += h;
		files++;
	}
	closedir(d);
	*out = fnv1a(sum, &files, sizeof(files));
	return 0;
}

static struct entry *find_entry(struct lp_watcher *w, const char *name)
{
	for (size_t i = 0; i < w->n; i++)
		if (!strcmp(w->e[i].name, name))
			return &w->e[i];
	return NULL;
}

static struct entry *add_entry(struct lp_watcher *w, const char *name)
{
	struct entry *e;

	if (w->n == w->cap) {
		size_t cap = w->cap ? w->cap * 2 : 32;
		e = realloc(w->e, cap * sizeof(*e));
		if (!e)
			return NULL;
		w->e = e;
		w->cap = cap;
	}
	e = &w->e[w->n++];
	memset(e, 0, sizeof(*e));
	snprintf(e->name, sizeof(e->name), "%s", name);
	return e;
}

int lp_watcher_new(struct lp_watcher **out, const char *dir, const struct lp_watcher_ops *ops,
                   void *ctx, struct lp_err *err)
{
	struct lp_watcher *w;
	struct stat st;

	*out = NULL;
	w = calloc(1, sizeof(*w));
	if (!w)
		return lp_errf(err, -ENOMEM, "out of memory");
	if (!realpath(dir, w->dir) || stat(w->dir, &st) < 0 || !S_ISDIR(st.st_mode)) {
		int e = errno ? errno : ENOTDIR;
		free(w);
		return lp_errf(err, -e, "lora directory '%s' is not a readable directory: %s", dir,
		               strerror(e));
	}
	w->ops = *ops;
	w->ctx = ctx;
	pthread_mutex_init(&w->mu, NULL);
	pthread_condattr_t a;
	pthread_condattr_init(&a);
	pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
	pthread_cond_init(&w->cv, &a);
	pthread_condattr_destroy(&a);
	*out = w;
	return 0;
}

/* Looks at one directory entry. Returns 1 when it loaded something. */
static int scan_one(struct lp_watcher *w, const char *name)
{
	char path[PATH_MAX];
	struct lp_err err = {0};
	struct stat st;
	struct entry *e = find_entry(w, name);
	enum lp_watch_state state;
	uint64_t fp = 0;
	bool reload;
	int n;

	if (!e) {
		if (w->n >= MAX_ENTRIES)
			return 0;
		e = add_entry(w, name);
		if (!e)
			return 0;
	}
	e->seen = true;
	n = snprintf(path, sizeof(path), "%s/%s", w->dir, name);
	if (n < 0 || (size_t)n >= sizeof(path)) {
		lp_errf(&err, -ENAMETOOLONG, "the path of '%s' is too long", name);
		goto refuse;
	}
	if (stat(path, &st) < 0) {
		lp_errf(&err, -errno, "cannot stat '%s': %s", path, strerror(errno));
		goto refuse;
	}
	if (!S_ISDIR(st.st_mode)) {
		lp_errf(&err, -ENOTDIR, "'%s' is not a directory (each adapter is a subdirectory)",
		        path);
		fp = (uint64_t)st.st_mtim.tv_sec ^ (uint64_t)st.st_size;
		goto refuse;
	}
	if (fingerprint(path, &fp, &err))
		goto refuse;

	state = w->ops.state(w->ctx, name, path);
	if (state == LP_WATCH_FROM_ELSEWHERE) {
		if (e->conflict)
			return 0; /* reported already */
		e->conflict = true;
		lp_errf(
		    &err, -EEXIST,
		    "an adapter named '%s' is already loaded from another source; the directory "
		    "is ignored while it is",
		    name);
		w->ops.report(w->ctx, LP_WATCH_SKIPPED, name, path, &err);
		return 0;
	}
	e->conflict = false;
	if (state == LP_WATCH_FROM_DIR) {
		if (!e->attempted || e->fp == fp) {
			/* loaded and unchanged (or loaded before we looked) */
			e->attempted = true;
			e->fp = fp;
			e->failed = false;
			return 0;
		}
		reload = true;
	} else {
		/* absent: new, unloaded through the API, or failed before */
		if (e->attempted && e->failed && e->fp == fp)
			return 0;
		reload = false;
	}
	e->attempted = true;
	e->fp = fp;
	if (w->ops.load(w->ctx, name, path, reload, &err)) {
		e->failed = true;
		w->ops.report(w->ctx, LP_WATCH_SKIPPED, name, path, &err);
		return 0;
	}
	e->failed = false;
	w->ops.report(w->ctx, reload ? LP_WATCH_RELOADED : LP_WATCH_LOADED, name, path, NULL);
	return 1;

refuse:
	/* report each refusal once per state of the files */
	if (e->attempted && e->failed && e->fp == fp)
		return 0;
	e->attempted = true;
	e->failed = true;
	e->fp = fp;
	w->ops.report(w->ctx, LP_WATCH_SKIPPED, name, path, &err);
	return 0;
}

int lp_watcher_scan(struct lp_watcher *w, struct lp_err *err)
{
	struct dirent *de;
	int loaded = 0;
	DIR *d;

	d = opendir(w->dir);
	if (!d) {
		int rc = lp_errf(err, -errno, "cannot read lora directory '%s': %s", w->dir,
		                 strerror(errno));
		if (!w->dir_failed)
			w->ops.report(w->ctx, LP_WATCH_FAILED, "", w->dir, err);
		w->dir_failed = true;
		return rc;
	}
	w->dir_failed = false;
	for (size_t i = 0; i < w->n; i++)
		w->e[i].seen = false;
	while ((de = readdir(d))) {
		if (de->d_name[0] == '.')
			continue;
		loaded += scan_one(w, de->d_name);
	}
	closedir(d);
	/* entries whose directory went away */
	for (size_t i = 0; i < w->n;) {
		struct entry *e = &w->e[i];
		char path[PATH_MAX];

		if (e->seen) {
			i++;
			continue;
		}
		int n = snprintf(path, sizeof(path), "%s/%s", w->dir, e->name);
		if (n > 0 && (size_t)n < sizeof(path) &&
		    w->ops.state(w->ctx, e->name, path) == LP_WATCH_FROM_DIR) {
			struct lp_err uerr = {0};
			if (w->ops.unload(w->ctx, e->name, &uerr))
				w->ops.report(w->ctx, LP_WATCH_SKIPPED, e->name, path, &uerr);
			else
				w->ops.report(w->ctx, LP_WATCH_UNLOADED, e->name, path, NULL);
		}
		w->e[i] = w->e[--w->n];
	}
	return loaded;
}

static void *watch_thread(void *arg)
{
	struct lp_watcher *w = arg;

	pthread_mutex_lock(&w->mu);
	while (!w->stop) {
		struct timespec ts;
		clock_gettime(CLOCK_MONOTONIC, &ts);
		double t = (double)ts.tv_nsec * 1e-9 + w->interval_s;
		ts.tv_sec += (time_t)t;
		ts.tv_nsec = (long)((t - (double)(time_t)t) * 1e9);
		while (!w->stop && pthread_cond_timedwait(&w->cv, &w->mu, &ts) != ETIMEDOUT)
			;
		if (w->stop)
			break;
		pthread_mutex_unlock(&w->mu);
		lp_watcher_scan(w, NULL);
		pthread_mutex_lock(&w->mu);
	}
	pthread_mutex_unlock(&w->mu);
	return NULL;
}

int lp_watcher_start(struct lp_watcher *w, double interval_s, struct lp_err *err)
{
	if (!(interval_s > 0) || interval_s > 86400)
		return lp_errf(err, -EINVAL,
		               "refresh interval must be in (0, 86400] seconds, got %g",
		               interval_s);
	if (w->running)
		return lp_errf(err, -EALREADY, "the watcher is already running");
	w->interval_s = interval_s;
	if (pthread_create(&w->thread, NULL, watch_thread, w))
		return lp_errf(err, -EAGAIN, "cannot start the lora directory watcher");
	w->running = true;
	return 0;
}

void lp_watcher_free(struct lp_watcher *w)
{
	if (!w)
		return;
	if (w->running) {
		pthread_mutex_lock(&w->mu);
		w->stop = true;
		pthread_cond_signal(&w->cv);
		pthread_mutex_unlock(&w->mu);
		pthread_join(w->thread, NULL);
	}
	pthread_mutex_destroy(&w->mu);
	pthread_cond_destroy(&w->cv);
	free(w->e);
	free(w);
}
