# corral: build, test, bench, sanitizers, install.
#
#   make            bin/corral, lib/libcorral.a, lib/libcorral.so (C hosts), lib/corral.so (Lua)
#   make test       C tests and the busted suite (ends with "N passed, N failed")
#   make test-asan  the same under AddressSanitizer + UndefinedBehaviorSanitizer
#   make test-tsan  the same under ThreadSanitizer
#   make bench      benchmarks beside their Python peers
#   make demo       run examples/commands.lua
#   make check-layers  no file of src/ calls a layer above it
#   make fuzz       libFuzzer targets of the frame reader and the decoder (clang),
#                   FUZZ_TIME seconds each (600), corpus in tests/fuzz/<target>/
#   make lint       luacheck, clang-tidy, clang-format check
#   make docs       the API reference (LDoc) in build/docs
#   make install    PREFIX=/usr/local DESTDIR= : binary, libraries, header, module, corral.pc

PREFIX  ?= /usr/local
DESTDIR ?=
BUILD   ?= .
SAN     ?=
CC      ?= cc

PKGS   := luajit libuv msgpack libnats
# The README's commands (demo, test and the sanitizer runs), bench and fuzz
# install what is missing first; plain `make` never installs anything, and
# says which command does when a header is missing.
ifneq ($(filter demo test test-asan test-tsan bench fuzz fuzz-build,$(MAKECMDGOALS)),)
DEPS := $(shell scripts/install-deps >&2 && echo ok)
endif
ifeq ($(filter clean format,$(MAKECMDGOALS)),)
ifneq ($(shell pkg-config --exists $(PKGS) libedit 2>/dev/null && echo ok),ok)
$(error the development files of luajit, libuv, msgpack-c, libnats or libedit are missing: run scripts/install-deps (or make test, which runs it))
endif
endif

# The project's flags; CFLAGS, LDFLAGS and LDLIBS from the command line add
# to them. WERROR=-Werror in CI and `make lint`, not for a packager's build.
OPT     ?= -O2 -g
WERROR  ?=
C_FLAGS := $(OPT) -std=c11 -Wall -Wextra $(WERROR) -fPIC -fvisibility=hidden -D_GNU_SOURCE \
           -Iinclude -Isrc -I$(BUILD)/obj $(shell pkg-config --cflags $(PKGS))
L_FLAGS :=
L_LIBS  := $(shell pkg-config --libs $(PKGS)) -lpthread -lm -ldl
ifneq ($(SAN),)
C_FLAGS += -fsanitize=$(SAN) -fno-omit-frame-pointer -fno-sanitize-recover=all
L_FLAGS += -fsanitize=$(SAN)
endif
ALL_CFLAGS  = $(C_FLAGS) $(CFLAGS)
ALL_LDFLAGS = $(L_FLAGS) $(LDFLAGS)
ALL_LDLIBS  = $(L_LIBS) $(LDLIBS)

SRCS := src/trace.c src/handle.c src/future.c src/buffer.c src/signal.c src/context.c src/sync.c src/reporter.c src/codec.c src/frame.c src/transport_thread.c src/worker.c src/rt.c src/process.c src/nats.c src/lua_util.c src/lua_trace.c src/lua_future.c src/lua_buffer.c src/lua_sync.c src/lua_fs.c src/lua_exec.c src/lua_nats.c src/lua_codec.c src/lua_worker.c src/lua_loop.c src/lua_host.c src/lua_core.c src/runtime.c
OBJS := $(SRCS:src/%.c=$(BUILD)/obj/%.o)
LUA  := $(sort $(wildcard lua/corral/*.lua))
CTESTS := $(patsubst tests/c/%.c,$(BUILD)/obj/tests/%,$(wildcard tests/c/*.c))

BIN  := $(BUILD)/bin/corral
LIBA := $(BUILD)/lib/libcorral.a
LIBSO := $(BUILD)/lib/corral.so
SONAME := libcorral.so.0
LIBSH := $(BUILD)/lib/$(SONAME)

.PHONY: example-host all test soak test-asan test-tsan check-layers fuzz fuzz-build fuzz-targets bench demo lint format install clean docs

all: $(BIN) $(LIBA) $(LIBSO) $(LIBSH)

$(BUILD)/obj/lua_modules.h: $(LUA) scripts/embed-lua
	@mkdir -p $(dir $@)
	scripts/embed-lua $@ $(LUA)

$(BUILD)/obj/%.o: src/%.c src/internal.h src/queue.h src/frame.h include/corral.h
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -c $< -o $@

# only the binding includes the generated header of the Lua half
$(BUILD)/obj/lua_core.o: $(BUILD)/obj/lua_modules.h

$(LIBA): $(OBJS)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

# The Lua module: luajit's symbols come from the host process.
$(LIBSO): $(OBJS)
	@mkdir -p $(dir $@)
	$(CC) -shared $(ALL_LDFLAGS) -o $@ $^ $(filter-out -lluajit-5.1,$(ALL_LDLIBS))

# The shared library for C hosts: it links LuaJIT itself (a host calls the
# Lua API on corral_lua's state); only corral_* and luaopen_corral are
# exported (-fvisibility=hidden).
$(LIBSH): $(OBJS)
	@mkdir -p $(dir $@)
	$(CC) -shared $(ALL_LDFLAGS) -Wl,-soname,$(SONAME) -o $@ $^ $(ALL_LDLIBS)
	ln -sf $(SONAME) $(BUILD)/lib/libcorral.so

$(BUILD)/obj/main.o: src/main.c include/corral.h
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) $(shell pkg-config --cflags libedit) -c $< -o $@

# -rdynamic: C modules that scripts require find the Lua API in the binary.
# Only the binary links libedit (the REPL's line editor).
$(BIN): $(BUILD)/obj/main.o $(LIBA)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_LDFLAGS) -rdynamic -o $@ $^ $(ALL_LDLIBS) $(shell pkg-config --libs libedit)

# The example C host (examples/host/): a 60 Hz frame loop stepping corral.
HOSTEX := $(BUILD)/obj/examples/host
example-host: $(HOSTEX)
$(HOSTEX): examples/host/host.c $(LIBA)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) $(ALL_LDFLAGS) -o $@ $< $(LIBA) $(ALL_LDLIBS)

# The raw figures of a NATS server through libnats (bench/nats_raw.c): the
# baseline of remote workers (issue 13) in `make bench`, and the client the
# nats harness spec checks credentials and TLS with. Never sanitized (libnats
# and its threads are not instrumented).
NATSRAW := $(BUILD)/obj/bench/nats_raw
$(NATSRAW): bench/nats_raw.c
	@mkdir -p $(dir $@)
	$(CC) $(OPT) -std=c11 -Wall -Wextra $(WERROR) -D_GNU_SOURCE $(shell pkg-config --cflags libnats) \
	  $(CFLAGS) $(LDFLAGS) -o $@ $< $(shell pkg-config --libs libnats 2>/dev/null || echo -lnats) -lpthread

$(BUILD)/obj/tests/%: tests/c/%.c tests/c/tap.h $(LIBA)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) $(ALL_LDFLAGS) -rdynamic -o $@ $< $(LIBA) $(ALL_LDLIBS)

# ---- tests ---------------------------------------------------------------

BUSTED := luajit /usr/bin/busted
test: all $(CTESTS) $(HOSTEX) $(NATSRAW)
	CORRAL_BUILD=$(BUILD) $(TEST_ENV) scripts/run-tests $(BUILD)

# The long runs, not in CI: the process chaos test with 50,000 calls (the
# suite runs the issue's 5,000).
soak: all
	CORRAL_BUILD=$(BUILD) CORRAL_CHAOS_CALLS=50000 LUA_CPATH="$(BUILD)/lib/?.so;;" luajit /usr/bin/busted \
	  --no-auto-insulate --lpath="tests/?.lua" --filter="under a killer" tests/spec/process_spec.lua

test-asan:
	$(MAKE) test BUILD=build/asan SAN=address,undefined OPT="-O1 -g" \
	  TEST_ENV="CORRAL_PRELOAD=$$($(CC) -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1"

test-tsan:
	$(MAKE) test BUILD=build/tsan SAN=thread OPT="-O1 -g" \
	  TEST_ENV="CORRAL_PRELOAD=$$($(CC) -print-file-name=libtsan.so) TSAN_OPTIONS=halt_on_error=1:suppressions=$(CURDIR)/tests/tsan.supp"

# No file of src/ calls into a layer above it (the layers are listed in the
# script, bottom-up).
check-layers: all
	scripts/check-layers $(BUILD)

# ---- fuzzing ----------------------------------------------------------------

# libFuzzer targets (tests/fuzz/), built with clang, ASan and UBSan in
# build/fuzz (the objects of src/ with -fsanitize=fuzzer-no-link,...):
#   frames  the frame reader of process workers on a stream cut into reads
#           where the input says, each frame read as process.c reads it
#           (RESULT on the parent's side, BOOT and CALL on the child's) and
#           its payload decoded (a child's results as CODEC_PEER)
#   decode  the decoder alone, at each trust that takes bytes from outside
#           (foreign and peer, as values and as corral.decode's one value),
#           and trusted
# `make fuzz` runs each for FUZZ_TIME seconds on its corpus, tests/fuzz/<target>/
# (kept in git: new inputs are written there, then it is minimised with
# -merge=1), with the seeds that build/fuzz/bin/fuzz-seeds writes. Crashes go
# to build/fuzz/crashes/. `make fuzz FUZZ_TIME=30` for a short run;
# `make fuzz-build` only builds. clang comes from install-deps only here.
FUZZ_TIME    ?= 600
FUZZ_TARGETS := frames decode
FUZZ_SAN     := fuzzer-no-link,address,undefined
fuzz: fuzz-build
	scripts/run-fuzz build/fuzz $(FUZZ_TIME) $(FUZZ_TARGETS)

fuzz-build:
	CORRAL_FUZZ_DEPS=1 scripts/install-deps
	$(MAKE) fuzz-targets BUILD=build/fuzz CC=clang SAN=$(FUZZ_SAN) OPT="-O1 -g"

fuzz-targets: $(FUZZ_TARGETS:%=$(BUILD)/bin/fuzz-%) $(BUILD)/bin/fuzz-seeds

$(BUILD)/bin/fuzz-seeds: tests/fuzz/seeds.c tests/fuzz/fuzz.h $(LIBA)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) $(ALL_LDFLAGS) -o $@ $< $(LIBA) $(ALL_LDLIBS)

$(BUILD)/bin/fuzz-%: tests/fuzz/%.c tests/fuzz/fuzz.h $(LIBA)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -fsanitize=fuzzer,address,undefined -o $@ $< $(LIBA) $(ALL_LDLIBS)

# ---- the rest --------------------------------------------------------------

demo: all
	$(BIN) examples/commands.lua

bench: all $(HOSTEX) $(NATSRAW)
	CORRAL_BENCH_DEPS=1 scripts/install-deps
	scripts/run-bench $(BUILD)

lint:
	$(MAKE) all BUILD=build/lint WERROR=-Werror
	luacheck lua tests bench examples
	clang-format --dry-run --Werror src/*.c src/*.h include/*.h tests/c/*.c tests/c/*.h tests/fuzz/*.c tests/fuzz/*.h
	clang-tidy --quiet src/*.c -- -std=c11 -D_GNU_SOURCE -Iinclude -Isrc -I$(BUILD)/obj $(shell pkg-config --cflags $(PKGS))

docs:
	ldoc -q .

format:
	clang-format -i src/*.c src/*.h include/*.h tests/c/*.c tests/c/*.h tests/fuzz/*.c tests/fuzz/*.h

install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib $(DESTDIR)$(PREFIX)/include \
	  $(DESTDIR)$(PREFIX)/lib/pkgconfig $(DESTDIR)$(PREFIX)/lib/lua/5.1
	install -m 755 $(BIN) $(DESTDIR)$(PREFIX)/bin/corral
	install -m 644 $(LIBA) $(DESTDIR)$(PREFIX)/lib/libcorral.a
	install -m 755 $(LIBSH) $(DESTDIR)$(PREFIX)/lib/$(SONAME)
	ln -sf $(SONAME) $(DESTDIR)$(PREFIX)/lib/libcorral.so
	install -m 644 include/corral.h $(DESTDIR)$(PREFIX)/include/corral.h
	install -m 755 $(LIBSO) $(DESTDIR)$(PREFIX)/lib/lua/5.1/corral.so
	sed -e 's|@PREFIX@|$(PREFIX)|' corral.pc.in > $(DESTDIR)$(PREFIX)/lib/pkgconfig/corral.pc

clean:
	rm -rf bin lib obj tests/bin build
