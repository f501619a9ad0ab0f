/* The option table of loraplane-agent and loraplane-generate (options.h):
 * the entries, the parser of flags and environment, and the --help,
 * --help-json and --version texts made from the entries. */
#include "agent/options.h"

#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/version.h"

#define AGENT    LP_PROG_AGENT
#define GENERATE LP_PROG_GENERATE
#define BOTH     (LP_PROG_AGENT | LP_PROG_GENERATE)

/* Who accepts an option and who reads its environment variables: the
 * agent reads every option's; loraplane-generate only LORAPLANE_MODEL
 * (kept as it was: a shell set up for an agent should not change what
 * generate does). */
#define FOR_AGENT    .programs = AGENT, .env_programs = AGENT
#define FOR_BOTH     .programs = BOTH, .env_programs = AGENT
#define FOR_GENERATE .programs = GENERATE, .env_programs = 0

#define INT_IN(lo, hi)    .type = LP_VALUE_INT, .min = (lo), .max = (hi)
#define NUMBER_IN(lo, hi) .type = LP_VALUE_NUMBER, .fmin = (lo), .fmax = (hi)
#define ANY_NUMBER        NUMBER_IN(-HUGE_VAL, HUGE_VAL)

#define G_MODEL    "Model and device"
#define G_ENGINE   "Engine"
#define G_ADAPTERS "Adapters"
#define G_SERVER   "HTTP server"
#define G_SECURITY "Security"
#define G_LOGGING  "Logging"
#define G_PROMPTS  "Prompts"
#define G_SAMPLING "Sampling"
#define G_GENERAL  "General"

/* --help's headings, in order */
static const char *const groups[] = {
    G_MODEL,  G_PROMPTS,  G_SAMPLING, G_ENGINE,  G_ADAPTERS,
    G_SERVER, G_SECURITY, G_LOGGING,  G_GENERAL,
};

static const char *const chat_templates[] = {
    "chatml", "llama3", "llama2", "mistral", "qwen3", "gemma", "llama3.1", "mistral-v0.3", NULL};
/* vLLM's words; "auto" is the device's preferred type */
static const char *const kv_dtypes[] = {"auto", "float32", "float16", "bfloat16", NULL};
static const char *const kv_dtype_aliases[] = {"f32",     "float32", "f16",      "float16", "half",
                                               "float16", "bf16",    "bfloat16", NULL};
static const char *const log_formats[] = {"text", "json", NULL};
static const char *const log_levels[] = {"debug", "info", "warn", "error", NULL};

static const struct lp_option table[LP_OPT_COUNT] = {
    /* model and device */
    {.id = LP_OPT_MODEL,
     .name = "model",
     .metavar = "PATH",
     .type = LP_VALUE_STRING,
     .programs = BOTH,
     .env_programs = BOTH,
     .def = "required",
     .group = G_MODEL,
     .help = "a .gguf file or a Hugging Face model directory (config.json, *.safetensors, "
             "tokenizer.json)"},
    {.id = LP_OPT_SERVED_MODEL_NAME,
     .name = "served-model-name",
     .metavar = "NAME",
     .type = LP_VALUE_STRING,
     FOR_AGENT,
     .def = "the file or directory stem",
     .group = G_MODEL,
     .help = "the base model's name in the API"},
    {.id = LP_OPT_DEVICE,
     .name = "device",
     .metavar = "cpu|cuda[:N]|auto",
     .type = LP_VALUE_STRING,
     FOR_BOTH,
     .def = "auto",
     .def_generate = "cpu",
     .group = G_MODEL,
     .help = "where the model runs: the CPU, CUDA device N (0), or auto: CUDA device 0 when it "
             "opens, else the CPU"},
    {.id = LP_OPT_THREADS,
     .name = "threads",
     .metavar = "N",
     INT_IN(0, 4096),
     FOR_BOTH,
     .def = "every CPU",
     .group = G_MODEL,
     .help = "compute threads on the CPU (0: one per CPU)"},
    {.id = LP_OPT_CHAT_TEMPLATE,
     .name = "chat-template",
     .type = LP_VALUE_ENUM,
     .choices = chat_templates,
     FOR_BOTH,
     .def = "detected from the model",
     .group = G_MODEL,
     .help = "the chat template to use instead of detecting the model's"},

    /* engine */
    {.id = LP_OPT_MAX_NUM_SEQS,
     .name = "max-num-seqs",
     .metavar = "N",
     INT_IN(1, 4096),
     FOR_BOTH,
     .def = "32",
     .group = G_ENGINE,
     .help = "sequences running at once; more requests wait their turn"},
    {.id = LP_OPT_MAX_MODEL_LEN,
     .name = "max-model-len",
     .metavar = "N",
     INT_IN(2, 1 << 24),
     FOR_BOTH,
     .def = "the model's",
     .group = G_ENGINE,
     .help = "prompt and completion tokens of one sequence at most"},
    {.id = LP_OPT_MAX_BATCHED_TOKENS,
     .name = "max-batched-tokens",
     .metavar = "N",
     INT_IN(1, 1 << 20),
     FOR_BOTH,
     .def = "512",
     .group = G_ENGINE,
     .help = "tokens per engine step (the prefill chunk size)"},
    {.id = LP_OPT_KV_CACHE_BYTES,
     .name = "kv-cache-bytes",
     .metavar = "N",
     INT_IN(1, LONG_MAX),
     FOR_BOTH,
     .def = "CPU: 536870912; GPU: from --gpu-memory-utilization",
     .group = G_ENGINE,
     .help = "the KV cache's size in bytes; it must hold one --max-model-len sequence"},
    {.id = LP_OPT_GPU_MEMORY_UTILIZATION,
     .name = "gpu-memory-utilization",
     .metavar = "F",
     NUMBER_IN(0.01, 1),
     FOR_BOTH,
     .def = "0.9",
     .group = G_ENGINE,
     .help = "on a GPU, the KV cache takes what F of the device's memory leaves after the "
             "weights, LoRA slots and workspaces; ignored with --kv-cache-bytes"},
    {.id = LP_OPT_KV_CACHE_DTYPE,
     .name = "kv-cache-dtype",
     .type = LP_VALUE_ENUM,
     .choices = kv_dtypes,
     .aliases = kv_dtype_aliases,
     FOR_BOTH,
     .def = "auto",
     .group = G_ENGINE,
     .help = "the KV cache's type; auto: float32 on the CPU, float16 on CUDA"},
    {.id = LP_OPT_ENABLE_PREFIX_CACHING,
     .name = "enable-prefix-caching",
     .type = LP_VALUE_FLAG,
     FOR_BOTH,
     .def = "on",
     .group = G_ENGINE,
     .help = "keep full KV blocks after their request and reuse them for a later prompt of "
             "the same adapter that starts with the same tokens (the default)"},
    {.id = LP_OPT_NO_ENABLE_PREFIX_CACHING,
     .name = "no-enable-prefix-caching",
     .type = LP_VALUE_FLAG,
     FOR_BOTH,
     .def = "off",
     .group = G_ENGINE,
     .help = "turn automatic prefix caching off: every prompt is computed in full"},

    /* adapters */
    {.id = LP_OPT_MAX_LORAS,
     .name = "max-loras",
     .metavar = "N",
     INT_IN(1, 4096),
     .env = {"NIM_MAX_GPU_LORAS"},
     FOR_BOTH,
     .def = "8",
     .group = G_ADAPTERS,
     .help = "device slots: distinct adapters in one engine step"},
    {.id = LP_OPT_MAX_CPU_LORAS,
     .name = "max-cpu-loras",
     .metavar = "N",
     INT_IN(1, 1 << 20),
     .env = {"NIM_MAX_CPU_LORAS"},
     FOR_BOTH,
     .def = "16",
     .group = G_ADAPTERS,
     .help = "adapters kept in host memory; the least recently used is evicted"},
    {.id = LP_OPT_MAX_LORA_RANK,
     .name = "max-lora-rank",
     .metavar = "R",
     INT_IN(1, 4096),
     .env = {"NIM_MAX_LORA_RANK"},
     FOR_BOTH,
     .def = "64",
     .group = G_ADAPTERS,
     .help = "adapters of a larger rank are refused"},
    {.id = LP_OPT_ALLOW_BASE_MISMATCH,
     .name = "allow-base-mismatch",
     .type = LP_VALUE_FLAG,
     FOR_BOTH,
     .def = "off",
     .group = G_ADAPTERS,
     .help = "accept adapters whose base_model_name_or_path names another model"},
    {.id = LP_OPT_LORA_DIR,
     .name = "lora-dir",
     .metavar = "DIR",
     .type = LP_VALUE_STRING,
     .env = {"NIM_PEFT_SOURCE"},
     FOR_AGENT,
     .group = G_ADAPTERS,
     .help = "each subdirectory is an adapter named after it, loaded at startup"},
    {.id = LP_OPT_LORA_REFRESH_INTERVAL,
     .name = "lora-refresh-interval",
     .metavar = "S",
     NUMBER_IN(0, 86400),
     .env = {"NIM_PEFT_REFRESH_INTERVAL"},
     FOR_AGENT,
     .def = "never",
     .group = G_ADAPTERS,
     .help = "rescan --lora-dir every S seconds: new subdirectories load, removed ones "
             "unload"},
    {.id = LP_OPT_LORA_MODULES,
     .name = "lora-modules",
     .metavar = "NAME=URI",
     .type = LP_VALUE_LIST,
     .greedy = true,
     FOR_AGENT,
     .group = G_ADAPTERS,
     .help = "adapters loaded at startup (file://, a path, s3://, hf://, https://), or "
             "vLLM's {\"name\": ..., \"path\": ...}; several may follow one flag, the flag "
             "may repeat, and the environment's are separated by white space"},
    {.id = LP_OPT_LORA_CACHE_DIR,
     .name = "lora-cache-dir",
     .metavar = "DIR",
     .type = LP_VALUE_STRING,
     .env = {"LORAPLANE_LORA_CACHE"},
     FOR_AGENT,
     .def = "$TMPDIR/loraplane-lora-cache-<uid>",
     .group = G_ADAPTERS,
     .help = "where downloaded adapters go (this user's alone, mode 0700)"},
    {.id = LP_OPT_LORA_CACHE_MAX_BYTES,
     .name = "lora-cache-max-bytes",
     .metavar = "N",
     INT_IN(1, LONG_MAX),
     FOR_AGENT,
     .def = "34359738368 (32 GiB)",
     .group = G_ADAPTERS,
     .help = "bytes of downloaded adapters kept; the least recently used that no loaded "
             "adapter needs are evicted"},
    {.id = LP_OPT_ALLOW_INSECURE_SOURCE_ENDPOINTS,
     .name = "allow-insecure-source-endpoints",
     .type = LP_VALUE_FLAG,
     FOR_AGENT,
     .def = "off",
     .group = G_ADAPTERS,
     .help = "accept http:// AWS_ENDPOINT_URL and HF_ENDPOINT in a load request's "
             "credentials (trusted networks only)"},
    {.id = LP_OPT_LORA_RESOLVER,
     .name = "lora-resolver",
     .metavar = "URI_PREFIX",
     .type = LP_VALUE_STRING,
     FOR_AGENT,
     .def = "off",
     .group = G_ADAPTERS,
     .help = "a request for an unknown model that is a valid adapter name loads "
             "URI_PREFIX/NAME first: file:///DIR (below --allowed-local-roots), "
             "s3://BUCKET[/PREFIX] or hf://ORG; one prefix"},
    {.id = LP_OPT_LORA_RESOLVER_NEGATIVE_TTL,
     .name = "lora-resolver-negative-ttl",
     .metavar = "S",
     NUMBER_IN(0, 86400),
     FOR_AGENT,
     .def = "30",
     .group = G_ADAPTERS,
     .help = "seconds a name that --lora-resolver found no usable adapter for answers 404 "
             "(or 422) without asking the source again; 0: always ask"},
    {.id = LP_OPT_LORA,
     .name = "lora",
     .metavar = "NAME=PATH",
     .type = LP_VALUE_LIST,
     FOR_GENERATE,
     .group = G_ADAPTERS,
     .help = "load an adapter (a PEFT, TensorRT-LLM or NeMo directory, or a .nemo file); "
             "repeatable"},
    {.id = LP_OPT_ADAPTER,
     .name = "adapter",
     .metavar = "NAME",
     .type = LP_VALUE_STRING,
     FOR_GENERATE,
     .def = "the base model",
     .group = G_ADAPTERS,
     .help = "apply that adapter to --prompt; with --prompts-file, lines 'NAME<TAB>prompt' "
             "pick one per prompt ('-': the base model)"},

    /* HTTP server */
    {.id = LP_OPT_HOST,
     .name = "host",
     .metavar = "ADDR",
     .type = LP_VALUE_STRING,
     FOR_AGENT,
     .def = "every interface",
     .group = G_SERVER,
     .help = "the IPv4 address both ports listen on"},
    {.id = LP_OPT_PORT,
     .name = "port",
     .metavar = "N",
     INT_IN(0, 65535),
     FOR_AGENT,
     .def = "8000",
     .group = G_SERVER,
     .help = "the public port (OpenAI API); 0 picks a free port"},
    {.id = LP_OPT_ADMIN_PORT,
     .name = "admin-port",
     .metavar = "N",
     INT_IN(0, 65535),
     FOR_AGENT,
     .def = "8001",
     .group = G_SERVER,
     .help = "the admin port (adapter management, metrics, health); 0 picks a free port"},
    {.id = LP_OPT_HTTP_THREADS,
     .name = "http-threads",
     .metavar = "N",
     INT_IN(2, 1024),
     FOR_AGENT,
     .def = "64",
     .group = G_SERVER,
     .help = "HTTP worker threads per port; a streaming response holds one"},
    {.id = LP_OPT_HTTP_HEADER_TIMEOUT,
     .name = "http-header-timeout",
     .metavar = "S",
     NUMBER_IN(0.1, 3600),
     FOR_AGENT,
     .def = "5",
     .group = G_SERVER,
     .help = "seconds to receive a request head; then 408 and closed"},
    {.id = LP_OPT_HTTP_BODY_TIMEOUT,
     .name = "http-body-timeout",
     .metavar = "S",
     NUMBER_IN(0.1, 86400),
     FOR_AGENT,
     .def = "30",
     .group = G_SERVER,
     .help = "seconds to receive a body after its head; then closed"},
    {.id = LP_OPT_HTTP_MAX_CONNECTIONS,
     .name = "http-max-connections",
     .metavar = "N",
     INT_IN(4, 1 << 20),
     FOR_AGENT,
     .def = "1024",
     .group = G_SERVER,
     .help = "open client connections per port"},
    {.id = LP_OPT_MAX_REQUEST_BYTES,
     .name = "max-request-bytes",
     .metavar = "N",
     INT_IN(1024, 1L << 30),
     FOR_AGENT,
     .def = "4194304",
     .group = G_SERVER,
     .help = "the largest request body (413 above)"},
    {.id = LP_OPT_MAX_QUEUED_REQUESTS,
     .name = "max-queued-requests",
     .metavar = "N",
     INT_IN(1, 1 << 20),
     FOR_AGENT,
     .def = "1024",
     .group = G_SERVER,
     .help = "requests waiting to enter the engine; one more gets 429 queue_full"},
    {.id = LP_OPT_DRAIN_TIMEOUT,
     .name = "drain-timeout",
     .metavar = "S",
     NUMBER_IN(0, 3600),
     FOR_AGENT,
     .def = "30",
     .group = G_SERVER,
     .help = "on SIGTERM, how long running requests may take before they are cancelled"},

    /* security */
    {.id = LP_OPT_API_KEY_FILE,
     .name = "api-key-file",
     .metavar = "F",
     .type = LP_VALUE_STRING,
     FOR_AGENT,
     .def = "off",
     .group = G_SECURITY,
     .help = "a file whose first line is the bearer token required on the public /v1/ "
             "routes"},
    {.id = LP_OPT_ADMIN_TOKEN_FILE,
     .name = "admin-token-file",
     .metavar = "F",
     .type = LP_VALUE_STRING,
     FOR_AGENT,
     .def = "off (a warning)",
     .group = G_SECURITY,
     .help = "a file whose first line is the bearer token required on the admin port "
             "(all but /health)"},
    {.id = LP_OPT_ALLOW_RUNTIME_LORA_UPDATING,
     .name = "allow-runtime-lora-updating",
     .type = LP_VALUE_FLAG,
     .env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING"},
     FOR_AGENT,
     .def = "off",
     .group = G_SECURITY,
     .help = "serve vLLM's load and unload endpoints on the public port too"},
    {.id = LP_OPT_ALLOWED_LOCAL_ROOTS,
     .name = "allowed-local-roots",
     .metavar = "DIRS",
     .type = LP_VALUE_LIST,
     .split = ",:",
     .greedy = true,
     FOR_AGENT,
     .def = "none",
     .group = G_SECURITY,
     .help = "file:// loads through the API only below these directories (comma, colon or "
             "space separated; repeatable)"},
    {.id = LP_OPT_TLS_CERT,
     .name = "tls-cert",
     .metavar = "F",
     .type = LP_VALUE_STRING,
     FOR_AGENT,
     .group = G_SECURITY,
     .help = "PEM certificate (chain): HTTPS on both ports; needs --tls-key"},
    {.id = LP_OPT_TLS_KEY,
     .name = "tls-key",
     .metavar = "F",
     .type = LP_VALUE_STRING,
     FOR_AGENT,
     .group = G_SECURITY,
     .help = "PEM private key of --tls-cert"},

    /* logging */
    {.id = LP_OPT_LOG_FORMAT,
     .name = "log-format",
     .type = LP_VALUE_ENUM,
     .choices = log_formats,
     FOR_AGENT,
     .def = "text",
     .group = G_LOGGING,
     .help = "one line per event on stderr, as text or as a JSON object"},
    {.id = LP_OPT_LOG_LEVEL,
     .name = "log-level",
     .type = LP_VALUE_ENUM,
     .choices = log_levels,
     FOR_AGENT,
     .def = "info",
     .group = G_LOGGING,
     .help = "the lowest level logged"},

    /* prompts */
    {.id = LP_OPT_PROMPT,
     .name = "prompt",
     .metavar = "TEXT",
     .type = LP_VALUE_STRING,
     FOR_GENERATE,
     .group = G_PROMPTS,
     .help = "one prompt; the completion streams to stdout"},
    {.id = LP_OPT_PROMPTS_FILE,
     .name = "prompts-file",
     .metavar = "F",
     .type = LP_VALUE_STRING,
     FOR_GENERATE,
     .group = G_PROMPTS,
     .help = "one prompt per line, run as one batch; prints one JSON object per prompt: "
             "{index, prompt, completion, prompt_tokens, completion_tokens, finish_reason}"},
    {.id = LP_OPT_CHAT,
     .name = "chat",
     .type = LP_VALUE_FLAG,
     FOR_GENERATE,
     .def = "off",
     .group = G_PROMPTS,
     .help = "wrap each prompt in the model's chat template as a user message"},
    {.id = LP_OPT_SYSTEM,
     .name = "system",
     .metavar = "TEXT",
     .type = LP_VALUE_STRING,
     FOR_GENERATE,
     .group = G_PROMPTS,
     .help = "a system message for --chat"},
    {.id = LP_OPT_MAX_TOKENS,
     .name = "max-tokens",
     .metavar = "N",
     INT_IN(1, 1 << 24),
     FOR_GENERATE,
     .def = "128",
     .group = G_PROMPTS,
     .help = "new tokens at most"},
    {.id = LP_OPT_STOP,
     .name = "stop",
     .metavar = "TEXT",
     .type = LP_VALUE_LIST,
     FOR_GENERATE,
     .group = G_PROMPTS,
     .help = "a stop string; the output ends before it (repeatable, up to 16)"},
    {.id = LP_OPT_IGNORE_EOS,
     .name = "ignore-eos",
     .type = LP_VALUE_FLAG,
     FOR_GENERATE,
     .def = "off",
     .group = G_PROMPTS,
     .help = "keep generating past end-of-sequence tokens"},

    /* sampling */
    {.id = LP_OPT_TEMPERATURE,
     .name = "temperature",
     .metavar = "T",
     ANY_NUMBER,
     FOR_GENERATE,
     .def = "0",
     .group = G_SAMPLING,
     .help = "0 is greedy"},
    {.id = LP_OPT_TOP_P,
     .name = "top-p",
     .metavar = "P",
     ANY_NUMBER,
     FOR_GENERATE,
     .def = "1 (off)",
     .group = G_SAMPLING,
     .help = "nucleus sampling: the smallest set of tokens whose probabilities add up to P"},
    {.id = LP_OPT_TOP_K,
     .name = "top-k",
     .metavar = "K",
     INT_IN(-1, 1 << 24),
     FOR_GENERATE,
     .def = "off",
     .group = G_SAMPLING,
     .help = "sample from the K most likely tokens (0 or -1: off)"},
    {.id = LP_OPT_MIN_P,
     .name = "min-p",
     .metavar = "P",
     ANY_NUMBER,
     FOR_GENERATE,
     .def = "0 (off)",
     .group = G_SAMPLING,
     .help = "drop tokens less likely than P times the most likely one"},
    {.id = LP_OPT_PRESENCE_PENALTY,
     .name = "presence-penalty",
     .metavar = "X",
     ANY_NUMBER,
     FOR_GENERATE,
     .def = "0",
     .group = G_SAMPLING,
     .help = "OpenAI's, on generated tokens"},
    {.id = LP_OPT_FREQUENCY_PENALTY,
     .name = "frequency-penalty",
     .metavar = "X",
     ANY_NUMBER,
     FOR_GENERATE,
     .def = "0",
     .group = G_SAMPLING,
     .help = "OpenAI's, on generated tokens"},
    {.id = LP_OPT_REPETITION_PENALTY,
     .name = "repetition-penalty",
     .metavar = "X",
     ANY_NUMBER,
     FOR_GENERATE,
     .def = "1 (off)",
     .group = G_SAMPLING,
     .help = "HF's and vLLM's, on prompt and generated tokens"},
    {.id = LP_OPT_SEED,
     .name = "seed",
     .metavar = "S",
     INT_IN(0, LLONG_MAX),
     FOR_GENERATE,
     .def = "random",
     .group = G_SAMPLING,
     .help = "the same seed gives the same output"},

    /* actions */
    {.id = LP_OPT_HELP,
     .name = "help",
     .type = LP_VALUE_ACTION,
     .programs = BOTH,
     .group = G_GENERAL,
     .help = "print this help and exit"},
    {.id = LP_OPT_HELP_JSON,
     .name = "help-json",
     .type = LP_VALUE_ACTION,
     .programs = BOTH,
     .group = G_GENERAL,
     .help = "print every option of loraplane-agent and loraplane-generate as JSON (for "
             "docs/cli.md) and exit"},
    {.id = LP_OPT_VERSION,
     .name = "version",
     .type = LP_VALUE_ACTION,
     .programs = BOTH,
     .group = G_GENERAL,
     .help = "print the version and exit"},
};

static const struct prog_info {
	enum lp_prog prog;
	const char *name;
	const char *usage;
	const char *about;
} progs[] = {
    {LP_PROG_AGENT, "loraplane-agent",
     "usage: loraplane-agent --model PATH [options]\n"
     "       loraplane-agent fetch [options] URI DEST\n",
     "Serves a base model and its LoRA adapters: the OpenAI API on --port, adapter "
     "management, metrics and health on --admin-port (docs/api.md). Every option may also "
     "be set in the environment, by the names shown; a flag wins over the environment, "
     "and a list given by flags replaces the environment's. Options without a value read 1, "
     "true, yes or on (and 0, false, no or off) from the environment. Exit status: 0 after SIGTERM "
     "or "
     "SIGINT, 1 for a startup error, 2 for bad usage. The fetch subcommand downloads a "
     "model for --model (see loraplane-agent fetch --help)."},
    {LP_PROG_GENERATE, "loraplane-generate",
     "usage: loraplane-generate --model PATH (--prompt TEXT | --prompts-file F)\n"
     "                          [options]\n",
     "Generates text for one prompt, or for every line of a file as one batch, on the "
     "engine loraplane-agent embeds (docs/generate.md). --model may also come from "
     "LORAPLANE_MODEL. Exit status: 0, 1 on any error, 2 for bad usage."},
};

static const struct prog_info *prog_info(enum lp_prog prog)
{
	return prog == LP_PROG_GENERATE ? &progs[1] : &progs[0];
}

const struct lp_option *lp_options_table(void)
{
	return table;
}

const char *lp_options_usage(enum lp_prog prog)
{
	return prog_info(prog)->usage;
}

/* ---- parsing ---- */

/* LORAPLANE_LORA_DIR for "lora-dir". */
static void env_name(const char *opt, char *out, size_t cap)
{
	size_t n = (size_t)snprintf(out, cap, "LORAPLANE_");

	for (; *opt && n + 1 < cap; opt++)
		out[n++] =
		    *opt == '-' ? '_' : (char)(*opt >= 'a' && *opt <= 'z' ? *opt - 32 : *opt);
	out[n] = '\0';
}

static const struct lp_option *find(enum lp_prog prog, const char *name, size_t n)
{
	for (int i = 0; i < LP_OPT_COUNT; i++)
		if ((table[i].programs & prog) && strlen(table[i].name) == n &&
		    !strncmp(table[i].name, name, n))
			return &table[i];
	return NULL;
}

/* "a, b or c" of a NULL-terminated list. */
static void join_choices(const char *const *choices, char *out, size_t cap)
{
	size_t n = 0;

	out[0] = '\0';
	for (int i = 0; choices[i] && n < cap; i++)
		n += (size_t)snprintf(out + n, cap - n, "%s%s",
		                      i == 0            ? ""
		                      : !choices[i + 1] ? " or "
		                                        : ", ",
		                      choices[i]);
}

/* 1/true/yes/on or 0/false/no/off, from the environment. */
static int parse_bool(const struct lp_option *opt, const char *s, bool *out, struct lp_err *err)
{
	static const char *const yes[] = {"1", "true", "yes", "on"}, *const no[] = {"0", "false",
	                                                                            "no", "off"};
	for (int i = 0; i < 4; i++) {
		if (!strcasecmp(s, yes[i]) || !strcasecmp(s, no[i])) {
			*out = !strcasecmp(s, yes[i]);
			return 0;
		}
	}
	return lp_errf(err, -EINVAL,
	               "'--%s' needs 1, true, yes or on (or 0, false, no or off), got '%s'",
	               opt->name, s);
}

/* Checks one value against opt's type and hands it to set. */
static int deliver(const struct lp_option *opt, const char *text, bool from_env,
                   lp_option_set_fn set, void *ctx, struct lp_err *err)
{
	struct lp_option_value v = {.text = text, .from_env = from_env};
	char *end;

	switch (opt->type) {
	case LP_VALUE_INT:
		errno = 0;
		v.i = strtoll(text, &end, 10);
		if (errno || end == text || *end || v.i < opt->min || v.i > opt->max)
			return lp_errf(err, -EINVAL,
			               "'--%s' needs an integer in [%lld, %lld], got '%s'",
			               opt->name, opt->min, opt->max, text);
		break;
	case LP_VALUE_NUMBER:
		errno = 0;
		v.d = strtod(text, &end);
		if (errno || end == text || *end || !isfinite(v.d) ||
		    !(v.d >= opt->fmin && v.d <= opt->fmax)) {
			if (isinf(opt->fmin) && isinf(opt->fmax))
				return lp_errf(err, -EINVAL, "'--%s' needs a number, got '%s'",
				               opt->name, text);
			return lp_errf(err, -EINVAL, "'--%s' needs a number in [%g, %g], got '%s'",
			               opt->name, opt->fmin, opt->fmax, text);
		}
		break;
	case LP_VALUE_ENUM: {
		const char *word = text;
		char known[256];

		for (int i = 0; opt->aliases && opt->aliases[i]; i += 2)
			if (!strcmp(text, opt->aliases[i]))
				word = opt->aliases[i + 1];
		for (v.i = 0; opt->choices[v.i]; v.i++)
			if (!strcmp(word, opt->choices[v.i]))
				break;
		if (!opt->choices[v.i]) {
			join_choices(opt->choices, known, sizeof(known));
			return lp_errf(err, -EINVAL, "'--%s' must be %s, got '%s'", opt->name,
			               known, text);
		}
		v.text = opt->choices[v.i]; /* an alias as its choice */
		break;
	}
	case LP_VALUE_FLAG:
		v.b = true;
		if (from_env && parse_bool(opt, text, &v.b, err))
			return -EINVAL;
		break;
	case LP_VALUE_STRING:
	case LP_VALUE_LIST:
	case LP_VALUE_ACTION:
		break;
	}
	return set(ctx, opt->id, &v, err);
}

/* Hands a list value to deliver() item by item: split on opt->split (and,
 * from the environment, on white space), empty items skipped. The items
 * point into a copy that o keeps. */
static int deliver_list(struct lp_options *o, const struct lp_option *opt, const char *text,
                        bool from_env, lp_option_set_fn set, void *ctx, struct lp_err *err)
{
	char seps[32], *copy, *save = NULL, **owned;
	int rc;

	snprintf(seps, sizeof(seps), "%s%s", opt->split ? opt->split : "",
	         opt->split || from_env ? " \t\n" : "");
	if (!seps[0])
		return deliver(opt, text, from_env, set, ctx, err);
	owned = realloc(o->owned, (o->n_owned + 1) * sizeof(*owned));
	if (!owned)
		return lp_errf(err, -ENOMEM, "out of memory");
	o->owned = owned;
	copy = strdup(text);
	if (!copy)
		return lp_errf(err, -ENOMEM, "out of memory");
	o->owned[o->n_owned++] = copy;
	for (char *t = strtok_r(copy, seps, &save); t; t = strtok_r(NULL, seps, &save))
		if ((rc = deliver(opt, t, from_env, set, ctx, err)))
			return rc;
	return 0;
}

static int deliver_any(struct lp_options *o, const struct lp_option *opt, const char *text,
                       bool from_env, lp_option_set_fn set, void *ctx, struct lp_err *err)
{
	if (opt->type == LP_VALUE_LIST)
		return deliver_list(o, opt, text, from_env, set, ctx, err);
	return deliver(opt, text, from_env, set, ctx, err);
}

/* The first of LORAPLANE_<NAME> and the entry's aliases that is set and
 * not empty; NULL if none. name receives the variable's name. */
static const char *env_value(const struct lp_option *opt, char *name, size_t cap)
{
	const char *v;

	env_name(opt->name, name, cap);
	v = getenv(name);
	for (int k = 0; (!v || !*v) && k < LP_OPTION_MAX_ALIASES && opt->env[k]; k++) {
		snprintf(name, cap, "%s", opt->env[k]);
		v = getenv(name);
	}
	return v && *v ? v : NULL;
}

int lp_options_parse(struct lp_options *o, enum lp_prog prog, int argc, char **argv,
                     lp_option_set_fn set, void *ctx, enum lp_options_action *action,
                     struct lp_err *err)
{
	bool given[LP_OPT_COUNT] = {false};
	int rc;

	memset(o, 0, sizeof(*o));
	o->prog = prog;
	*action = LP_OPTIONS_RUN;
	/* the table's entries are in the order of enum lp_opt (options.h) */
	for (int i = 0; i < LP_OPT_COUNT; i++)
		if (table[i].id != (enum lp_opt)i || !table[i].name || !table[i].help)
			return lp_errf(err, -EINVAL, "option table: entry %d is out of order", i);
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *name, *eq, *value;
		const struct lp_option *opt;
		size_t n;

		if (!strcmp(a, "--")) {
			if (i + 1 < argc)
				return lp_errf(err, -EINVAL, "unexpected argument '%s'",
				               argv[i + 1]);
			break;
		}
		if (a[0] != '-' || !a[1])
			return lp_errf(err, -EINVAL, "unexpected argument '%s'", a);
		if (a[1] != '-')
			return lp_errf(err, -EINVAL, "unknown flag '%s' (see --help)", a);
		name = a + 2;
		eq = strchr(name, '=');
		n = eq ? (size_t)(eq - name) : strlen(name);
		opt = find(prog, name, n);
		if (!opt)
			return lp_errf(err, -EINVAL, "unknown flag '--%.*s' (see --help)", (int)n,
			               name);
		if (opt->type == LP_VALUE_ACTION || opt->type == LP_VALUE_FLAG) {
			if (eq)
				return lp_errf(err, -EINVAL, "'--%s' takes no value, got '%s'",
				               opt->name, eq + 1);
			if (opt->id == LP_OPT_HELP) {
				*action = LP_OPTIONS_HELP;
				return 0;
			}
			if (opt->id == LP_OPT_HELP_JSON) {
				*action = LP_OPTIONS_HELP_JSON;
				return 0;
			}
			if (opt->id == LP_OPT_VERSION) {
				*action = LP_OPTIONS_VERSION;
				return 0;
			}
			value = "";
		} else if (eq) {
			value = eq + 1;
		} else if (i + 1 < argc) {
			value = argv[++i];
		} else {
			return lp_errf(err, -EINVAL, "'--%s' needs a value", opt->name);
		}
		given[opt->id] = true;
		if ((rc = deliver_any(o, opt, value, false, set, ctx, err)))
			return rc;
		while (opt->greedy && i + 1 < argc && argv[i + 1][0] != '-')
			if ((rc = deliver_any(o, opt, argv[++i], false, set, ctx, err)))
				return rc;
	}

	/* the environment, for what no flag gave */
	for (int i = 0; i < LP_OPT_COUNT; i++) {
		const struct lp_option *opt = &table[i];
		char name[96];
		const char *v;

		if (!(opt->programs & opt->env_programs & prog) || given[i])
			continue;
		v = env_value(opt, name, sizeof(name));
		if (v && (rc = deliver_any(o, opt, v, true, set, ctx, err))) {
			char msg[LP_ERR_MSG_MAX];

			snprintf(msg, sizeof(msg), "%s", err->msg);
			return lp_errf(err, rc, "%s (from the environment variable %s)", msg, name);
		}
	}
	return 0;
}

void lp_options_release(struct lp_options *o)
{
	for (size_t i = 0; i < o->n_owned; i++)
		free(o->owned[i]);
	free(o->owned);
	o->owned = NULL;
	o->n_owned = 0;
}

/* ---- --help ---- */

#define HELP_WIDTH  80
#define HELP_INDENT 30

/* Appends text, word-wrapped at HELP_WIDTH, continuing from column *col;
 * continuation lines start at column indent. A '\1' in text is a space
 * that does not break. */
static int wrap(struct lp_buf *out, const char *text, int indent, int *col, struct lp_err *err)
{
	int rc = 0;

	while (*text && !rc) {
		size_t n = strcspn(text, " ");

		if (n == 0) {
			text++;
			continue;
		}
		if (*col > indent && *col + 1 + (int)n > HELP_WIDTH) {
			rc = lp_buf_appendf(out, err, "\n%*s", indent, "");
			*col = indent;
		} else if (*col > indent) {
			rc = lp_buf_append(out, " ", 1, err);
			(*col)++;
		}
		for (size_t k = 0; k < n && !rc; k++)
			rc = lp_buf_append(out, text[k] == '\1' ? " " : &text[k], 1, err);
		*col += (int)n;
		text += n;
	}
	return rc;
}

/* The flag as help and docs show it: "--port N", "--log-format text|json". */
static void flag_words(const struct lp_option *opt, char *out, size_t cap)
{
	size_t n = (size_t)snprintf(out, cap, "--%s", opt->name);

	if (opt->metavar) {
		n += (size_t)snprintf(out + n, n < cap ? cap - n : 0, " %s", opt->metavar);
	} else if (opt->type == LP_VALUE_ENUM) {
		for (int i = 0; opt->choices[i] && n < cap; i++)
			n += (size_t)snprintf(out + n, cap - n, "%c%s", i ? '|' : ' ',
			                      opt->choices[i]);
	}
	if (opt->greedy && n < cap)
		snprintf(out + n, cap - n, " ...");
}

static const char *prog_default(const struct lp_option *opt, enum lp_prog prog)
{
	return prog == LP_PROG_GENERATE && opt->def_generate ? opt->def_generate : opt->def;
}

static int help_option(const struct lp_option *opt, enum lp_prog prog, struct lp_buf *out,
                       struct lp_err *err)
{
	char flag[128], extra[192], env[256], name[96];
	const char *def = prog_default(opt, prog);
	int col, rc;

	flag_words(opt, flag, sizeof(flag));
	col = 2 + (int)strlen(flag);
	rc = lp_buf_appendf(out, err, "  %s", flag);
	if (!rc && col > HELP_INDENT - 2) {
		rc = lp_buf_appendf(out, err, "\n%*s", HELP_INDENT, "");
		col = HELP_INDENT;
	} else if (!rc) {
		rc = lp_buf_appendf(out, err, "%*s", HELP_INDENT - col, "");
		col = HELP_INDENT;
	}
	if (!rc)
		rc = wrap(out, opt->help, HELP_INDENT, &col, err);
	if (!rc && def) {
		/* "[default: 8000]" stays on one line when it fits on one */
		if (!strcmp(def, "required"))
			snprintf(extra, sizeof(extra), "[required]");
		else
			snprintf(extra, sizeof(extra), "[default: %s]", def);
		for (char *p = extra; *p && strlen(extra) <= HELP_WIDTH - HELP_INDENT; p++)
			if (*p == ' ')
				*p = '\1';
		rc = wrap(out, extra, HELP_INDENT, &col, err);
	}
	if (!rc && (opt->env_programs & prog)) {
		size_t n = 0;

		env_name(opt->name, name, sizeof(name));
		n += (size_t)snprintf(env, sizeof(env), "env: %s", name);
		for (int k = 0; k < LP_OPTION_MAX_ALIASES && opt->env[k] && n < sizeof(env); k++)
			n += (size_t)snprintf(env + n, sizeof(env) - n, ", %s", opt->env[k]);
		rc = lp_buf_appendf(out, err, "\n%*s", HELP_INDENT, "");
		col = HELP_INDENT;
		if (!rc)
			rc = wrap(out, env, HELP_INDENT, &col, err);
	}
	return rc ? rc : lp_buf_append(out, "\n", 1, err);
}

int lp_options_help(enum lp_prog prog, struct lp_buf *out, struct lp_err *err)
{
	const struct prog_info *p = prog_info(prog);
	int col = 0, rc;

	rc = lp_buf_appendf(out, err, "%s\n", p->usage);
	if (!rc)
		rc = wrap(out, p->about, 0, &col, err);
	if (!rc)
		rc = lp_buf_append(out, "\n", 1, err);
	for (size_t g = 0; g < sizeof(groups) / sizeof(groups[0]) && !rc; g++) {
		bool heading = false;
		for (int i = 0; i < LP_OPT_COUNT && !rc; i++) {
			if (!(table[i].programs & prog) || strcmp(table[i].group, groups[g]))
				continue;
			if (!heading) {
				rc = lp_buf_appendf(out, err, "\n%s:\n", groups[g]);
				heading = true;
			}
			if (!rc)
				rc = help_option(&table[i], prog, out, err);
		}
	}
	return rc;
}

/* ---- --help-json ---- */

static const char *type_name(enum lp_value_type t)
{
	switch (t) {
	case LP_VALUE_INT:
		return "integer";
	case LP_VALUE_NUMBER:
		return "number";
	case LP_VALUE_STRING:
		return "string";
	case LP_VALUE_FLAG:
		return "boolean";
	case LP_VALUE_ENUM:
		return "enum";
	case LP_VALUE_LIST:
		return "list";
	case LP_VALUE_ACTION:
		return "action";
	}
	return "?";
}

static json_t *prog_names(unsigned mask)
{
	json_t *a = json_array();

	for (size_t i = 0; a && i < sizeof(progs) / sizeof(progs[0]); i++)
		if (mask & progs[i].prog)
			json_array_append_new(a, json_string(progs[i].name));
	return a;
}

static json_t *option_json(const struct lp_option *opt)
{
	json_t *env = json_array(), *choices = json_null(), *defaults = json_object();
	json_t *min = json_null(), *max = json_null();
	char flag[128], name[96];
	const char *first_def = NULL;
	bool have_first = false;

	if (opt->type == LP_VALUE_INT) {
		min = json_integer(opt->min);
		max = json_integer(opt->max);
	} else if (opt->type == LP_VALUE_NUMBER) {
		min = isinf(opt->fmin) ? json_null() : json_real(opt->fmin);
		max = isinf(opt->fmax) ? json_null() : json_real(opt->fmax);
	}
	if (opt->type == LP_VALUE_ENUM) {
		choices = json_array();
		for (int i = 0; opt->choices[i]; i++)
			json_array_append_new(choices, json_string(opt->choices[i]));
	}
	if (opt->env_programs) {
		env_name(opt->name, name, sizeof(name));
		json_array_append_new(env, json_string(name));
		for (int k = 0; k < LP_OPTION_MAX_ALIASES && opt->env[k]; k++)
			json_array_append_new(env, json_string(opt->env[k]));
	}
	for (size_t i = 0; i < sizeof(progs) / sizeof(progs[0]); i++) {
		const char *d;
		if (!(opt->programs & progs[i].prog))
			continue;
		d = prog_default(opt, progs[i].prog);
		json_object_set_new(defaults, progs[i].name, d ? json_string(d) : json_null());
		if (!have_first) {
			first_def = d;
			have_first = true;
		}
	}
	flag_words(opt, flag, sizeof(flag));
	/* "o" takes the references, also when packing fails */
	return json_pack("{s:s, s:s, s:s?, s:s, s:o, s:o, s:o, s:s?, s:o, s:o, s:o, s:s, s:s, s:o}",
	                 "name", opt->name, "flag", flag, "metavar", opt->metavar, "type",
	                 type_name(opt->type), "min", min, "max", max, "choices", choices,
	                 "default", first_def, "defaults", defaults, "env", env, "env_programs",
	                 prog_names(opt->env_programs), "help", opt->help, "group", opt->group,
	                 "programs", prog_names(opt->programs));
}

int lp_options_help_json(struct lp_buf *out, struct lp_err *err)
{
	json_t *a = json_array();
	char *s;
	int rc;

	for (int i = 0; a && i < LP_OPT_COUNT; i++) {
		json_t *o = option_json(&table[i]);
		if (!o || json_array_append_new(a, o)) {
			json_decref(a);
			a = NULL;
		}
	}
	s = a ? json_dumps(a, JSON_INDENT(2) | JSON_PRESERVE_ORDER) : NULL;
	json_decref(a);
	if (!s)
		return lp_errf(err, -ENOMEM, "out of memory");
	rc = lp_buf_appendf(out, err, "%s\n", s);
	free(s);
	return rc;
}

/* ---- --version ---- */

int lp_options_version(enum lp_prog prog, struct lp_buf *out, struct lp_err *err)
{
	return lp_buf_appendf(out, err, "%s %s\n", prog_info(prog)->name, LP_VERSION);
}

bool lp_options_set_engine(struct lp_engine_config *ec, enum lp_opt id,
                           const struct lp_option_value *v)
{
	/* the order of the --kv-cache-dtype choices; COUNT: the device's own */
	static const enum lp_dtype kv_types[] = {LP_DTYPE_COUNT, LP_DTYPE_F32, LP_DTYPE_F16,
	                                         LP_DTYPE_BF16};

	switch (id) {
	case LP_OPT_MAX_NUM_SEQS:
		ec->max_num_seqs = (int)v->i;
		return true;
	case LP_OPT_MAX_BATCHED_TOKENS:
		ec->max_batched_tokens = (int)v->i;
		return true;
	case LP_OPT_MAX_MODEL_LEN:
		ec->max_model_len = (int)v->i;
		return true;
	case LP_OPT_KV_CACHE_BYTES:
		ec->kv_cache_bytes = (size_t)v->i;
		return true;
	case LP_OPT_GPU_MEMORY_UTILIZATION:
		ec->gpu_memory_utilization = v->d;
		return true;
	case LP_OPT_KV_CACHE_DTYPE:
		ec->kv_type = kv_types[v->i];
		return true;
	case LP_OPT_MAX_LORA_RANK:
		ec->max_lora_rank = (int)v->i;
		return true;
	case LP_OPT_MAX_LORAS:
		ec->max_loras = (int)v->i;
		return true;
	case LP_OPT_MAX_CPU_LORAS:
		ec->max_cpu_loras = (int)v->i;
		return true;
	case LP_OPT_ALLOW_BASE_MISMATCH:
		ec->allow_base_mismatch = v->b;
		return true;
	case LP_OPT_ENABLE_PREFIX_CACHING:
		ec->prefix_caching = v->b;
		return true;
	case LP_OPT_NO_ENABLE_PREFIX_CACHING:
		ec->prefix_caching = !v->b;
		return true;
	default:
		return false;
	}
}

int lp_options_answer(enum lp_prog prog, enum lp_options_action action)
{
	struct lp_err err = {0};
	struct lp_buf text;
	int rc;

	lp_buf_init(&text, 1u << 20);
	if (action == LP_OPTIONS_HELP)
		rc = lp_options_help(prog, &text, &err);
	else if (action == LP_OPTIONS_HELP_JSON)
		rc = lp_options_help_json(&text, &err);
	else
		rc = lp_options_version(prog, &text, &err);
	if (rc)
		fprintf(stderr, "%s: %s\n", prog_info(prog)->name, err.msg);
	else
		fputs(text.data, stdout);
	lp_buf_release(&text);
	return rc ? -1 : 0;
}
