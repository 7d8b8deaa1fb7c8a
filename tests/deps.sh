#!/usr/bin/env bash
# Installs what building, testing and the demo need on a Debian machine of
# this project's kind (root, Go at /usr/local/go), and nothing that is
# already there, so a second run costs a few dpkg queries.
#   tests/deps.sh demo    what `make demo` needs
#   tests/deps.sh test    what `make test` needs (the VM harness included)
#   tests/deps.sh bench   what `make bench-e2e` needs
set -euo pipefail
what=${1:-test}
pkgs=(iproute2 tcpdump)
if [ "$what" = bench ]; then
	pkgs+=(iperf3 wireguard-tools)
fi
if [ "$what" = test ]; then
	pkgs+=(iperf3 ethtool nftables conntrack socat curl
		# The VM harness (tests/vm): qemu, a static busybox, tools copied into the VM,
		# and what building the kernel needs.
		qemu-system-x86 busybox-static cpio kmod make gcc flex bison bc xz-utils perl libelf-dev libssl-dev
		# promtool (contrib's alert rules); the package test: dpkg-deb, man, systemd-analyze, systemd-sysusers.
		prometheus dpkg man-db systemd)
fi
need=()
for pkg in "${pkgs[@]}"; do
	# Ask dpkg: the dynamic busybox has the same path as the static one.
	[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" = "install ok installed" ] || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
	if [ "$(id -u)" -ne 0 ]; then
		echo "deps: missing ${need[*]}; run as root (or apt-get install them)" >&2
		exit 1
	fi
	echo "deps: installing ${need[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ "$what" = test ] && ! command -v staticcheck >/dev/null 2>&1 && [ ! -x "${HOME}/go/bin/staticcheck" ]; then
	go install honnef.co/go/tools/cmd/staticcheck@v0.8.2
fi
go mod download
if [ "$what" = test ]; then
	# The VM kernel (make vmtest) builds in the background at the lowest
	# priority while the other tests run, mostly waiting on namespaces and
	# timers; vmtest waits for it (the cache's lock). Its log is beside it.
	mkdir -p "${PSPD_VM_CACHE:-/var/cache/pspd/vm}"
	go build -o "${PSPD_VM_CACHE:-/var/cache/pspd/vm}/vmbuild" ./tests/vm
	nice -n 19 "${PSPD_VM_CACHE:-/var/cache/pspd/vm}/vmbuild" -kernel >"${PSPD_VM_CACHE:-/var/cache/pspd/vm}/build.log" 2>&1 &
	# etcd and kube-apiserver for the fleet tests, built once into /var/cache/pspd.
	go run ./tests/servers
fi
