/* The one tiny unit-test harness. A test program defines test functions
 * and calls them from main with RUN(); each prints one line
 *   PASS <program>:<test>      or      FAIL <program>:<test>: <why>
 * and tests/run.sh counts those lines across every program. CHECK* record a
 * failure and return from the test function. TEST_MAIN_END returns 1 when a
 * test failed. */
#ifndef LP_TESTS_TEST_H
#define LP_TESTS_TEST_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* splitmix64: the next number of the fixed sequence that starts from the
 * seed *state holds (each test file keeps its own state and seed). */
static inline uint64_t test_splitmix64(uint64_t *state)
{
	uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static int test_failed_count;
static int test_current_failed;
static const char *test_program = "test";

#define TEST_FAIL(...)                                                                             \
	do {                                                                                       \
		if (!test_current_failed)                                                          \
			printf("FAIL %s:%s: ", test_program, test_current_name);                   \
		else                                                                               \
			printf("     also: ");                                                     \
		printf(__VA_ARGS__);                                                               \
		printf(" (%s:%d)\n", __FILE__, __LINE__);                                          \
		test_current_failed = 1;                                                           \
	} while (0)

static const char *test_current_name = "";

#define CHECK(cond)                                                                                \
	do {                                                                                       \
		if (!(cond)) {                                                                     \
			TEST_FAIL("check failed: %s", #cond);                                      \
			return;                                                                    \
		}                                                                                  \
	} while (0)

#define CHECK_MSG(cond, ...)                                                                       \
	do {                                                                                       \
		if (!(cond)) {                                                                     \
			TEST_FAIL(__VA_ARGS__);                                                    \
			return;                                                                    \
		}                                                                                  \
	} while (0)

#define CHECK_EQ_INT(a, b)                                                                         \
	do {                                                                                       \
		long long va_ = (long long)(a), vb_ = (long long)(b);                              \
		if (va_ != vb_) {                                                                  \
			TEST_FAIL("%s == %lld, expected %s == %lld", #a, va_, #b, vb_);            \
			return;                                                                    \
		}                                                                                  \
	} while (0)

#define CHECK_EQ_STR(a, b)                                                                         \
	do {                                                                                       \
		const char *sa_ = (a), *sb_ = (b);                                                 \
		if (!sa_ || !sb_ || strcmp(sa_, sb_) != 0) {                                       \
			TEST_FAIL("%s == \"%s\", expected \"%s\"", #a, sa_ ? sa_ : "(null)",       \
			          sb_ ? sb_ : "(null)");                                           \
			return;                                                                    \
		}                                                                                  \
	} while (0)

#define CHECK_NEAR(a, b, tol)                                                                      \
	do {                                                                                       \
		double va_ = (double)(a), vb_ = (double)(b);                                       \
		if (!(fabs(va_ - vb_) <= (tol))) {                                                 \
			TEST_FAIL("%s == %g, expected %g within %g", #a, va_, vb_, (double)(tol)); \
			return;                                                                    \
		}                                                                                  \
	} while (0)

/* Checks that a call returned 0; prints err.msg otherwise. */
#define CHECK_OK(call, errp)                                                                       \
	do {                                                                                       \
		int rc_ = (call);                                                                  \
		if (rc_ != 0) {                                                                    \
			TEST_FAIL("%s returned %d: %s", #call, rc_, (errp)->msg);                  \
			return;                                                                    \
		}                                                                                  \
	} while (0)

#define RUN(fn)                                                                                    \
	do {                                                                                       \
		test_current_name = #fn;                                                           \
		test_current_failed = 0;                                                           \
		fn();                                                                              \
		if (test_current_failed)                                                           \
			test_failed_count++;                                                       \
		else                                                                               \
			printf("PASS %s:%s\n", test_program, #fn);                                 \
		fflush(stdout);                                                                    \
	} while (0)

#define TEST_MAIN_BEGIN(name) test_program = (name)
#define TEST_MAIN_END()       return test_failed_count ? 1 : 0

/* Directory of committed fixtures, overridable for out-of-tree runs. */
static inline const char *test_fixtures_dir(void)
{
	const char *d = getenv("LP_FIXTURES");
	return d ? d : "tests/fixtures";
}

#endif
