/* The command-line options of loraplane-agent and loraplane-generate: one
 * table from which both programs parse their flags and the environment,
 * and from which --help, --help-json and docs/cli.md (hack/make-cli-doc.py)
 * are made.
 *
 * Each option may also come from the environment: LORAPLANE_<NAME> (upper
 * case, '-' as '_') and the aliases of its entry (NIM_*, VLLM_*), tried in
 * that order; the first one set and not empty counts. A flag on the command
 * line wins over the environment, and a list given by flags replaces the
 * environment's. Which programs read which variables is in the entry
 * (loraplane-generate reads only LORAPLANE_MODEL, as it always did). */
#ifndef LP_AGENT_OPTIONS_H
#define LP_AGENT_OPTIONS_H

#include <stdbool.h>
#include <stddef.h>

#include "agent/engine/engine.h"
#include "common/buf.h"
#include "common/err.h"

/* The programs, as bits of lp_option.programs. */
enum lp_prog {
	LP_PROG_AGENT = 1 << 0,
	LP_PROG_GENERATE = 1 << 1,
};

enum lp_value_type {
	LP_VALUE_INT,    /* an integer in [min, max] */
	LP_VALUE_NUMBER, /* a number in [fmin, fmax] (infinite: unbounded) */
	LP_VALUE_STRING,
	LP_VALUE_FLAG,   /* no value; from the environment 1/true/yes/on or 0/false/no/off */
	LP_VALUE_ENUM,   /* one of choices (or an alias of one) */
	LP_VALUE_LIST,   /* repeatable; each value may hold several items */
	LP_VALUE_ACTION, /* --help, --help-json, --version: parsing stops there */
};

/* Every option of both programs; the table in options.c has one entry
 * per id, in this order. */
enum lp_opt {
	/* model and device */
	LP_OPT_MODEL,
	LP_OPT_SERVED_MODEL_NAME,
	LP_OPT_DEVICE,
	LP_OPT_THREADS,
	LP_OPT_CHAT_TEMPLATE,
	/* engine */
	LP_OPT_MAX_NUM_SEQS,
	LP_OPT_MAX_MODEL_LEN,
	LP_OPT_MAX_BATCHED_TOKENS,
	LP_OPT_KV_CACHE_BYTES,
	LP_OPT_GPU_MEMORY_UTILIZATION,
	LP_OPT_KV_CACHE_DTYPE,
	LP_OPT_ENABLE_PREFIX_CACHING,
	LP_OPT_NO_ENABLE_PREFIX_CACHING,
	/* adapters */
	LP_OPT_MAX_LORAS,
	LP_OPT_MAX_CPU_LORAS,
	LP_OPT_MAX_LORA_RANK,
	LP_OPT_ALLOW_BASE_MISMATCH,
	LP_OPT_LORA_DIR,
	LP_OPT_LORA_REFRESH_INTERVAL,
	LP_OPT_LORA_MODULES,
	LP_OPT_LORA_CACHE_DIR,
	LP_OPT_LORA_CACHE_MAX_BYTES,
	LP_OPT_ALLOW_INSECURE_SOURCE_ENDPOINTS,
	LP_OPT_LORA_RESOLVER,
	LP_OPT_LORA_RESOLVER_NEGATIVE_TTL,
	LP_OPT_LORA,
	LP_OPT_ADAPTER,
	/* server */
	LP_OPT_HOST,
	LP_OPT_PORT,
	LP_OPT_ADMIN_PORT,
	LP_OPT_HTTP_THREADS,
	LP_OPT_HTTP_HEADER_TIMEOUT,
	LP_OPT_HTTP_BODY_TIMEOUT,
	LP_OPT_HTTP_MAX_CONNECTIONS,
	LP_OPT_MAX_REQUEST_BYTES,
	LP_OPT_MAX_QUEUED_REQUESTS,
	LP_OPT_DRAIN_TIMEOUT,
	/* security */
	LP_OPT_API_KEY_FILE,
	LP_OPT_ADMIN_TOKEN_FILE,
	LP_OPT_ALLOW_RUNTIME_LORA_UPDATING,
	LP_OPT_ALLOWED_LOCAL_ROOTS,
	LP_OPT_TLS_CERT,
	LP_OPT_TLS_KEY,
	/* logging */
	LP_OPT_LOG_FORMAT,
	LP_OPT_LOG_LEVEL,
	/* prompts (loraplane-generate) */
	LP_OPT_PROMPT,
	LP_OPT_PROMPTS_FILE,
	LP_OPT_CHAT,
	LP_OPT_SYSTEM,
	LP_OPT_MAX_TOKENS,
	LP_OPT_STOP,
	LP_OPT_IGNORE_EOS,
	/* sampling (loraplane-generate) */
	LP_OPT_TEMPERATURE,
	LP_OPT_TOP_P,
	LP_OPT_TOP_K,
	LP_OPT_MIN_P,
	LP_OPT_PRESENCE_PENALTY,
	LP_OPT_FREQUENCY_PENALTY,
	LP_OPT_REPETITION_PENALTY,
	LP_OPT_SEED,
	/* actions */
	LP_OPT_HELP,
	LP_OPT_HELP_JSON,
	LP_OPT_VERSION,
	LP_OPT_COUNT
};

#define LP_OPTION_MAX_ALIASES 3

/* One entry of the table. Strings are static. */
struct lp_option {
	enum lp_opt id;
	const char *name;    /* the long flag without "--" */
	const char *metavar; /* "N", "PATH"; NULL for flags and actions (enums: the choices) */
	enum lp_value_type type;
	long long min, max;         /* LP_VALUE_INT */
	double fmin, fmax;          /* LP_VALUE_NUMBER */
	const char *const *choices; /* LP_VALUE_ENUM: NULL-terminated */
	/* LP_VALUE_ENUM: more words accepted, as pairs {alias, choice},
	 * NULL-terminated */
	const char *const *aliases;
	/* LP_VALUE_LIST: the characters that separate items within one value
	 * (NULL: none); values from the environment are split on white
	 * space too */
	const char *split;
	/* LP_VALUE_LIST: the words after the flag, up to the next one that
	 * starts with '-', are items too (vLLM's --lora-modules a=x b=y) */
	bool greedy;
	const char *env[LP_OPTION_MAX_ALIASES]; /* aliases tried after LORAPLANE_<NAME> */
	unsigned programs;                      /* the LP_PROG_* that accept it */
	unsigned env_programs;                  /* the LP_PROG_* that read its variables */
	const char *def;                        /* the default, as help shows it; NULL: none */
	const char *def_generate;               /* loraplane-generate's, where it differs */
	const char *group;                      /* the heading in --help */
	const char *help;                       /* one line (help wraps it) */
};

/* The table: LP_OPT_COUNT entries, entry i has id i. */
const struct lp_option *lp_options_table(void);

/* One value, as the parser hands it to the program. */
struct lp_option_value {
	const char *text; /* as given ("" for a flag; an enum's choice; one item of a list) */
	long long i;      /* LP_VALUE_INT; LP_VALUE_ENUM: the index in choices */
	double d;         /* LP_VALUE_NUMBER */
	bool b;           /* LP_VALUE_FLAG: true, or what the environment said */
	bool from_env;
};

/* Stores one value into the program's settings: called once per option
 * given (once per item of a list). The text is valid until
 * lp_options_release(). Returns 0, or a negative code with err filled
 * (what is wrong with the value; the parser adds where it came from). */
typedef int (*lp_option_set_fn)(void *ctx, enum lp_opt id, const struct lp_option_value *v,
                                struct lp_err *err);

enum lp_options_action {
	LP_OPTIONS_RUN,       /* every option was stored: run */
	LP_OPTIONS_HELP,      /* --help was given */
	LP_OPTIONS_HELP_JSON, /* --help-json */
	LP_OPTIONS_VERSION,   /* --version */
};

/* What the parser keeps for the program: the copies that list items from
 * the environment point into. */
struct lp_options {
	enum lp_prog prog;
	char **owned;
	size_t n_owned;
};

/* Parses argv (borrowed; argv[0] is the program) and then the environment
 * of every option the program reads that no flag gave, calling set for
 * each value, already checked against the entry's type and range.
 * *action says whether to run or what was asked instead (parsing stops
 * at --help, --help-json, --version). Returns 0, or -EINVAL with err
 * filled ("'--port' needs an integer in [0, 65535], got 'x'"), for exit
 * status 2. lp_options_release(o) frees what the values point into,
 * after either result. */
int lp_options_parse(struct lp_options *o, enum lp_prog prog, int argc, char **argv,
                     lp_option_set_fn set, void *ctx, enum lp_options_action *action,
                     struct lp_err *err);
void lp_options_release(struct lp_options *o);

/* Stores an engine setting both programs take (--max-loras, --kv-cache-bytes,
 * ...) into ec; false when id is not one of them. */
bool lp_options_set_engine(struct lp_engine_config *ec, enum lp_opt id,
                           const struct lp_option_value *v);

/* The usage line(s) of the program, for an error: "usage: ...\n". */
const char *lp_options_usage(enum lp_prog prog);

/* Appends the program's --help text (80 columns), --help-json (the whole
 * table as a JSON array, both programs' options) or --version line to out.
 * Return 0 or the buffer's error. */
int lp_options_help(enum lp_prog prog, struct lp_buf *out, struct lp_err *err);
int lp_options_help_json(struct lp_buf *out, struct lp_err *err);
int lp_options_version(enum lp_prog prog, struct lp_buf *out, struct lp_err *err);

/* Prints what action (not LP_OPTIONS_RUN) asked for to stdout, or the
 * reason it could not to stderr. Returns 0 or -1. */
int lp_options_answer(enum lp_prog prog, enum lp_options_action action);

#endif
