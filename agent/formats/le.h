/* Little-endian integers at any alignment, as every binary format the
 * readers of agent/formats/ parse stores them (GGUF, zip, pickle). The
 * caller has checked that the bytes are there. */
#ifndef LP_FORMATS_LE_H
#define LP_FORMATS_LE_H

#include <stdint.h>

static inline uint16_t lp_le16(const unsigned char *p)
{
	return (uint16_t)(p[0] | p[1] << 8);
}

static inline uint32_t lp_le32(const unsigned char *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t lp_le64(const unsigned char *p)
{
	return (uint64_t)lp_le32(p) | (uint64_t)lp_le32(p + 4) << 32;
}

#endif
