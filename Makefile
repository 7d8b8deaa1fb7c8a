# pspd build, test and benchmark entry points. `make test` is what CI runs.
GO        ?= go
PKGS      ?= ./...
FUZZTIME  ?= 10s
# auto: skip the VM tests with the reason when qemu or the kernel cannot be had; required: fail.
PSPD_VM   ?= auto
STATICCHECK ?= $(shell command -v staticcheck 2>/dev/null || echo $(HOME)/go/bin/staticcheck)

.PHONY: all build test unit fips fuzz lint bench bench-e2e vmtest demo deps deps-demo

all: build

build:
	$(GO) build $(PKGS)

# Everything CI runs: lint, unit and netns tests, short fuzzing, the real-kernel VM tests.
# It first installs what is missing (apt packages, staticcheck, Go modules).
test: deps
	$(MAKE) lint unit fips fuzz vmtest

deps:
	tests/deps.sh test

deps-demo:
	tests/deps.sh demo

# PSPD_VM is cleared so CI's PSPD_VM=required does not boot the VM here as well as in vmtest.
unit:
	PSPD_VM= $(GO) test -count=1 $(PKGS)

# The key path end to end in Go's FIPS 140-3 mode: handshake, key schedule,
# codec, two daemons over loopback and the demo with real daemons.
fips:
	GODEBUG=fips140=on $(GO) test -count=1 -run 'Test(TwoDaemons|BringUpNegotiateRekey|ActivateOnlyAfterPeerInstalled|PSPVectors|Vectors|RekeyUnderTraffic|PSPTunnelAEADInputs|Demo|RequireFIPS)$$' \
		./keyexchange/... ./userspace/codec ./internal/daemon ./tests/netns ./cmd/pspd

# Each fuzz target runs briefly; the seed corpus already runs in `unit`.
# Go 1.26's fuzz coordinator can fail a target with a bare "context deadline
# exceeded" when -fuzztime expires under CPU load (golang/go#75804, fixed in
# 1.27): such a run, with no failing input written, is retried (up to three runs). Any
# finding fails at once.
fuzz:
	@set -e; log=$$(mktemp); trap 'rm -f $$log' EXIT; \
	git ls-files '*_test.go' | xargs grep -Ho '^func Fuzz[A-Za-z0-9_]*' | sort | \
	while IFS=: read -r file fn; do \
		fn=$${fn#func }; pkg=./$$(dirname $$file); \
		for try in 1 2 3; do \
			echo "fuzz $$pkg $$fn ($(FUZZTIME), try $$try)"; \
			if $(GO) test -run='^$$' -fuzz="^$$fn$$" -fuzztime=$(FUZZTIME) $$pkg >$$log 2>&1; then cat $$log; break; fi; \
			cat $$log; \
			if [ $$try = 3 ] || grep -q 'Failing input written' $$log || ! grep -q 'context deadline exceeded' $$log; then exit 1; fi; \
			echo "fuzz $$fn: coordinator deadline race (golang/go#75804), no failing input; retrying"; \
		done; \
	done

# Boots a kernel with PSP, ESP and netdevsim under qemu and runs the in-kernel tests inside it
# (tests/vm; the first run builds the kernel, about 6 minutes; later runs take seconds).
vmtest:
	PSPD_VM=$(PSPD_VM) $(GO) test -count=1 -v -timeout 45m ./tests/vm -run TestVM

# Two network namespaces, a pspd in each, traffic through the association,
# `pspctl assoc list` from both sides, then cleanup (root; see README).
demo: deps-demo
	$(GO) run ./tests/netns/demo

# tests/bench is its own module (it needs wireguard-go); it is vetted too, so
# that a change in the main module cannot break it unseen.
lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	$(STATICCHECK) $(PKGS)
	cd tests/bench && $(GO) vet ./...

bench:
	$(GO) test -run='^$$' -bench=. -benchmem -count=6 $(PKGS) | tee bench.txt

# Throughput and latency through plain veth, wireguard-go and pspd's userspace
# data plane between two namespaces (root; about 8 minutes); rewrites
# docs/benchmarks.md. tests/bench is its own module so that only it depends
# on wireguard-go. Not part of `make test`.
bench-e2e:
	tests/deps.sh bench
	cd tests/bench && $(GO) run ./cmd/benche2e -out ../../docs/benchmarks.md
