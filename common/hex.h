/* One hexadecimal digit's value, for the parsers that read escapes and
 * percent-encodings (the gate, the tokenizer's decoder, grammars, JSON
 * Schema patterns). */
#ifndef LP_COMMON_HEX_H
#define LP_COMMON_HEX_H

/* 0..15 for [0-9a-fA-F], -1 for anything else (c is a char's value). */
static inline int lp_hex_digit(int c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

#endif
