/* Unicode Normalization Form C (canonical decomposition, canonical
 * ordering, canonical composition; UAX #15), for the tokenizer's "NFC"
 * normalizer (Qwen's tokenizer.json). The tables come from
 * hack/make-unicode-nfc.py (agent/engine/unicode-nfc-tables.h). */
#ifndef LP_ENGINE_UNICODE_NFC_H
#define LP_ENGINE_UNICODE_NFC_H

#include <stdbool.h>
#include <stddef.h>

#include "common/err.h"

/* Whether s[0..len) is certainly in NFC already without looking it up:
 * every code point below U+0300, the first one NFC can change. */
bool lp_utf8_nfc_quick(const char *s, size_t len);

/* The NFC form of s[0..len), which must be well-formed UTF-8, in *out
 * (malloc'd, NUL-terminated, *out_len bytes; the caller frees it). Returns 0
 * or -ENOMEM with err set. */
int lp_utf8_nfc(const char *s, size_t len, char **out, size_t *out_len, struct lp_err *err);

#endif
