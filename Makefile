# loraplane: one entry point. `make help` lists the targets.

CC ?= cc
CUDA ?= /usr/local/cuda
CUDA_ARCHS ?= 80 86 89 90
PYTHON ?= python3
BUILD ?= build
BIN ?= bin
MODEL ?= models/smollm2-135m-instruct-q4_1.gguf

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

API_SRCS := $(wildcard agent/api/*.c)
API_OBJS := $(API_SRCS:%.c=$(BUILD)/%.o)

OPERATOR_SRCS := $(shell find operator -name '*.c' ! -name main.c 2>/dev/null)
OPERATOR_OBJS := $(OPERATOR_SRCS:%.c=$(BUILD)/%.o)

PROGRAMS := $(BIN)/loraplane-generate $(if $(wildcard agent/main.c),$(BIN)/loraplane-agent) \
	$(if $(wildcard operator/main.c),$(BIN)/loraplane-operator)
TOOLS := $(BUILD)/tools/bench $(BUILD)/tools/bench-kernels

.PHONY: all test unit check asan tsan bench bench-kernels deps run clean help format fuzz fuzz-build
all: $(PROGRAMS)

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

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(if $(Q),@echo "  CC      $<")
	$(Q)$(CC) $(CPPFLAGS) $(CFLAGS) -c -o $@ $<

$(LIB): $(LIB_OBJS)
	$(Q)rm -f $@ && ar rcs $@ $^

$(BIN)/loraplane-generate: $(BUILD)/agent/generate.o $(LIB)
	@mkdir -p $(BIN)
	$(if $(Q),@echo "  LD      $@")
	$(Q)$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BIN)/loraplane-agent: $(BUILD)/agent/main.o $(API_OBJS) $(LIB)
	@mkdir -p $(BIN)
	$(if $(Q),@echo "  LD      $@")
	$(Q)$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $^ $(LDLIBS) -lcivetweb

$(BIN)/loraplane-operator: $(BUILD)/operator/main.o $(OPERATOR_OBJS) $(LIB)
	@mkdir -p $(BIN)
	$(if $(Q),@echo "  LD      $@")
	$(Q)$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/tests/%: tests/unit/%.c $(LIB) $(OPERATOR_OBJS) tests/test.h
	@mkdir -p $(dir $@)
	$(if $(Q),@echo "  CC      $<")
	$(Q)$(CC) $(CPPFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ $< $(OPERATOR_OBJS) $(LIB) $(LDLIBS)

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

test: deps $(PROGRAMS) $(UNIT_BINS) $(INTEGRATION_BINS)
	$(Q)BUILD=$(BUILD) BIN=$(BIN) MODEL=$(MODEL) bash tests/run.sh $(UNIT_BINS)

# The unit test programs alone.
unit: deps $(UNIT_BINS)
	$(Q)UNIT_ONLY=1 BUILD=$(BUILD) BIN=$(BIN) MODEL=$(MODEL) bash tests/run.sh $(UNIT_BINS)

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

bench: deps $(TOOLS) $(PROGRAMS)
	$(Q)$(BUILD)/tools/bench --model $(MODEL)
	$(Q)$(if $(wildcard hack/bench-agent.py),python3 hack/bench-agent.py --bin $(BIN) --model $(MODEL))
	$(Q)python3 hack/bench-operator.py --bin $(BIN)

bench-kernels: $(BUILD)/tools/bench-kernels
	$(Q)$(BUILD)/tools/bench-kernels

run: deps $(PROGRAMS)
	$(Q)BIN=$(BIN) MODEL=$(MODEL) bash hack/run-agent.sh

clean:
	rm -rf build build-asan build-tsan bin
