/* See credentials.h. */
#include "common/credentials.h"

const char *const lp_credential_keys[LP_N_CREDENTIAL_KEYS] = {
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_REGION",        "AWS_ENDPOINT_URL",      "HF_TOKEN",
    "HF_ENDPOINT",
};
