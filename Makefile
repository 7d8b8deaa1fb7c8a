# pspd build, test and benchmark entry points. `make test` is what CI runs.
GO        ?= go
PKGS      ?= ./...
FUZZTIME  ?= 10s
# auto: skip the VM tests with the reason when qemu or the kernel cannot be had; required: fail.
PSPD_VM   ?= auto
STATICCHECK ?= $(shell command -v staticcheck 2>/dev/null || echo $(HOME)/go/bin/staticcheck)

.PHONY: all build test unit fuzz lint bench tools vmtest

all: build

build:
	$(GO) build $(PKGS)

# Everything CI runs: lint, unit and netns tests, short fuzzing, the real-kernel VM tests.
test: lint unit fuzz vmtest

# PSPD_VM is cleared so CI's PSPD_VM=required does not boot the VM here as well as in vmtest.
unit:
	PSPD_VM= $(GO) test -count=1 $(PKGS)

# Each fuzz target runs briefly; the seed corpus already runs in `unit`.
fuzz:
	@set -e; git ls-files '*_test.go' | xargs grep -Ho '^func Fuzz[A-Za-z0-9_]*' | sort | \
	while IFS=: read -r file fn; do \
		fn=$${fn#func }; pkg=./$$(dirname $$file); \
		echo "fuzz $$pkg $$fn ($(FUZZTIME))"; \
		$(GO) test -run='^$$' -fuzz="^$$fn$$" -fuzztime=$(FUZZTIME) $$pkg; \
	done

# Boots a kernel with PSP, ESP and netdevsim under qemu and runs the in-kernel tests inside it
# (tests/vm; the first run builds the kernel, about 6 minutes; later runs take seconds).
vmtest:
	PSPD_VM=$(PSPD_VM) $(GO) test -count=1 -v -timeout 45m ./tests/vm -run TestVM

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	$(STATICCHECK) $(PKGS)

bench:
	$(GO) test -run='^$$' -bench=. -benchmem -count=6 $(PKGS) | tee bench.txt

tools:
	$(GO) install honnef.co/go/tools/cmd/staticcheck@v0.8.2
