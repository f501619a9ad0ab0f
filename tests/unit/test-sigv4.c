/* SigV4 against the S3 examples published in AWS's documentation ("Examples
 * of signature calculations", header-based authentication, with the
 * documentation's example key AKIAIOSFODNN7EXAMPLE), and the URI encoding
 * rules that decide whether S3 accepts a key with unusual characters. */
#include <errno.h>
#include <string.h>

#include "agent/adapters/sigv4.h"
#include "tests/test.h"

static const struct lp_sigv4_key doc_key = {
    .access_key = "AKIAIOSFODNN7EXAMPLE",
    .secret_key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    .region = "us-east-1",
    .service = "s3",
};

#define DOC_DATE "20130524T000000Z"

/* Encodes s with lp_sigv4_uri_encode into out (a static buffer). */
static const char *enc(const char *s, size_t n, bool encode_slash)
{
	static char out[512];
	struct lp_buf b;
	struct lp_err err = {0};

	lp_buf_init(&b, sizeof(out) - 1);
	if (lp_buf_append(&b, "", 0, &err) || lp_sigv4_uri_encode(&b, s, n, encode_slash, &err)) {
		lp_buf_release(&b);
		return "(error)";
	}
	memcpy(out, b.data, b.len + 1);
	lp_buf_release(&b);
	return out;
}

/* "Example: GET Object": the first 10 bytes of test.txt. */
static void test_get_object_example(void)
{
	const struct lp_sigv4_param headers[] = {
	    {"Host", "examplebucket.s3.amazonaws.com"},
	    {"Range", "bytes=0-9"},
	    {"x-amz-content-sha256", LP_SIGV4_EMPTY_SHA256},
	    {"x-amz-date", DOC_DATE},
	};
	const struct lp_sigv4_request r = {
	    .method = "GET",
	    .path = "/test.txt",
	    .headers = headers,
	    .n_headers = 4,
	    .payload_hash = LP_SIGV4_EMPTY_SHA256,
	};
	struct lp_err err = {0};
	struct lp_buf canon;
	char auth[512], sig[65], hash[65];

	lp_buf_init(&canon, 1 << 16);
	CHECK_OK(lp_sigv4_canonical_request(&canon, &r, &err), &err);
	CHECK_EQ_STR(canon.data,
	             "GET\n"
	             "/test.txt\n"
	             "\n"
	             "host:examplebucket.s3.amazonaws.com\n"
	             "range:bytes=0-9\n"
	             "x-amz-content-sha256:" LP_SIGV4_EMPTY_SHA256 "\n"
	             "x-amz-date:20130524T000000Z\n"
	             "\n"
	             "host;range;x-amz-content-sha256;x-amz-date\n" LP_SIGV4_EMPTY_SHA256);
	/* the documentation's string to sign ends with this hash */
	lp_sha256_hex(canon.data, canon.len, hash);
	lp_buf_release(&canon);
	CHECK_EQ_STR(hash, "7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972");

	CHECK_OK(lp_sigv4_authorization(auth, sizeof(auth), sig, &doc_key, &r, DOC_DATE, &err),
	         &err);
	CHECK_EQ_STR(sig, "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41");
	CHECK_EQ_STR(auth,
	             "AWS4-HMAC-SHA256 "
	             "Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,"
	             "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,"
	             "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41");
}

/* "Example: GET Bucket Lifecycle": a query parameter without a value. */
static void test_get_lifecycle_example(void)
{
	const struct lp_sigv4_param headers[] = {
	    {"host", "examplebucket.s3.amazonaws.com"},
	    {"x-amz-date", DOC_DATE},
	    {"x-amz-content-sha256", LP_SIGV4_EMPTY_SHA256},
	};
	const struct lp_sigv4_param query[] = {{"lifecycle", NULL}};
	const struct lp_sigv4_request r = {
	    .method = "GET",
	    .path = "/",
	    .query = query,
	    .n_query = 1,
	    .headers = headers,
	    .n_headers = 3,
	    .payload_hash = LP_SIGV4_EMPTY_SHA256,
	};
	struct lp_err err = {0};
	char auth[512], sig[65];

	CHECK_OK(lp_sigv4_authorization(auth, sizeof(auth), sig, &doc_key, &r, DOC_DATE, &err),
	         &err);
	CHECK_EQ_STR(sig, "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543");
}

/* "Example: Get Bucket (List Objects)": the query is sorted before signing,
 * whatever order the caller gives. */
static void test_list_objects_example(void)
{
	const struct lp_sigv4_param headers[] = {
	    {"x-amz-date", DOC_DATE},
	    {"x-amz-content-sha256", LP_SIGV4_EMPTY_SHA256},
	    {"Host", "examplebucket.s3.amazonaws.com"},
	};
	const struct lp_sigv4_param query[] = {{"prefix", "J"}, {"max-keys", "2"}};
	const struct lp_sigv4_request r = {
	    .method = "GET",
	    .path = "/",
	    .query = query,
	    .n_query = 2,
	    .headers = headers,
	    .n_headers = 3,
	    .payload_hash = LP_SIGV4_EMPTY_SHA256,
	};
	struct lp_err err = {0};
	struct lp_buf q;
	char auth[512], sig[65];

	CHECK_OK(lp_sigv4_authorization(auth, sizeof(auth), sig, &doc_key, &r, DOC_DATE, &err),
	         &err);
	CHECK_EQ_STR(sig, "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7");
	lp_buf_init(&q, 1024);
	CHECK_OK(lp_sigv4_canonical_query(&q, query, 2, &err), &err);
	CHECK_EQ_STR(q.data, "max-keys=2&prefix=J");
	lp_buf_release(&q);
}

/* A different secret or date gives a different signature: the key really
 * enters the HMAC chain. */
static void test_signature_depends_on_secret_and_date(void)
{
	const struct lp_sigv4_param headers[] = {{"host", "h"}, {"x-amz-date", DOC_DATE}};
	const struct lp_sigv4_request r = {.method = "GET",
	                                   .path = "/b/k",
	                                   .headers = headers,
	                                   .n_headers = 2,
	                                   .payload_hash = LP_SIGV4_UNSIGNED};
	struct lp_sigv4_key other = doc_key;
	struct lp_err err = {0};
	char a1[512], a2[512], a3[512], s1[65], s2[65], s3[65];

	other.secret_key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEZ";
	CHECK_OK(lp_sigv4_authorization(a1, sizeof(a1), s1, &doc_key, &r, DOC_DATE, &err), &err);
	CHECK_OK(lp_sigv4_authorization(a2, sizeof(a2), s2, &other, &r, DOC_DATE, &err), &err);
	CHECK_OK(lp_sigv4_authorization(a3, sizeof(a3), s3, &doc_key, &r, "20130525T000000Z", &err),
	         &err);
	CHECK(strcmp(s1, s2) != 0);
	CHECK(strcmp(s1, s3) != 0);
	CHECK(strstr(a3, "/20130525/us-east-1/s3/aws4_request,") != NULL);
}

static void test_uri_encode_unreserved_and_reserved(void)
{
	CHECK_EQ_STR(enc("AZaz09-_.~", 10, true), "AZaz09-_.~");
	CHECK_EQ_STR(enc("a b", 3, true), "a%20b");
	CHECK_EQ_STR(enc("a+b=c&d", 7, true), "a%2Bb%3Dc%26d");
	CHECK_EQ_STR(enc("!'()*", 5, true), "%21%27%28%29%2A");
	CHECK_EQ_STR(enc("100%", 4, true), "100%25");
	CHECK_EQ_STR(enc("", 0, true), "");
	CHECK_EQ_STR(enc(":@$,;?#[]", 9, true), "%3A%40%24%2C%3B%3F%23%5B%5D");
}

static void test_uri_encode_slash_and_utf8(void)
{
	CHECK_EQ_STR(enc("dir/sub dir/file.json", 21, false), "dir/sub%20dir/file.json");
	CHECK_EQ_STR(enc("dir/file", 8, true), "dir%2Ffile");
	/* é is two UTF-8 bytes, each encoded with upper-case hex */
	CHECK_EQ_STR(enc("caf\xc3\xa9", 5, true), "caf%C3%A9");
	CHECK_EQ_STR(enc("\x01\x7f\xff", 3, true), "%01%7F%FF");
	/* n bytes, not up to a NUL */
	CHECK_EQ_STR(enc("abc", 2, true), "ab");
}

/* Continuation tokens are opaque base64: '+', '/' and '=' must be encoded
 * in the query, and sorting uses the encoded names. */
static void test_canonical_query_encodes_and_sorts(void)
{
	const struct lp_sigv4_param q[] = {
	    {"prefix", "adapters/sql lora/"},
	    {"list-type", "2"},
	    {"continuation-token", "1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM="},
	    {"a b", ""},
	};
	struct lp_buf b;
	struct lp_err err = {0};

	lp_buf_init(&b, 4096);
	CHECK_OK(lp_sigv4_canonical_query(&b, q, 4, &err), &err);
	CHECK_EQ_STR(b.data,
	             "a%20b=&continuation-token=1ueGcxLPRx1Tr%2FXYExHnhbYLgveDs2J%2Fwm36Hy4vbOwM%"
	             "3D&list-type=2&prefix=adapters%2Fsql%20lora%2F");
	lp_buf_release(&b);
}

static void test_headers_trimmed_and_joined(void)
{
	const struct lp_sigv4_param headers[] = {
	    {"X-Amz-Meta-A", "  two   spaces  "},
	    {"HOST", "h:9000"},
	    {"x-amz-meta-a", "second"},
	};
	const struct lp_sigv4_request r = {.method = "GET",
	                                   .path = "",
	                                   .headers = headers,
	                                   .n_headers = 3,
	                                   .payload_hash = LP_SIGV4_UNSIGNED};
	struct lp_buf b;
	struct lp_err err = {0};

	lp_buf_init(&b, 4096);
	CHECK_OK(lp_sigv4_canonical_request(&b, &r, &err), &err);
	CHECK_EQ_STR(b.data, "GET\n/\n\nhost:h:9000\nx-amz-meta-a:two spaces,second\n\n"
	                     "host;x-amz-meta-a\nUNSIGNED-PAYLOAD");
	lp_buf_release(&b);
}

static void test_bad_requests_rejected(void)
{
	const struct lp_sigv4_param no_host[] = {{"x-amz-date", DOC_DATE}};
	const struct lp_sigv4_param bad_name[] = {{"host", "h"}, {"bad name", "v"}};
	const struct lp_sigv4_param crlf[] = {{"host", "h\r\nx-evil: 1"}};
	struct lp_sigv4_request r = {.method = "GET",
	                             .path = "/",
	                             .headers = no_host,
	                             .n_headers = 1,
	                             .payload_hash = LP_SIGV4_UNSIGNED};
	struct lp_err err = {0};
	char auth[512];

	CHECK_EQ_INT(lp_sigv4_authorization(auth, sizeof(auth), NULL, &doc_key, &r, DOC_DATE, &err),
	             -EINVAL);
	CHECK(strstr(err.msg, "'host'") != NULL);
	r.headers = bad_name;
	r.n_headers = 2;
	CHECK_EQ_INT(lp_sigv4_authorization(auth, sizeof(auth), NULL, &doc_key, &r, DOC_DATE, &err),
	             -EINVAL);
	CHECK(strstr(err.msg, "'bad name'") != NULL);
	r.headers = crlf;
	r.n_headers = 1;
	CHECK_EQ_INT(lp_sigv4_authorization(auth, sizeof(auth), NULL, &doc_key, &r, DOC_DATE, &err),
	             -EINVAL);
	r.headers = bad_name;
	r.n_headers = 1;
	CHECK_EQ_INT(
	    lp_sigv4_authorization(auth, sizeof(auth), NULL, &doc_key, &r, "2013-05-24", &err),
	    -EINVAL);
	CHECK(strstr(err.msg, "x-amz-date") != NULL);
	/* a buffer too small for the header is an error, not a truncation */
	CHECK_EQ_INT(lp_sigv4_authorization(auth, 40, NULL, &doc_key, &r, DOC_DATE, &err),
	             -ENAMETOOLONG);
}

static void test_format_date(void)
{
	char d[LP_SIGV4_DATE_LEN];

	lp_sigv4_format_date(1369353600, d); /* the documentation's 2013-05-24 */
	CHECK_EQ_STR(d, DOC_DATE);
	lp_sigv4_format_date(951782400 + 86399, d);
	CHECK_EQ_STR(d, "20000229T235959Z");
}

int main(void)
{
	TEST_MAIN_BEGIN("test-sigv4");
	RUN(test_get_object_example);
	RUN(test_get_lifecycle_example);
	RUN(test_list_objects_example);
	RUN(test_signature_depends_on_secret_and_date);
	RUN(test_uri_encode_unreserved_and_reserved);
	RUN(test_uri_encode_slash_and_utf8);
	RUN(test_canonical_query_encodes_and_sorts);
	RUN(test_headers_trimmed_and_joined);
	RUN(test_bad_requests_rejected);
	RUN(test_format_date);
	TEST_MAIN_END();
}
