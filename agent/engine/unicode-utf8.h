/* UTF-8 decoding and encoding and the few Unicode character classes the
 * tokenizer and the chat templates need (whitespace as Rust and Python see
 * it). Invalid input is replaced by U+FFFD one "maximal subpart" at a time,
 * as Rust's String::from_utf8_lossy and Python's errors="replace" do. */
#ifndef LP_ENGINE_UNICODE_UTF8_H
#define LP_ENGINE_UNICODE_UTF8_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define LP_UTF8_REPLACEMENT 0xFFFDu

/* Decodes the code point at s[0..len) (len >= 1). Returns the number of
 * bytes it takes; on an invalid or truncated sequence sets *cp to U+FFFD
 * and returns the length of the maximal invalid subpart (at least 1). */
size_t lp_utf8_decode(const unsigned char *s, size_t len, uint32_t *cp);

/* Writes cp (<= 0x10FFFF, not a surrogate) as UTF-8 into out; returns 1..4. */
size_t lp_utf8_encode(uint32_t cp, unsigned char out[4]);

/* Number of bytes a sequence starting with lead byte b needs (1..4), or 0
 * when b cannot start a sequence. */
int lp_utf8_seq_len(unsigned char b);

/* Whether byte b may follow the bytes seq[0..n) (n >= 1, seq[0] a lead
 * byte) inside one well-formed sequence; excludes overlongs and
 * surrogates the way the Unicode standard's table 3-7 does. */
bool lp_utf8_continues(const unsigned char *seq, int n, unsigned char b);

/* Whether s[0..len) is well-formed UTF-8. */
bool lp_utf8_valid(const char *s, size_t len);

/* Unicode White_Space (Rust's char::is_whitespace). */
bool lp_unicode_is_space(uint32_t cp);
/* Python's str.isspace (what str.strip and Jinja's trim remove). */
bool lp_unicode_is_py_space(uint32_t cp);

/* Trims Python whitespace from both ends of s[0..*len): returns the new
 * start and updates *len. */
const char *lp_utf8_py_strip(const char *s, size_t *len);

#endif
