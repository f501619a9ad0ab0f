# loraplane: one entry point. `make help` lists the targets.

CC ?= cc
CXX ?= g++
# The CUDA backend: built when nvcc is found (CUDA=0 skips it, CUDA=1
# insists); see docs/cuda.md.
CUDA_HOME ?= /usr/local/cuda
NVCC ?= $(CUDA_HOME)/bin/nvcc
NVCC_FOUND := $(shell command -v $(NVCC) 2>/dev/null)
CUDA ?= $(if $(NVCC_FOUND),1,0)
CUDA_ARCHS ?= 80 86 89 90
PYTHON ?= python3
BUILD ?= build
BIN ?= bin
MODEL ?= models/smollm2-135m-instruct-q4_1.gguf
# The second model of make bench's engine figures (make deps fetches it).
GEMMA3_MODEL ?= models/gemma-3-270m-q4_k_m.gguf

WARN := -Wall -Wextra -Wvla -Wstrict-prototypes -Wpointer-arith -Wno-unused-parameter
ifeq ($(CI),true)
WARN += -Werror
endif
OPT ?= -O2 -g
CPPFLAGS += -I. -D_GNU_SOURCE -MMD -MP
CFLAGS += -std=c11 $(OPT) $(WARN) -pthread -fno-strict-aliasing
LDLIBS += -lm -pthread $(shell pkg-config --libs jansson libpcre2-8 yaml-0.1 libcurl libcrypto zlib 2>/dev/null || echo -ljansson -lpcre2-8 -lyaml -lcurl -lcrypto -lz)

ifeq ($(V),1)
Q :=
else
Q := @
endif

COMMON_SRCS := $(wildcard common/*.c)
KERNEL_SRCS := $(wildcard kernels/*.c kernels/cpu/*.c)
FORMAT_SRCS := $(wildcard agent/formats/*.c)
ENGINE_SRCS := $(FORMAT_SRCS) $(wildcard agent/engine/*.c agent/adapters/*.c)
LIB_SRCS := $(COMMON_SRCS) $(KERNEL_SRCS) $(ENGINE_SRCS)
LIB_OBJS := $(LIB_SRCS:%.c=$(BUILD)/%.o)
LIB := $(BUILD)/libloraplane.a

UNIT_SRCS := $(wildcard tests/unit/test-*.c)
UNIT_BINS := $(UNIT_SRCS:tests/unit/%.c=$(BUILD)/tests/%)

# The CUDA sources built for the CPU through our emulation layer
# (kernels/cuda/emu/): every kernel runs in the unit tests of tests/cuda/,
# compared with the CPU backend. Needs CUDA's headers only (cuda_fp16.h,
# cuda_bf16.h), not its libraries or a driver.
CUDA_SRCS := $(wildcard kernels/cuda/*.cu)
EMU_SRCS := $(wildcard kernels/cuda/emu/*.cc)
EMU_OBJS := $(CUDA_SRCS:kernels/cuda/%.cu=$(BUILD)/emu/%.o) $(EMU_SRCS:kernels/cuda/emu/%.cc=$(BUILD)/emu/emu/%.o)
EMU_LIB := $(BUILD)/libloraplane-cuda-emu.a
# nvcc contracts a * b + c into one fused multiply-add by default; -mfma
# -ffp-contract=fast lets g++ do the same so that the emulation rounds much
# as the GPU does (the two compilers may still contract different pairs).
EMU_FMA ?= -mfma -ffp-contract=fast
EMU_CXXFLAGS := -std=c++17 $(OPT) $(filter-out -Wstrict-prototypes -Wvla,$(WARN)) -Wno-unknown-pragmas \
	-pthread -fno-strict-aliasing $(EMU_FMA) -DLP_CUDA_EMU -isystem $(CUDA_HOME)/include
CUDA_TEST_SRCS := $(wildcard tests/cuda/test-*.cc)
CUDA_TEST_BINS := $(if $(wildcard $(CUDA_HOME)/include/cuda_fp16.h),$(CUDA_TEST_SRCS:tests/cuda/%.cc=$(BUILD)/tests/cuda/%))

# The real CUDA backend (CUDA=1): every kernels/cuda/*.cu compiled by nvcc
# for each of CUDA_ARCHS, plus PTX of the newest for GPUs after it, linked
# with the C it uses into $(BIN)/libloraplane-cuda.so. The programs load it
# at run time (kernels/cuda-loader.c) and never link CUDA themselves. Each
# object's ptxas report (registers, spills, stack) is kept beside it for
# make cuda-check. See docs/cuda.md.
NVCCFLAGS ?= -O3
CUDA_PTX_ARCH := $(lastword $(shell printf '%s\n' $(CUDA_ARCHS) | sort -n))
CUDA_GENCODE := $(foreach a,$(CUDA_ARCHS),-gencode arch=compute_$(a),code=sm_$(a)) \
	-gencode arch=compute_$(CUDA_PTX_ARCH),code=compute_$(CUDA_PTX_ARCH)
CUDA_OBJS := $(CUDA_SRCS:kernels/cuda/%.cu=$(BUILD)/cuda/%.o)
CUDA_C_OBJS := $(patsubst %.c,$(BUILD)/cuda/c/%.o,common/err.c kernels/dtype.c)
CUDA_SO := $(BIN)/libloraplane-cuda.so
# cudart static (it finds the driver's libcuda.so.1 itself at run time);
# cuBLAS through the loader's path, with no rpath (docs/cuda.md)
CUDA_LIBS := -L$(CUDA_HOME)/lib64 -lcudart_static -lcublas -lcublasLt -ldl -lrt -lpthread
ifeq ($(CUDA),1)
ifeq ($(NVCC_FOUND),)
$(error CUDA=1 but there is no nvcc at '$(NVCC)': install the CUDA toolkit, set CUDA_HOME or NVCC, or build with CUDA=0)
endif
CUDA_TARGETS := $(CUDA_SO)
endif
# The tests of tests/cuda/ built against the nvcc objects instead of the
# emulation, for make test-gpu (test-emu.cc tests the emulation itself).
GPU_TEST_SRCS := $(filter-out tests/cuda/test-emu.cc,$(CUDA_TEST_SRCS))
GPU_TEST_BINS := $(GPU_TEST_SRCS:tests/cuda/%.cc=$(BUILD)/tests/gpu/%)
GPU_CXXFLAGS := -std=c++17 $(OPT) $(filter-out -Wstrict-prototypes -Wvla,$(WARN)) -Wno-unknown-pragmas \
	-Wno-attributes -pthread -fno-strict-aliasing -isystem $(CUDA_HOME)/include
HAVE_GPU = nvidia-smi -L 2>/dev/null | grep -q '^GPU'

API_SRCS := $(wildcard agent/api/*.c)
API_OBJS := $(API_SRCS:%.c=$(BUILD)/%.o)

# operator/httpd.c (civetweb) links into the operator only, not the unit tests
OPERATOR_SRCS := $(shell find operator -name '*.c' ! -name main.c ! -name httpd.c 2>/dev/null)
OPERATOR_OBJS := $(OPERATOR_SRCS:%.c=$(BUILD)/%.o)

PROGRAMS := $(BIN)/loraplane-generate $(if $(wildcard agent/main.c),$(BIN)/loraplane-agent) \
	$(if $(wildcard operator/main.c),$(BIN)/loraplane-operator)
TOOLS := $(BUILD)/tools/bench $(BUILD)/tools/bench-kernels

.PHONY: all test test-cuda-emu unit check asan tsan bench bench-kernels deps run clean help format fuzz fuzz-build \
	cuda-check test-gpu bench-gpu
all: $(PROGRAMS) $(CUDA_TARGETS)

help:
	@echo "make            build bin/loraplane-agent, -generate and -operator"
	@echo "make deps       install Debian/PyPI packages and the default model"
	@echo "make test       build and run every test (ends with 'N passed, N failed')"
	@echo "make check      formatting and banned-call checks"
	@echo "make asan       the tests under AddressSanitizer + UBSan"
	@echo "make tsan       the unit tests under ThreadSanitizer"
	@echo "make fuzz       build the libFuzzer targets and run each FUZZ_SECONDS (docs/fuzzing.md)"
	@echo "make bench      speed and memory figures on the default model"
	@echo "make bench-kernels  the CPU kernels alone (matvec/GEMM per weight type, attention, dispatch)"
	@echo "make run        start the agent on the default model with the sample adapters"
	@echo "make cuda-check ptxas report of every CUDA kernel: no spills, no stack in hot kernels"
	@echo "make test-gpu   the CUDA tests on a real GPU (prints 'no GPU' without one)"
	@echo "make bench-gpu  hack/bench-gpu.c on a real GPU, CUDA Graphs on and off"
	@echo "make images     the container images (Docker; docs/images.md)"

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(if $(Q),@echo "  CC      $<")
	$(Q)$(CC) $(CPPFLAGS) $(CFLAGS) -c -o $@ $<

$(LIB): $(LIB_OBJS)
	$(Q)rm -f $@ && ar rcs $@ $^

$(BUILD)/emu/%.o: kernels/cuda/%.cu
	@mkdir -p $(dir $@)
	$(if $(Q),@echo "  EMU     $<")
	$(Q)$(CXX) $(CPPFLAGS) $(EMU_CXXFLAGS) -x c++ -c -o $@ $<

$(BUILD)/emu/emu/%.o: kernels/cuda/emu/%.cc
	@mkdir -p $(dir $@)
	$(if $(Q),@echo "  EMU     $<")
	$(Q)$(CXX) $(CPPFLAGS) $(EMU_CXXFLAGS) -c -o $@ $<

$(EMU_LIB): $(EMU_OBJS)
	$(Q)rm -f $@ && ar rcs $@ $^

$(BUILD)/tests/cuda/%: tests/cuda/%.cc $(EMU_LIB) $(LIB) tests/test.h
	@mkdir -p $(dir $@)
	$(if $(Q),@echo "  CXX     $<")
	$(Q)$(CXX) $(CPPFLAGS) $(EMU_CXXFLAGS) $(LDFLAGS) -o $@ $< $(EMU_LIB) $(LIB) $(LDLIBS)

$(BUILD)/cuda/%.o: kernels/cuda/%.cu
	@mkdir -p $(dir $@)
	$(if $(Q),@echo "  NVCC    $<")
	$(Q)$(NVCC) -std=c++17 $(NVCCFLAGS) $(CPPFLAGS) -Xcompiler -fPIC,-fvisibility=hidden \
		$(CUDA_GENCODE) -Xptxas -v -c -o $@ $< 2>$(@:.o=.ptxas) || { cat $(@:.o=.ptxas) >&2; exit 1; }
	$(Q)grep -v -e '^ptxas info' -e '^ *[0-9]* bytes stack frame' $(@:.o=.ptxas) >&2 || true

# the C the shared object needs, its own copy: position-independent, hidden
$(BUILD)/cuda/c/%.o: %.c
	@mkdir -p $(dir $@)
	$(if $(Q),@echo "  CC      $< (cuda)")
	$(Q)$(CC) $(CPPFLAGS) -std=c11 -O2 -g $(WARN) -fPIC -fvisibility=hidden -c -o $@ $<

$(CUDA_SO): $(CUDA_OBJS) $(CUDA_C_OBJS)
	@mkdir -p $(dir $@)
	$(if $(Q),@echo "  LD      $@")
	$(Q)$(CXX) -shared -o $@ $^ $(CUDA_LIBS) -Wl,--no-undefined -Wl,--exclude-libs,ALL

$(BUILD)/tests/gpu/%: tests/cuda/%.cc $(CUDA_OBJS) $(LIB) tests/test.h
	@mkdir -p $(dir $@)
	$(if $(Q),@echo "  CXX     $< (gpu)")
	$(Q)$(CXX) $(CPPFLAGS) $(GPU_CXXFLAGS) $(LDFLAGS) -o $@ $< $(CUDA_OBJS) $(LIB) $(CUDA_LIBS) $(LDLIBS)

# --version (common/version.h): the VERSION file, and the commit when built
# from a git checkout; set LP_VERSION to override (a build without .git).
# The objects that print it are rebuilt when it changes.
ifndef LP_VERSION
LP_VERSION := $(strip $(shell cat VERSION 2>/dev/null))$(shell git describe --always --dirty 2>/dev/null | sed 's/.*/ (git &)/')
endif
$(BUILD)/agent/options.o $(BUILD)/operator/main.o: CPPFLAGS += -DLP_VERSION='"$(LP_VERSION)"'
$(BUILD)/agent/options.o $(BUILD)/operator/main.o: $(BUILD)/version
$(BUILD)/version: FORCE
	@mkdir -p $(BUILD) && echo '$(LP_VERSION)' | cmp -s - $@ || echo '$(LP_VERSION)' >$@
.PHONY: FORCE
FORCE:

$(BIN)/loraplane-generate: $(BUILD)/agent/generate.o $(BUILD)/agent/options.o $(LIB)
	@mkdir -p $(BIN)
	$(if $(Q),@echo "  LD      $@")
	$(Q)$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BIN)/loraplane-agent: $(BUILD)/agent/main.o $(BUILD)/agent/options.o $(BUILD)/agent/fetch.o $(API_OBJS) $(LIB)
	@mkdir -p $(BIN)
	$(if $(Q),@echo "  LD      $@")
	$(Q)$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $^ $(LDLIBS) -lcivetweb

$(BIN)/loraplane-operator: $(BUILD)/operator/main.o $(BUILD)/operator/httpd.o $(OPERATOR_OBJS) $(LIB)
	@mkdir -p $(BIN)
	$(if $(Q),@echo "  LD      $@")
	$(Q)$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $^ $(LDLIBS) -lcivetweb

$(BUILD)/tests/%: tests/unit/%.c $(LIB) $(OPERATOR_OBJS) tests/test.h
	@mkdir -p $(dir $@)
	$(if $(Q),@echo "  CC      $<")
	$(Q)$(CC) $(CPPFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ $< $(filter $(BUILD)/agent/api/%.o,$^) \
		$(OPERATOR_OBJS) $(LIB) $(LDLIBS)

# Unit tests of agent/api/ modules link the objects they test.
$(BUILD)/tests/test-tools: $(BUILD)/agent/api/tools.o $(BUILD)/agent/api/errors.o

# Helper programs of the integration tests, built with the same flags.
INTEGRATION_BINS := $(BUILD)/tests/integration/source-fetch

$(BUILD)/tests/integration/%: tests/integration/%.c $(LIB)
	@mkdir -p $(dir $@)
	$(if $(Q),@echo "  CC      $<")
	$(Q)$(CC) $(CPPFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ $< $(LIB) $(LDLIBS)

$(BUILD)/tools/%: hack/%.c $(LIB)
	@mkdir -p $(dir $@)
	$(Q)$(CC) $(CPPFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ $< $(LIB) $(LDLIBS)

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)

deps:
	$(Q)bash hack/deps.sh

test: deps $(PROGRAMS) $(CUDA_TARGETS) $(UNIT_BINS) $(CUDA_TEST_BINS) $(INTEGRATION_BINS)
	$(Q)BUILD=$(BUILD) BIN=$(BIN) MODEL=$(MODEL) bash tests/run.sh $(UNIT_BINS) $(CUDA_TEST_BINS)

# The unit test programs alone.
unit: deps $(UNIT_BINS) $(CUDA_TEST_BINS)
	$(Q)UNIT_ONLY=1 BUILD=$(BUILD) BIN=$(BIN) MODEL=$(MODEL) bash tests/run.sh $(UNIT_BINS) $(CUDA_TEST_BINS)

# The emulated CUDA tests alone (tests/cuda/).
test-cuda-emu: $(CUDA_TEST_BINS)
	$(Q)UNIT_ONLY=1 BUILD=$(BUILD) BIN=$(BIN) MODEL=$(MODEL) bash tests/run.sh $(CUDA_TEST_BINS)

# ptxas's report of every kernel for every arch (hack/cuda-check.sh).
cuda-check: $(if $(filter 1,$(CUDA)),$(CUDA_OBJS))
	$(Q)NVCC=$(NVCC) CUDA_ARCHS="$(CUDA_ARCHS)" bash hack/cuda-check.sh $(if $(filter 1,$(CUDA)),$(BUILD)/cuda)

# The CUDA tests and the device selection on a real GPU; without one, a
# line saying so and success.
test-gpu:
	$(Q)if ! $(HAVE_GPU); then echo "no GPU: nvidia-smi lists none; make test-gpu has nothing to run"; exit 0; fi; \
	$(MAKE) --no-print-directory CUDA=1 $(PROGRAMS) $(CUDA_SO) $(GPU_TEST_BINS) && \
	UNIT_ONLY=1 BUILD=$(BUILD) BIN=$(BIN) MODEL=$(MODEL) bash tests/run.sh $(GPU_TEST_BINS) && \
	BUILD=$(BUILD) BIN=$(BIN) MODEL=$(MODEL) python3 tests/integration/test-device.py

# hack/bench-gpu.c on a real GPU, with CUDA Graphs on and then off
# (LORAPLANE_CUDA_GRAPHS=0); it links the emulated backend too, for its
# --emulated mode.
$(BUILD)/tools/bench-gpu: hack/bench-gpu.c $(EMU_LIB) $(LIB)
	@mkdir -p $(dir $@)
	$(if $(Q),@echo "  LD      $@")
	$(Q)$(CC) $(CPPFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ $< $(EMU_LIB) $(LIB) $(LDLIBS) -lstdc++

bench-gpu:
	$(Q)if ! $(HAVE_GPU); then echo "no GPU: nvidia-smi lists none; make bench-gpu has nothing to run"; exit 0; fi; \
	$(MAKE) --no-print-directory CUDA=1 $(CUDA_SO) $(BUILD)/tools/bench-gpu && \
	for graphs in 1 0; do echo "bench-gpu: LORAPLANE_CUDA_GRAPHS=$$graphs"; \
		LORAPLANE_CUDA_GRAPHS=$$graphs LORAPLANE_CUDA_LIB=$(abspath $(CUDA_SO)) \
		$(BUILD)/tools/bench-gpu --model $(MODEL) $$([ $$graphs = 0 ] && echo --no-8b) || exit 1; done

check:
	$(Q)bash hack/check.sh

format:
	$(Q)clang-format -i $$(git ls-files '*.c' '*.h')

# Tests under AddressSanitizer and UBSan, in their own build directory.
asan: deps
	$(Q)$(MAKE) --no-print-directory BUILD=build-asan BIN=build-asan/bin \
		OPT="-O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all" \
		LDFLAGS="-fsanitize=address,undefined" test

# Unit tests under ThreadSanitizer (the thread pool, the kernels on it, the
# engine's worker); a data race fails the program.
tsan: deps
	$(Q)$(MAKE) --no-print-directory BUILD=build-tsan BIN=build-tsan/bin \
		OPT="-O1 -g -fsanitize=thread" LDFLAGS="-fsanitize=thread" unit

# libFuzzer targets (clang), one per untrusted-input parser, in their own
# build directory; see docs/fuzzing.md. FUZZ_TARGETS="gguf npy" picks some,
# FUZZ_JOBS runs that many targets at once.
FUZZ_CC ?= clang
FUZZ_BUILD ?= build-fuzz
FUZZ_SECONDS ?= 20
FUZZ_JOBS ?= 1
FUZZ_TARGETS ?= $(patsubst tests/fuzz/fuzz-%.c,%,$(wildcard tests/fuzz/fuzz-*.c))
FUZZ_SAN := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer

fuzz: fuzz-build
	$(Q)FUZZ_BUILD=$(FUZZ_BUILD) bash tests/fuzz/run.sh $(FUZZ_SECONDS) $(FUZZ_JOBS) $(FUZZ_TARGETS)

fuzz-build:
	$(Q)$(MAKE) --no-print-directory CC=$(FUZZ_CC) BUILD=$(FUZZ_BUILD) BIN=$(FUZZ_BUILD)/bin \
		OPT="-O1 -g -fsanitize=fuzzer-no-link $(FUZZ_SAN)" LDFLAGS="-fsanitize=fuzzer $(FUZZ_SAN)" \
		$(FUZZ_TARGETS:%=$(FUZZ_BUILD)/fuzz/fuzz-%)

$(BUILD)/fuzz/fuzz-%: tests/fuzz/fuzz-%.c tests/fuzz/fuzz.h $(API_OBJS) $(LIB)
	@mkdir -p $(dir $@)
	$(if $(Q),@echo "  FUZZ    $@")
	$(Q)$(CC) $(CPPFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ $< $(API_OBJS) $(LIB) $(LDLIBS) -lcivetweb

bench: deps $(TOOLS) $(PROGRAMS) $(if $(CUDA_TEST_BINS),$(BUILD)/tools/bench-gpu)
	$(Q)$(BUILD)/tools/bench --model $(MODEL)
	$(Q)$(BUILD)/tools/bench --model $(MODEL) --only isa
	$(Q)$(BUILD)/tools/bench --model $(MODEL) --only grammar
	$(Q)bash -o pipefail -c "$(BUILD)/tools/bench --model $(GEMMA3_MODEL) --only decode | \
		sed 's/^bench: /bench: gemma3_270m_/'"
	$(Q)$(if $(CUDA_TEST_BINS),echo "CUDA backend, emulated on the CPU: kernel launches and bytes uploaded per decode step (speeds meaningless)" && \
		$(BUILD)/tools/bench-gpu --emulated --model $(MODEL))
	$(Q)$(if $(wildcard hack/bench-agent.py),python3 hack/bench-agent.py --bin $(BIN) --model $(MODEL))
	$(Q)python3 hack/bench-workloads.py --bin $(BIN) --model $(MODEL)
	$(Q)echo "bench-llamacpp: building llama.cpp if needed: hack/llama-cpp.sh (log: $(BUILD)/llama-cpp.log)" >&2; \
	if llama_bin=$$(bash hack/llama-cpp.sh 2>$(BUILD)/llama-cpp.log); then \
		python3 hack/bench-llamacpp.py --bin $(BIN) --bench-tool $(BUILD)/tools/bench --llama-bin "$$llama_bin"; \
	else echo "bench: llamacpp skipped: hack/llama-cpp.sh could not build llama.cpp: $$(tail -n 1 $(BUILD)/llama-cpp.log) (log: $(BUILD)/llama-cpp.log)"; fi
	$(Q)python3 hack/bench-operator.py --bin $(BIN)

bench-kernels: $(BUILD)/tools/bench-kernels
	$(Q)$(BUILD)/tools/bench-kernels

run: deps $(PROGRAMS)
	$(Q)BIN=$(BIN) MODEL=$(MODEL) bash hack/run-agent.sh

# The container images of images/ (docs/images.md), built by Docker from
# the source tree: $(IMAGE_REPO)/loraplane-agent:$(VERSION) (CPU),
# :$(VERSION)-cuda, and $(IMAGE_REPO)/loraplane-operator:$(VERSION).
DOCKER ?= docker
IMAGE_REPO ?= ghcr.io/loraplane
VERSION ?= $(or $(strip $(shell cat VERSION 2>/dev/null)),0.1.0)
IMAGE_BUILD = $(DOCKER) build --build-arg VERSION=$(VERSION)

.PHONY: images
images:
	$(Q)command -v $(DOCKER) >/dev/null 2>&1 || \
		{ echo "make images: no '$(DOCKER)' command: install Docker, or set DOCKER to a compatible client" >&2; exit 1; }
	$(Q)out=$$($(DOCKER) info 2>&1 >/dev/null) || \
		{ echo "make images: the Docker daemon does not answer ('$(DOCKER) info' failed: $$(echo "$$out" | tail -n 1)): start it or set DOCKER_HOST" >&2; exit 1; }
	$(Q)$(IMAGE_BUILD) -f images/agent-cpu.Dockerfile -t $(IMAGE_REPO)/loraplane-agent:$(VERSION) .
	$(Q)$(IMAGE_BUILD) -f images/agent-cuda.Dockerfile -t $(IMAGE_REPO)/loraplane-agent:$(VERSION)-cuda .
	$(Q)$(IMAGE_BUILD) -f images/operator.Dockerfile -t $(IMAGE_REPO)/loraplane-operator:$(VERSION) .

clean:
	rm -rf build build-asan build-tsan bin
