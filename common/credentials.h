/* The credentials one adapter download may carry, named as the environment
 * variables they stand for: what a Secret of a LoraAdapter's
 * spec.source.secretRef holds, what the operator forwards and what the
 * agent's POST /v1/loras takes as source.credentials. One list for both
 * programs; agent/adapters/source.h maps it onto its struct. */
#ifndef LP_COMMON_CREDENTIALS_H
#define LP_COMMON_CREDENTIALS_H

#define LP_N_CREDENTIAL_KEYS 7

/* AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION,
 * AWS_ENDPOINT_URL, HF_TOKEN, HF_ENDPOINT, in this order. */
extern const char *const lp_credential_keys[LP_N_CREDENTIAL_KEYS];

/* The list for messages: "AWS_ACCESS_KEY_ID, ..., HF_ENDPOINT". */
#define LP_CREDENTIAL_KEYS_TEXT                                                                    \
	"AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION, "                \
	"AWS_ENDPOINT_URL, HF_TOKEN, HF_ENDPOINT"

#endif
