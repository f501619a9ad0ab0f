/* Fused half and bfloat16 arithmetic with the GPU's single rounding. */
#include "kernels/cuda/emu/internal.h"

namespace
{

/* x rounded to nearest even with p significant bits, exponents down to
 * emin (below: subnormal spacing), overflowing to infinity past max. */
double round_to(double x, int p, int emin, double max)
{
	if (x == 0 || !isfinite(x))
		return x;
	int e;
	frexp(x, &e);
	int lead = e - 1 < emin ? emin : e - 1;
	double q = ldexp(1.0, lead - (p - 1));
	double r = nearbyint(x / q) * q;
	return fabs(r) > max ? copysign(INFINITY, x) : r;
}

} // namespace

float lp_emu_fma_round(float a, float b, float c, bool bf16)
{
	/* the product of two half or bf16 values (11- or 8-bit significands)
	 * is exact in double; the sum is rounded to odd (the nearest double
	 * with the error folded into its last bit), which makes the final
	 * rounding to 11 or 8 bits correct */
	double p = lp_emu_opaque((double)a * (double)b);
	double s = lp_emu_opaque(p + (double)c);
	double bb = lp_emu_opaque(s - p);
	double err = (p - (s - bb)) + ((double)c - bb);
	if (err != 0 && isfinite(s)) {
		uint64_t u;
		memcpy(&u, &s, 8);
		if (!(u & 1))
			s = nextafter(s, err > 0 ? INFINITY : -INFINITY);
	}
	return bf16 ? (float)round_to(s, 8, -126, 3.38953138925153547590470800371487866880e38)
	            : (float)round_to(s, 11, -14, 65504.0);
}
