/* The --lora-dir watcher: every subdirectory of a directory is one adapter
 * named after it. A scan compares the directory with what the last scan
 * saw and asks its owner, through callbacks, to load new adapters, to
 * reload (in place) those whose files changed (size, mtime or inode of any
 * file directly inside), and to unload those whose directory went away.
 * A name the owner no longer has loaded (say, unloaded through the API)
 * is loaded again at the next scan while its directory is there; a name
 * the owner has loaded from another source is left alone (and reported
 * once), and never unloaded by the watcher.
 *
 * Hidden entries (starting with '.') are ignored, so that a directory can
 * be prepared under a hidden name and renamed into place. A load that
 * fails is reported once and tried again only when the directory's files
 * change.
 *
 * The callbacks run on the thread calling lp_watcher_scan(): the caller's
 * for the first scan, the watcher's own thread afterwards. */
#ifndef LP_ADAPTERS_WATCHER_H
#define LP_ADAPTERS_WATCHER_H

#include <stdbool.h>

#include "common/err.h"

enum lp_watch_event {
	LP_WATCH_LOADED,   /* a new adapter loaded */
	LP_WATCH_RELOADED, /* changed files loaded in place */
	LP_WATCH_UNLOADED, /* its directory went away */
	LP_WATCH_SKIPPED,  /* not loaded: err says why */
	LP_WATCH_FAILED,   /* the directory cannot be read (name is ""); nothing
	                      is unloaded until it can be */
};

/* Where the owner's adapter of a name comes from. */
enum lp_watch_state {
	LP_WATCH_ABSENT,         /* not loaded (never, or unloaded through the API) */
	LP_WATCH_FROM_DIR,       /* loaded from the watched subdirectory */
	LP_WATCH_FROM_ELSEWHERE, /* loaded under that name from another source */
};

struct lp_watcher_ops {
	/* Loads the adapter at dir (an absolute path) under name, replacing
	 * a loaded version when inplace. 0 or a negative code with err. */
	int (*load)(void *ctx, const char *name, const char *dir, bool inplace, struct lp_err *err);
	int (*unload)(void *ctx, const char *name, struct lp_err *err);
	enum lp_watch_state (*state)(void *ctx, const char *name, const char *dir);
	/* Told about every change; err is NULL unless the event failed. */
	void (*report)(void *ctx, enum lp_watch_event ev, const char *name, const char *dir,
	               const struct lp_err *err);
};

struct lp_watcher;

/* Creates a watcher of dir (resolved to an absolute path; must exist).
 * ops is copied; ctx is borrowed. Free with lp_watcher_free(). */
int lp_watcher_new(struct lp_watcher **out, const char *dir, const struct lp_watcher_ops *ops,
                   void *ctx, struct lp_err *err);
/* Scans once, now, on the calling thread; returns the number of
 * adapters loaded or reloaded, or a negative code when dir cannot be
 * read. Not to be called while the thread runs. */
int lp_watcher_scan(struct lp_watcher *w, struct lp_err *err);
/* Starts a thread that scans every interval_s seconds. */
int lp_watcher_start(struct lp_watcher *w, double interval_s, struct lp_err *err);
/* Stops the thread (waiting for a scan in progress) and frees w. */
void lp_watcher_free(struct lp_watcher *w);

#endif
