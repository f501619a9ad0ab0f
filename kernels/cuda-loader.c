/* Picking a backend by name, and loading the CUDA backend's shared object
 * at run time (see cuda-loader.h). The programs have no link-time
 * dependency on CUDA: the shared object, and through it CUDA's libraries
 * and the driver, are looked for only when a CUDA device is asked for, and
 * each way that can fail becomes one -ENODEV message. */
#include "kernels/cuda-loader.h"

#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_CUDA_DEVICE 1023

typedef int (*cuda_open_fn)(int device, struct lp_backend **out, struct lp_err *err);
typedef int (*cuda_counters_fn)(const struct lp_backend *be, struct lp_cuda_counters *out);

/* The shared object stays loaded for the life of the process once it
 * loaded (CUDA's runtime does not expect to be unloaded). */
static pthread_mutex_t lib_lock = PTHREAD_MUTEX_INITIALIZER;
static cuda_open_fn lib_open;
static cuda_counters_fn lib_counters;

static bool is_file(const char *path)
{
	struct stat st;

	return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* The running program's directory ("" for "/"). */
static int exe_dir(char *dir, size_t len)
{
	ssize_t n = readlink("/proc/self/exe", dir, len - 1);
	char *slash;

	if (n <= 0)
		return -1;
	dir[n] = '\0';
	slash = strrchr(dir, '/');
	if (!slash)
		return -1;
	*slash = '\0';
	return 0;
}

/* Finds the shared object: $LORAPLANE_CUDA_LIB alone when it is set, else
 * next to the program, else in ../lib/loraplane/ from there. */
static int find_lib(char *path, size_t len, struct lp_err *err)
{
	const char *env = getenv(LP_CUDA_LIB_ENV);
	char dir[PATH_MAX];

	if (env && *env) {
		if (!is_file(env))
			return lp_errf(err, -ENODEV, "no CUDA backend at '%s' (from %s)", env,
			               LP_CUDA_LIB_ENV);
		snprintf(path, len, "%s", env);
		return 0;
	}
	if (exe_dir(dir, sizeof(dir)))
		return lp_errf(err, -ENODEV,
		               "cannot find the CUDA backend: the program's directory is unknown "
		               "(set %s)",
		               LP_CUDA_LIB_ENV);
	snprintf(path, len, "%s/%s", dir, LP_CUDA_LIB_NAME);
	if (is_file(path))
		return 0;
	snprintf(path, len, "%s/../lib/loraplane/%s", dir, LP_CUDA_LIB_NAME);
	if (is_file(path))
		return 0;
	return lp_errf(err, -ENODEV,
	               "this build has no CUDA backend: no '%s' in '%s' or '%s/../lib/loraplane' "
	               "(build with CUDA's nvcc installed, or set %s)",
	               LP_CUDA_LIB_NAME, dir, dir, LP_CUDA_LIB_ENV);
}

/* Loads the shared object once; 0, or -ENODEV with the reason. */
static int load_lib(struct lp_err *err)
{
	char path[PATH_MAX + 64];
	cuda_open_fn open_fn;
	void *h;
	int rc = 0;

	pthread_mutex_lock(&lib_lock);
	if (lib_open)
		goto out_unlock;
	if ((rc = find_lib(path, sizeof(path), err)))
		goto out_unlock;
	h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (!h) {
		const char *why = dlerror();

		if (why && strstr(why, "cannot open shared object file"))
			rc = lp_errf(
			    err, -ENODEV,
			    "cannot load the CUDA backend '%s': %s (a CUDA library it needs "
			    "is missing: install CUDA's libcublas and libcublasLt or add "
			    "their directory to LD_LIBRARY_PATH)",
			    path, why);
		else
			rc = lp_errf(err, -ENODEV, "cannot load the CUDA backend '%s': %s", path,
			             why ? why : "unknown error");
		goto out_unlock;
	}
	open_fn = (cuda_open_fn)dlsym(h, "lp_cuda_backend_open");
	if (!open_fn) {
		dlclose(h);
		rc =
		    lp_errf(err, -ENODEV,
		            "'%s' is not a loraplane CUDA backend (no lp_cuda_backend_open)", path);
		goto out_unlock;
	}
	lib_counters = (cuda_counters_fn)dlsym(h, "lp_cuda_backend_counters");
	lib_open = open_fn;
out_unlock:
	pthread_mutex_unlock(&lib_lock);
	return rc;
}

int lp_backend_cuda_new(struct lp_backend **out, int device, struct lp_err *err)
{
	int rc;

	*out = NULL;
	if (device < 0 || device > MAX_CUDA_DEVICE)
		return lp_errf(err, -ENODEV, "no CUDA device %d", device);
	if ((rc = load_lib(err)))
		return rc;
	rc = lib_open(device, out, err);
	if (rc) {
		/* one code for "CUDA is not usable here", whatever the cause */
		if (err)
			err->code = -ENODEV;
		*out = NULL;
		return -ENODEV;
	}
	return 0;
}

int lp_backend_cuda_counters(const struct lp_backend *be, struct lp_cuda_counters *out)
{
	cuda_counters_fn fn;

	memset(out, 0, sizeof(*out));
	pthread_mutex_lock(&lib_lock);
	fn = lib_counters;
	pthread_mutex_unlock(&lib_lock);
	return fn && be ? fn(be, out) : -ENOTSUP;
}

int lp_device_parse(const char *spec, enum lp_device_kind *kind, int *cuda_device,
                    struct lp_err *err)
{
	const char *num;

	*kind = LP_DEVICE_CPU;
	*cuda_device = -1;
	if (!spec)
		return lp_errf(err, -EINVAL, "no device given: use cpu, cuda, cuda:N or auto");
	if (!strcmp(spec, "cpu"))
		return 0;
	if (!strcmp(spec, "auto") || !strcmp(spec, "cuda")) {
		*kind = spec[0] == 'a' ? LP_DEVICE_AUTO : LP_DEVICE_CUDA;
		*cuda_device = 0;
		return 0;
	}
	if (!strncmp(spec, "cuda:", 5)) {
		num = spec + 5;
		if (*num && strlen(num) <= 4 && strspn(num, "0123456789") == strlen(num) &&
		    strtol(num, NULL, 10) <= MAX_CUDA_DEVICE) {
			*kind = LP_DEVICE_CUDA;
			*cuda_device = (int)strtol(num, NULL, 10);
			return 0;
		}
		return lp_errf(err, -EINVAL,
		               "bad device '%s': N in cuda:N is a device number 0..%d", spec,
		               MAX_CUDA_DEVICE);
	}
	return lp_errf(err, -EINVAL, "unknown device '%s': use cpu, cuda, cuda:N or auto", spec);
}

int lp_backend_open(const char *spec, int n_threads, struct lp_backend **out, char *note,
                    size_t note_len, struct lp_err *err)
{
	enum lp_device_kind kind;
	struct lp_err cuda_err = {0};
	int device, rc;

	*out = NULL;
	if (note && note_len)
		note[0] = '\0';
	if ((rc = lp_device_parse(spec, &kind, &device, err)))
		return rc;
	switch (kind) {
	case LP_DEVICE_CUDA:
		return lp_backend_cuda_new(out, device, err);
	case LP_DEVICE_AUTO:
		if (lp_backend_cuda_new(out, device, &cuda_err) == 0)
			return 0;
		rc = lp_backend_cpu_new(out, n_threads, err);
		if (rc == 0 && note && note_len)
			snprintf(note, note_len, "'auto' chose the CPU: %s", cuda_err.msg);
		return rc;
	case LP_DEVICE_CPU:
	default:
		return lp_backend_cpu_new(out, n_threads, err);
	}
}
