/* lp_file_open (common/file.h) and the readers built on it: files stay
 * below their root whatever links they hold, and a FIFO, device or
 * directory is refused at once instead of blocking. Every test runs under
 * alarm(): a reader that blocks kills the program, which counts as a
 * failure. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent/adapters/lora.h"
#include "common/buf.h"
#include "common/file.h"
#include "common/mapped-file.h"
#include "tests/test.h"

#define SECRET "root:x:0:0:secret-outside-the-root"

static char tmp[64], root[80];

static void path_of(char *out, const char *rel)
{
	snprintf(out, PATH_MAX, "%s/%s", tmp, rel);
}

static int write_file(const char *rel, const char *text)
{
	char p[PATH_MAX];
	FILE *f;

	path_of(p, rel);
	f = fopen(p, "w");
	if (!f)
		return -1;
	fputs(text, f);
	return fclose(f);
}

static int make_link(const char *target, const char *rel)
{
	char p[PATH_MAX];

	path_of(p, rel);
	return symlink(target, p);
}

/* tmp/outside.txt (SECRET), tmp/root/{a.txt, sub/, fifo, links ...} */
static int setup(void)
{
	char p[PATH_MAX];

	snprintf(tmp, sizeof(tmp), "/tmp/lp-test-file-XXXXXX");
	if (!mkdtemp(tmp))
		return -1;
	snprintf(root, sizeof(root), "%s/root", tmp);
	path_of(p, "root");
	if (mkdir(p, 0755) < 0)
		return -1;
	path_of(p, "root/sub");
	if (mkdir(p, 0755) < 0)
		return -1;
	path_of(p, "root/fifo");
	if (mkfifo(p, 0644) < 0)
		return -1;
	path_of(p, "root/peft");
	if (mkdir(p, 0755) < 0)
		return -1;
	if (write_file("outside.txt", SECRET "\n") || write_file("root/a.txt", "inside") ||
	    make_link("a.txt", "root/link-in") || make_link("../a.txt", "root/sub/link-up") ||
	    make_link("../outside.txt", "root/link-out") || make_link(tmp, "root/dir-out") ||
	    make_link("fifo", "root/link-fifo") || make_link("nowhere", "root/dangling") ||
	    make_link("../../outside.txt", "root/peft/adapter_config.json"))
		return -1;
	return 0;
}

static void teardown(void)
{
	static const char *const rel[] = {"root/peft/adapter_config.json",
	                                  "root/peft",
	                                  "root/dangling",
	                                  "root/link-fifo",
	                                  "root/dir-out",
	                                  "root/link-out",
	                                  "root/sub/link-up",
	                                  "root/link-in",
	                                  "root/a.txt",
	                                  "root/fifo",
	                                  "root/sub",
	                                  "root",
	                                  "outside.txt"};
	char p[PATH_MAX];

	for (size_t i = 0; i < sizeof(rel) / sizeof(*rel); i++) {
		path_of(p, rel[i]);
		if (unlink(p) < 0)
			rmdir(p);
	}
	rmdir(tmp);
}

/* Opens rel under root and returns the code; reads "inside" when it opens. */
static int open_rel(const char *r, const char *rel, struct lp_err *err)
{
	char p[PATH_MAX], text[16] = "";
	struct stat st;
	int fd;

	path_of(p, rel);
	fd = lp_file_open(r, p, &st, err);
	if (fd < 0)
		return fd;
	if (read(fd, text, sizeof(text) - 1) < 0 || strcmp(text, "inside") != 0 ||
	    !S_ISREG(st.st_mode)) {
		close(fd);
		return -EIO;
	}
	close(fd);
	return 0;
}

static void test_inside_root_opens(void)
{
	struct lp_err err = {0};

	CHECK_OK(open_rel(root, "root/a.txt", &err), &err);
	CHECK_OK(open_rel(NULL, "root/a.txt", &err), &err);
	CHECK_OK(open_rel("", "root/a.txt", &err), &err);
}

static void test_link_inside_root_opens(void)
{
	struct lp_err err = {0};

	/* Hugging Face snapshots: links to blobs elsewhere in the root */
	CHECK_OK(open_rel(root, "root/link-in", &err), &err);
	CHECK_OK(open_rel(root, "root/sub/link-up", &err), &err);
	CHECK_OK(open_rel(root, "root/sub/../a.txt", &err), &err);
}

static void test_link_out_of_root_refused(void)
{
	struct lp_err err = {0};

	CHECK_EQ_INT(open_rel(root, "root/link-out", &err), -EACCES);
	CHECK_MSG(strstr(err.msg, "link-out") && !strstr(err.msg, "outside.txt"), "%s", err.msg);
	CHECK_EQ_INT(open_rel(root, "root/dir-out/outside.txt", &err), -EACCES);
	CHECK_EQ_INT(open_rel(root, "root/dir-out/root/a.txt", &err), 0);
	/* without a root the operator's links are followed */
	struct stat st;
	char p[PATH_MAX];
	path_of(p, "root/link-out");
	int fd = lp_file_open(NULL, p, &st, &err);
	CHECK_MSG(fd >= 0, "%s", err.msg);
	close(fd);
}

static void test_dotdot_out_of_root_refused(void)
{
	struct lp_err err = {0};

	CHECK_EQ_INT(open_rel(root, "root/sub/../../outside.txt", &err), -EACCES);
	CHECK_MSG(strstr(err.msg, "leads outside"), "%s", err.msg);
	/* a root that is a prefix of the path's name but not its directory */
	CHECK_EQ_INT(open_rel(root, "root/../outside.txt", &err), -EACCES);
	char sibling[80];
	snprintf(sibling, sizeof(sibling), "%s/roo", tmp);
	CHECK_EQ_INT(open_rel(sibling, "root/a.txt", &err), -EACCES);
	CHECK(!lp_file_below(root, tmp));
	CHECK(lp_file_below(root, root));
	CHECK(lp_file_below(NULL, tmp));
}

static void test_dangling_link_refused(void)
{
	struct lp_err err = {0};

	CHECK_EQ_INT(open_rel(root, "root/dangling", &err), -EACCES);
	CHECK_EQ_INT(open_rel(NULL, "root/dangling", &err), -ENOENT);
}

static void test_fifo_refused_without_blocking(void)
{
	struct lp_err err = {0};
	struct lp_mapped_file mf;
	struct lp_buf b;
	char p[PATH_MAX];

	alarm(10); /* a blocking open() would hang here for ever */
	CHECK_EQ_INT(open_rel(root, "root/fifo", &err), -EINVAL);
	CHECK_MSG(strstr(err.msg, "not a regular file"), "%s", err.msg);
	CHECK_EQ_INT(open_rel(NULL, "root/fifo", &err), -EINVAL);
	CHECK_EQ_INT(open_rel(root, "root/link-fifo", &err), -EINVAL);
	path_of(p, "root/fifo");
	CHECK_EQ_INT(lp_mapped_file_open(&mf, p, &err), -EINVAL);
	CHECK_EQ_INT(lp_mapped_file_open_in(&mf, root, p, &err), -EINVAL);
	lp_buf_init(&b, 1024);
	CHECK_EQ_INT(lp_buf_read_file(&b, p, 1024, &err), -EINVAL);
	CHECK_EQ_INT(lp_buf_read_file_in(&b, root, p, 1024, &err), -EINVAL);
	lp_buf_release(&b);
	alarm(0);
}

static void test_directory_and_device_refused(void)
{
	struct lp_err err = {0};
	int fd;

	alarm(10);
	CHECK_EQ_INT(open_rel(root, "root/sub", &err), -EINVAL);
	CHECK_EQ_INT(lp_file_open(root, root, NULL, &err), -EINVAL);
	fd = lp_file_open(NULL, "/dev/null", NULL, &err);
	CHECK_EQ_INT(fd, -EINVAL);
	CHECK_MSG(strstr(err.msg, "'/dev/null' is not a regular file"), "%s", err.msg);
	fd = lp_file_open(NULL, "/dev/zero", NULL, &err);
	CHECK_EQ_INT(fd, -EINVAL);
	alarm(0);
}

static void test_absent_file_enoent(void)
{
	struct lp_err err = {0};
	struct lp_buf b;
	char p[PATH_MAX];

	CHECK_EQ_INT(open_rel(root, "root/absent", &err), -ENOENT);
	CHECK_EQ_INT(open_rel(NULL, "root/absent", &err), -ENOENT);
	CHECK_MSG(strstr(err.msg, "No such file"), "%s", err.msg);
	CHECK_EQ_INT(open_rel(root, "root/a.txt/x", &err), -ENOENT);
	path_of(p, "root/absent");
	lp_buf_init(&b, 16);
	CHECK_EQ_INT(lp_buf_read_file_in(&b, root, p, 16, &err), -ENOENT);
	lp_buf_release(&b);
}

static void test_readers_stay_in_root(void)
{
	struct lp_err err = {0};
	struct lp_mapped_file mf;
	struct lp_buf b;
	char p[PATH_MAX];

	path_of(p, "root/link-out");
	CHECK_EQ_INT(lp_mapped_file_open_in(&mf, root, p, &err), -EACCES);
	lp_buf_init(&b, 1024);
	CHECK_EQ_INT(lp_buf_read_file_in(&b, root, p, 1024, &err), -EACCES);
	path_of(p, "root/link-in");
	CHECK_OK(lp_buf_read_file_in(&b, root, p, 1024, &err), &err);
	CHECK_EQ_STR(b.data, "inside");
	CHECK_OK(lp_mapped_file_open_in(&mf, root, p, &err), &err);
	CHECK(mf.size == 6 && !memcmp(mf.data, "inside", 6));
	lp_mapped_file_release(&mf);
	lp_buf_release(&b);
}

/* An adapter whose adapter_config.json links to a file outside the root:
 * refused, and the message quotes nothing of that file. */
static void test_lora_config_link_out_refused(void)
{
	struct lp_lora_shape s = {.n_layers = 2,
	                          .dim = 64,
	                          .q_dim = 64,
	                          .kv_dim = 64,
	                          .ffn_dim = 128,
	                          .max_rank = 16,
	                          .allow_base_mismatch = true};
	struct lp_lora *l = NULL;
	struct lp_err err = {0};
	char p[PATH_MAX];

	path_of(p, "root/peft");
	CHECK_EQ_INT(lp_lora_load_in(&l, root, p, &s, &err), -EACCES);
	CHECK_MSG(!strstr(err.msg, "root:") && !strstr(err.msg, "secret"), "%s", err.msg);
	/* an operator-named adapter may link anywhere; its parse error still
	 * quotes none of the file */
	CHECK_EQ_INT(lp_lora_load(&l, p, &s, &err), -EINVAL);
	CHECK_MSG(strstr(err.msg, "not valid json") && !strstr(err.msg, "root:") &&
	              !strstr(err.msg, "secret"),
	          "%s", err.msg);
	/* the adapter directory itself outside the root */
	CHECK_EQ_INT(lp_lora_load_in(&l, p, root, &s, &err), -EACCES);
	CHECK(l == NULL);
}

int main(void)
{
	TEST_MAIN_BEGIN("test-file");
	if (setup() < 0) {
		printf("FAIL test-file:setup: %s\n", strerror(errno));
		teardown();
		return 1;
	}
	RUN(test_inside_root_opens);
	RUN(test_link_inside_root_opens);
	RUN(test_link_out_of_root_refused);
	RUN(test_dotdot_out_of_root_refused);
	RUN(test_dangling_link_refused);
	RUN(test_fifo_refused_without_blocking);
	RUN(test_directory_and_device_refused);
	RUN(test_absent_file_enoent);
	RUN(test_readers_stay_in_root);
	RUN(test_lora_config_link_out_refused);
	teardown();
	TEST_MAIN_END();
}
