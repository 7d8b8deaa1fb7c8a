# pspd build, test and benchmark entry points. `make test` is what CI runs.
GO        ?= go
PKGS      ?= ./...
FUZZTIME  ?= 10s
# auto: skip the VM tests with the reason when qemu or the kernel cannot be had; required: fail.
PSPD_VM   ?= auto
STATICCHECK ?= $(shell command -v staticcheck 2>/dev/null || echo $(HOME)/go/bin/staticcheck)

.PHONY: all build preload test unit fips fuzz lint bench bench-e2e bench-instructions vmtest demo deps deps-demo dist install deb package-test

# Installation layout (make install PREFIX=/usr DESTDIR=/tmp/stage). The
# configuration goes to SYSCONFDIR, /etc also for /usr/local: that is where
# pspd run looks by default.
PREFIX      ?= /usr/local
DESTDIR     ?=
BINDIR      ?= $(PREFIX)/bin
SBINDIR     ?= $(PREFIX)/sbin
MANDIR      ?= $(PREFIX)/share/man
DOCDIR      ?= $(PREFIX)/share/doc/pspd
UNITDIR     ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
SYSCONFDIR  ?= /etc
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR  ?= $(PREFIX)/share/zsh/vendor-completions
FISHCOMPDIR ?= $(PREFIX)/share/fish/vendor_completions.d
# GOFLAGS may carry -buildvcs=false (it does on this project's machines), so
# the commit is passed explicitly; pspd version prints it.
COMMIT      ?= $(shell git rev-parse HEAD 2>/dev/null)
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || date +%s)
export SOURCE_DATE_EPOCH
OUT         ?= out
LIBDIR      ?= $(PREFIX)/lib/pspd
# The LD_PRELOAD library for unmodified programs (psp-preload/; README, Kernel PSP).
CC          ?= cc
PRELOAD_CFLAGS ?= -O2 -g -Wall -Wextra -Werror
PRELOAD     ?= $(OUT)/lib/libpspd-preload.so

all: build

build: preload
	$(GO) build $(PKGS)

preload:
	mkdir -p $(dir $(PRELOAD))
	$(CC) $(PRELOAD_CFLAGS) -fPIC -shared -o $(PRELOAD) psp-preload/pspd_preload.c -ldl

# Everything CI runs: lint, unit and netns tests, short fuzzing, the real-kernel VM tests.
# It first installs what is missing (apt packages, staticcheck, Go modules).
test: deps
	$(MAKE) lint unit fips fuzz package-test vmtest

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

# Static binaries, man pages generated from the commands, shell completions.
dist: preload
	rm -rf $(OUT)/man $(OUT)/completion
	mkdir -p $(OUT)/bin $(OUT)/man $(OUT)/completion
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '-X main.commit=$(COMMIT)' -o $(OUT)/bin/pspd ./cmd/pspd
	CGO_ENABLED=0 $(GO) build -trimpath -o $(OUT)/bin/pspctl ./cmd/pspctl
	$(OUT)/bin/pspd man $(OUT)/man
	$(OUT)/bin/pspctl man $(OUT)/man
	for c in pspd pspctl; do \
		$(OUT)/bin/$$c completion bash >$(OUT)/completion/$$c.bash && \
		$(OUT)/bin/$$c completion zsh >$(OUT)/completion/_$$c && \
		$(OUT)/bin/$$c completion fish >$(OUT)/completion/$$c.fish || exit 1; \
	done

# Installs what dist built. An existing pspd.yaml is kept; without DESTDIR,
# systemd-sysusers creates group pspd (the API's read group).
install: dist
	install -Dm755 $(OUT)/bin/pspd $(DESTDIR)$(SBINDIR)/pspd
	install -Dm755 $(OUT)/bin/pspctl $(DESTDIR)$(BINDIR)/pspctl
	install -Dm644 $(PRELOAD) $(DESTDIR)$(LIBDIR)/libpspd-preload.so
	install -d $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man8
	install -m644 $(OUT)/man/*.1 $(DESTDIR)$(MANDIR)/man1/
	install -m644 $(OUT)/man/*.8 $(DESTDIR)$(MANDIR)/man8/
	for c in pspd pspctl; do \
		install -Dm644 $(OUT)/completion/$$c.bash $(DESTDIR)$(BASHCOMPDIR)/$$c && \
		install -Dm644 $(OUT)/completion/_$$c $(DESTDIR)$(ZSHCOMPDIR)/_$$c && \
		install -Dm644 $(OUT)/completion/$$c.fish $(DESTDIR)$(FISHCOMPDIR)/$$c.fish || exit 1; \
	done
	install -d $(DESTDIR)$(UNITDIR)
	sed -e 's|/usr/sbin/pspd|$(SBINDIR)/pspd|g' -e 's|/etc/pspd/|$(SYSCONFDIR)/pspd/|g' \
		-e 's|/usr/share/doc/pspd/|$(DOCDIR)/|g' contrib/pspd.service >$(DESTDIR)$(UNITDIR)/pspd.service
	chmod 644 $(DESTDIR)$(UNITDIR)/pspd.service
	install -Dm644 packaging/pspd.sysusers $(DESTDIR)$(SYSUSERSDIR)/pspd.conf
	install -d -m755 $(DESTDIR)$(SYSCONFDIR)/pspd
	[ -e $(DESTDIR)$(SYSCONFDIR)/pspd/pspd.yaml ] || install -m644 contrib/pspd.yaml $(DESTDIR)$(SYSCONFDIR)/pspd/pspd.yaml
	install -Dm644 README.md $(DESTDIR)$(DOCDIR)/README.md
	install -d $(DESTDIR)$(DOCDIR)/contrib
	install -m644 contrib/pspd-alerts.yml contrib/pspd-dashboard.json $(DESTDIR)$(DOCDIR)/contrib/
	if [ -z "$(DESTDIR)" ] && command -v systemd-sysusers >/dev/null; then systemd-sysusers $(SYSUSERSDIR)/pspd.conf; fi

# The Debian package, $(OUT)/pspd_VERSION_ARCH.deb: make install into a
# staging tree under /usr, plus the control files in packaging/deb.
deb:
	packaging/build-deb.sh $(OUT)

# Builds the package, installs it into a scratch root with dpkg and checks
# what an operator gets: pspd version, the man pages, the unit
# (systemd-analyze verify), group pspd, the conffile, completion; and the
# shipped alert rules (promtool check rules).
package-test:
	packaging/test-deb.sh $(OUT)

bench:
	$(GO) test -run='^$$' -bench=. -benchmem -count=6 $(PKGS) | tee bench.txt

# Throughput and latency through plain veth, wireguard-go and pspd's userspace
# data plane between two namespaces (root; about 8 minutes); rewrites
# docs/benchmarks.md. tests/bench is its own module so that only it depends
# on wireguard-go. Not part of `make test`.
bench-e2e:
	tests/deps.sh bench
	cd tests/bench && $(GO) run ./cmd/benche2e -out ../../docs/benchmarks.md

# Instructions per packet of the codec, counted by callgrind: stable
# across machine load, so a regression shows as a number, not noise.
bench-instructions:
	tests/bench/instructions.sh
