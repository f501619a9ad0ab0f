/* loraplane-operator: watches LoraAdapter resources and makes every agent
 * pod of their base model load them (docs/operator.md). This file parses flags,
 * logs, serves /metrics, /healthz and /readyz, runs leader election, and
 * starts and stops the controller. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>
#include <jansson.h>

#include "common/buf.h"
#include "common/version.h"
#include "operator/cleanup.h"
#include "operator/httpd.h"
#include "operator/kube/backoff.h"
#include "operator/kube/client.h"
#include "operator/kube/clock.h"
#include "operator/kube/config.h"
#include "operator/kube/encoding.h"
#include "operator/kube/lease.h"
#include "operator/reconcile/agents.h"
#include "operator/reconcile/reconcile.h"

#define VERSION LP_VERSION /* common/version.h: the VERSION file and the commit */

struct options {
	const char *kubeconfig;
	const char *context;
	const char *ns;
	bool leader_elect;
	const char *lease_ns;
	const char *lease_name;
	double lease_duration, renew_deadline, retry_period;
	const char *bind;
	int metrics_port, health_port;
	int max_concurrent_loads, workers, delete_attempts;
	double resync, load_timeout, agent_timeout, retry_max_delay;
	const char *agent_token_file;
	int watch_timeout;
};

static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_bool stop_requested;
static atomic_bool lost_lease;

static void logmsg(const char *level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void logmsg(const char *level, const char *fmt, ...)
{
	struct timespec ts;
	char when[40];
	va_list ap;

	clock_gettime(CLOCK_REALTIME, &ts);
	kube_time_format(&ts, true, when, sizeof(when));
	pthread_mutex_lock(&log_lock);
	fprintf(stderr, "%s %-5s ", when, level);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	fflush(stderr);
	pthread_mutex_unlock(&log_lock);
}

static void log_sink(void *user, const char *level, const char *msg)
{
	logmsg(level, "%s", msg);
}

static void informer_log(void *user, const char *msg)
{
	logmsg("info", "%s", msg);
}

static void usage(FILE *f)
{
	fprintf(f, "usage: loraplane-operator [options]\n"
	           "       loraplane-operator cleanup [options]   (see cleanup --help)\n"
	           "\n"
	           "Watches LoraAdapter resources and loads each adapter into every agent pod of\n"
	           "its base model; keeps status, Events and a per-adapter Service up to date.\n"
	           "\n"
	           "  --kubeconfig PATH          kubeconfig (default: in-cluster, $KUBECONFIG, "
	           "~/.kube/config)\n"
	           "  --context NAME             kubeconfig context (default: current-context)\n"
	           "  --namespace NS             watch only NS (default: all namespaces)\n"
	           "  --leader-elect             run only while holding the Lease\n"
	           "  --leader-elect-namespace NS  namespace of the Lease (default: --namespace,\n"
	           "                             the service account's, or 'default')\n"
	           "  --leader-elect-name NAME   name of the Lease (default loraplane-operator)\n"
	           "  --lease-duration S         (default 15)\n"
	           "  --renew-deadline S         (default 10)\n"
	           "  --retry-period S           (default 2)\n"
	           "  --metrics-port N           /metrics (default 8080; 0 = off)\n"
	           "  --health-port N            /healthz and /readyz (default 8081; 0 = off)\n"
	           "  --bind-address ADDR        address of both ports (default 0.0.0.0)\n"
	           "  --max-concurrent-loads N   agent loads in flight at once (default 4)\n"
	           "  --workers N                resources reconciled at once (default 2)\n"
	           "  --resync DURATION          verify every agent this often (default 60s)\n"
	           "  --load-timeout DURATION    one POST /v1/loras (default 300s)\n"
	           "  --agent-timeout DURATION   other agent calls (default 5s)\n"
	           "  --retry-max-delay DURATION cap of the retry backoff (default 30s)\n"
	           "  --delete-attempts N        unload attempts before a finalizer is removed\n"
	           "                             anyway (default 5)\n"
	           "  --agent-token-file PATH    bearer token for the agents' admin API\n"
	           "  --watch-timeout S          server-side watch timeout (default 300-600,\n"
	           "                             random)\n"
	           "  --version, --help\n"
	           "\n"
	           "Durations are seconds, optionally with a unit: 500ms, 30s, 5m, 1h.\n");
}

static int parse_int(const char *s, int lo, int hi, int *out)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (end == s || *end || errno || v < lo || v > hi)
		return -1;
	*out = (int)v;
	return 0;
}

enum flag_kind { FLAG_STR, FLAG_DURATION, FLAG_INT };

struct flag {
	const char *name;
	enum flag_kind kind;
	void *dst;  /* const char **, double * or int * */
	int lo, hi; /* FLAG_INT bounds */
};

/* Returns 0 to run, 1 to exit 0 (help/version), -1 on bad usage. */
static int parse_args(int argc, char **argv, struct options *o)
{
	const struct flag flags[] = {
	    {"--kubeconfig", FLAG_STR, &o->kubeconfig, 0, 0},
	    {"--context", FLAG_STR, &o->context, 0, 0},
	    {"--namespace", FLAG_STR, &o->ns, 0, 0},
	    {"--leader-elect-namespace", FLAG_STR, &o->lease_ns, 0, 0},
	    {"--leader-elect-name", FLAG_STR, &o->lease_name, 0, 0},
	    {"--bind-address", FLAG_STR, &o->bind, 0, 0},
	    {"--agent-token-file", FLAG_STR, &o->agent_token_file, 0, 0},
	    {"--lease-duration", FLAG_DURATION, &o->lease_duration, 0, 0},
	    {"--renew-deadline", FLAG_DURATION, &o->renew_deadline, 0, 0},
	    {"--retry-period", FLAG_DURATION, &o->retry_period, 0, 0},
	    {"--resync", FLAG_DURATION, &o->resync, 0, 0},
	    {"--load-timeout", FLAG_DURATION, &o->load_timeout, 0, 0},
	    {"--agent-timeout", FLAG_DURATION, &o->agent_timeout, 0, 0},
	    {"--retry-max-delay", FLAG_DURATION, &o->retry_max_delay, 0, 0},
	    {"--metrics-port", FLAG_INT, &o->metrics_port, 0, 65535},
	    {"--health-port", FLAG_INT, &o->health_port, 0, 65535},
	    {"--max-concurrent-loads", FLAG_INT, &o->max_concurrent_loads, 1, 64},
	    {"--workers", FLAG_INT, &o->workers, 1, 64},
	    {"--delete-attempts", FLAG_INT, &o->delete_attempts, 1, 1000},
	    {"--watch-timeout", FLAG_INT, &o->watch_timeout, 1, 3600},
	};
	int i;

	for (i = 1; i < argc; i++) {
		const char *a = argv[i], *v, *eq;
		const struct flag *f = NULL;
		size_t n, k;

		if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
			usage(stdout);
			return 1;
		}
		if (strcmp(a, "--version") == 0) {
			printf("loraplane-operator %s\n", VERSION);
			return 1;
		}
		if (strcmp(a, "--leader-elect") == 0 || strcmp(a, "--leader-elect=true") == 0) {
			o->leader_elect = true;
			continue;
		}
		if (strcmp(a, "--leader-elect=false") == 0) {
			o->leader_elect = false;
			continue;
		}
		if (strncmp(a, "--", 2) != 0) {
			fprintf(stderr, "loraplane-operator: unexpected argument '%s'\n", a);
			return -1;
		}
		eq = strchr(a, '=');
		n = eq ? (size_t)(eq - a) : strlen(a);
		for (k = 0; k < sizeof(flags) / sizeof(flags[0]); k++)
			if (strlen(flags[k].name) == n && strncmp(flags[k].name, a, n) == 0)
				f = &flags[k];
		if (!f) {
			fprintf(stderr, "loraplane-operator: unknown flag '%.*s' (see --help)\n",
			        (int)n, a);
			return -1;
		}
		if (eq) {
			v = eq + 1;
		} else if (i + 1 < argc) {
			v = argv[++i];
		} else {
			fprintf(stderr, "loraplane-operator: flag '%s' needs a value\n", f->name);
			return -1;
		}
		if (f->kind == FLAG_STR) {
			*(const char **)f->dst = v;
		} else if (f->kind == FLAG_DURATION && kube_parse_duration(v, f->dst)) {
			fprintf(stderr, "loraplane-operator: invalid duration '%s' for '%s'\n", v,
			        f->name);
			return -1;
		} else if (f->kind == FLAG_INT && parse_int(v, f->lo, f->hi, f->dst)) {
			fprintf(stderr,
			        "loraplane-operator: invalid value '%s' for '%s' (%d..%d)\n", v,
			        f->name, f->lo, f->hi);
			return -1;
		}
	}
	if (o->resync < 1) {
		fprintf(stderr, "loraplane-operator: --resync must be at least 1s\n");
		return -1;
	}
	return 0;
}

/* ---- probes and metrics ---- */

struct app {
	struct options *o;
	struct kube_client *client;
	struct reconciler *rec; /* set once leading (or at start without election) */
	struct kube_elector *elector;
	pthread_mutex_t lock; /* guards rec for the http threads */
	double started;
};

static int http_handler(void *user, const char *path, struct lp_buf *body,
                        const char **content_type)
{
	struct app *app = user;
	struct lp_err err = {0};
	bool leader;
	int code = 200;

	pthread_mutex_lock(&app->lock);
	leader = !app->o->leader_elect || (app->elector && kube_elector_is_leader(app->elector));
	if (strcmp(path, "/healthz") == 0 || strcmp(path, "/livez") == 0) {
		if (atomic_load(&lost_lease)) {
			code = 503;
			lp_buf_appendf(body, NULL, "lost the lease\n");
		} else {
			lp_buf_appendf(body, NULL, "ok\n");
		}
	} else if (strcmp(path, "/readyz") == 0) {
		if (leader && (!app->rec || !reconciler_synced(app->rec))) {
			code = 503;
			lp_buf_appendf(body, NULL, "caches not synced\n");
		} else {
			lp_buf_appendf(body, NULL, leader ? "ok\n" : "ok (standby)\n");
		}
	} else if (strcmp(path, "/metrics") == 0) {
		*content_type = "text/plain; version=0.0.4; charset=utf-8";
		lp_buf_appendf(body, NULL,
		               "# HELP loraplane_operator_leader 1 while this replica leads.\n"
		               "# TYPE loraplane_operator_leader gauge\n"
		               "loraplane_operator_leader %d\n"
		               "# HELP loraplane_operator_uptime_seconds Seconds since the process "
		               "started.\n"
		               "# TYPE loraplane_operator_uptime_seconds gauge\n"
		               "loraplane_operator_uptime_seconds %.1f\n",
		               leader ? 1 : 0, kube_now_mono() - app->started);
		if (app->rec && reconciler_metrics(app->rec, body, &err)) {
			code = 500;
			lp_buf_reset(body);
			lp_buf_appendf(body, NULL, "cannot render the metrics: %s\n", err.msg);
		}
	} else {
		code = 404;
		lp_buf_appendf(body, NULL, "not found\n");
	}
	pthread_mutex_unlock(&app->lock);
	return code;
}

static void on_signal(int sig)
{
	atomic_store(&stop_requested, true);
}

static void on_started_leading(void *user)
{
	logmsg("info", "became the leader");
}

static void on_stopped_leading(void *user)
{
	atomic_store(&lost_lease, true);
}

static void on_new_leader(void *user, const char *id)
{
	logmsg("info", "the leader is %s", id);
}

static char *read_token(const char *path, struct lp_err *err)
{
	struct lp_buf b;

	lp_buf_init(&b, 65536);
	if (lp_buf_read_file(&b, path, 65536, err)) {
		lp_buf_release(&b);
		return NULL;
	}
	while (b.len > 0 && (b.data[b.len - 1] == '\n' || b.data[b.len - 1] == '\r'))
		b.data[--b.len] = '\0';
	return lp_buf_detach(&b, NULL);
}

int main(int argc, char **argv)
{
	struct options o = {
	    .lease_name = "loraplane-operator",
	    .lease_duration = 15,
	    .renew_deadline = 10,
	    .retry_period = 2,
	    .metrics_port = 8080,
	    .health_port = 8081,
	    .max_concurrent_loads = 4,
	    .workers = 2,
	    .delete_attempts = 5,
	    .resync = 60,
	    .load_timeout = 300,
	    .agent_timeout = 5,
	    .retry_max_delay = 30,
	};
	struct app app = {.o = &o, .lock = PTHREAD_MUTEX_INITIALIZER};
	struct op_httpd *metrics = NULL, *health = NULL;
	struct kube_config cfg;
	struct lp_err err = {0};
	struct sigaction sa;
	char identity[300], host[256] = "localhost", *agent_token = NULL, lease_ns_copy[256];
	const char *lease_ns;
	int rc, status = 1;

	if (argc > 1 && !strcmp(argv[1], "cleanup"))
		return lp_cleanup_main(argc - 1, argv + 1);
	rc = parse_args(argc, argv, &o);
	if (rc)
		return rc > 0 ? 0 : 2;
	app.started = kube_now_mono();
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	curl_global_init(CURL_GLOBAL_ALL);
	json_object_seed(0);

	if (o.agent_token_file) {
		agent_token = read_token(o.agent_token_file, &err);
		if (!agent_token) {
			logmsg("error", "--agent-token-file: %s", err.msg);
			goto out;
		}
	}
	if (kube_config_auto(&cfg, o.kubeconfig, o.context, &err)) {
		logmsg("error", "%s", err.msg);
		goto out;
	}
	lease_ns = o.lease_ns && *o.lease_ns ? o.lease_ns
	           : o.ns && *o.ns           ? o.ns
	           : cfg.namespace_          ? cfg.namespace_
	                                     : "default";
	logmsg("info", "loraplane-operator %s: API server %s, watching %s", VERSION, cfg.server,
	       o.ns && *o.ns ? o.ns : "all namespaces");
	/* lease_ns may point into cfg, which the client takes */
	snprintf(lease_ns_copy, sizeof(lease_ns_copy), "%s", lease_ns);
	if (kube_client_new(&app.client, &cfg, &err)) {
		logmsg("error", "%s", err.msg);
		kube_config_release(&cfg);
		goto out;
	}
	gethostname(host, sizeof(host) - 1);
	snprintf(identity, sizeof(identity), "%s_%d",
	         getenv("POD_NAME") && *getenv("POD_NAME") ? getenv("POD_NAME") : host, getpid());

	if (o.metrics_port > 0 &&
	    op_httpd_start(&metrics, o.bind, o.metrics_port, http_handler, &app, &err)) {
		logmsg("error", "--metrics-port: %s", err.msg);
		goto out;
	}
	if (o.health_port > 0 && o.health_port != o.metrics_port &&
	    op_httpd_start(&health, o.bind, o.health_port, http_handler, &app, &err)) {
		logmsg("error", "--health-port: %s", err.msg);
		goto out;
	}
	if (metrics)
		logmsg("info", "metrics on :%d/metrics", op_httpd_port(metrics));
	if (health)
		logmsg("info", "probes on :%d/healthz and /readyz", op_httpd_port(health));

	if (o.leader_elect) {
		struct kube_lease_config lc = {.ns = lease_ns_copy,
		                               .name = o.lease_name,
		                               .identity = identity,
		                               .lease_duration = o.lease_duration,
		                               .renew_deadline = o.renew_deadline,
		                               .retry_period = o.retry_period};
		struct kube_elector_callbacks cb = {on_started_leading, on_stopped_leading,
		                                    on_new_leader, informer_log, &app};
		struct kube_elector *e;

		if (kube_elector_new(&e, app.client, &lc, &cb, &err)) {
			logmsg("error", "leader election: %s", err.msg);
			goto out;
		}
		pthread_mutex_lock(&app.lock);
		app.elector = e;
		pthread_mutex_unlock(&app.lock);
		logmsg("info", "waiting for lease %s/%s as %s", lease_ns_copy, o.lease_name,
		       identity);
		if (kube_elector_start(e, &err)) {
			logmsg("error", "%s", err.msg);
			goto out;
		}
		while (!kube_elector_is_leader(e) && !atomic_load(&stop_requested))
			kube_sleep(0.1, NULL);
		if (atomic_load(&stop_requested)) {
			status = 0;
			goto out;
		}
	}

	{
		struct reconciler_config rc_cfg = {
		    .client = app.client,
		    .ns = o.ns,
		    .workers = o.workers,
		    .max_concurrent_loads = o.max_concurrent_loads,
		    .resync = o.resync,
		    .load_timeout = o.load_timeout,
		    .agent_timeout = o.agent_timeout,
		    .agent_token = agent_token,
		    .identity = identity,
		    .delete_attempts = o.delete_attempts,
		    .retry_max_delay = o.retry_max_delay,
		    .watch_timeout_min = o.watch_timeout,
		    .watch_timeout_max = o.watch_timeout,
		    .log = log_sink,
		    .log_user = &app,
		};
		struct reconciler *rec;

		if (reconciler_new(&rec, &rc_cfg, &err)) {
			logmsg("error", "%s", err.msg);
			goto out;
		}
		pthread_mutex_lock(&app.lock);
		app.rec = rec;
		pthread_mutex_unlock(&app.lock);
		if (reconciler_start(rec, &err)) {
			logmsg("error", "%s", err.msg);
			goto out;
		}
		logmsg("info",
		       "controller started (workers %d, max concurrent loads %d, resync %.0fs)",
		       o.workers, o.max_concurrent_loads, o.resync);
	}

	while (!atomic_load(&stop_requested) && !atomic_load(&lost_lease))
		kube_sleep(0.1, NULL);
	if (atomic_load(&lost_lease)) {
		/* another replica may already act: stop at once, do not clean up */
		logmsg("error", "lost the lease; exiting so that a restart starts clean");
		_exit(1);
	}
	logmsg("info", "shutting down");
	status = 0;
out:
	if (app.rec)
		reconciler_stop(app.rec); /* before the lease goes, so nothing writes after */
	if (app.elector)
		kube_elector_stop(app.elector); /* releases the lease */
	op_httpd_stop(metrics);
	op_httpd_stop(health);
	pthread_mutex_lock(&app.lock);
	reconciler_free(app.rec);
	app.rec = NULL;
	kube_elector_free(app.elector);
	app.elector = NULL;
	pthread_mutex_unlock(&app.lock);
	kube_client_free(app.client);
	free(agent_token);
	agent_client_cleanup();
	curl_global_cleanup();
	return status;
}
