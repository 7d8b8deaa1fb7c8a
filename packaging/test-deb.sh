#!/usr/bin/env bash
# Builds the Debian package and installs it with dpkg into a scratch root
# (dpkg --root, maintainer scripts run chrootless with DPKG_ROOT), then
# checks what an operator gets from it. Root is not needed for most checks;
# `pspd check` of the shipped example needs the tun driver.
#   packaging/test-deb.sh [OUT]
# The last line is "N passed, M failed"; the exit status is non-zero if any
# check failed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-out}
deb=$(packaging/build-deb.sh "$out")
echo "package: $deb"
root=$(mktemp -d /tmp/pspd-deb-root.XXXXXX)
trap 'rm -rf "$root"' EXIT
log=$root.log
passed=0 failed=0
check() {
	local name=$1
	shift
	if "$@" >"$log" 2>&1; then
		passed=$((passed + 1))
		echo "ok   $name"
	else
		failed=$((failed + 1))
		echo "FAIL $name"
		sed 's/^/     /' "$log"
	fi
}
dpkg_root() { dpkg --root="$root" --force-script-chrootless --log=/dev/null "$@"; }

mkdir -p "$root"/var/lib/dpkg/{info,updates,triggers}
touch "$root"/var/lib/dpkg/{status,available}
check "dpkg -i into a scratch root" dpkg_root -i "$deb"

pspd=$root/usr/sbin/pspd
version_ok() {
	local v
	v=$("$pspd" version)
	printf '%s\n' "$v"
	[ "$v" = "$("$pspd" --version)" ] || { echo "pspd --version differs"; return 1; }
	grep -qx 'pspd [0-9][0-9.]*' <<<"${v%%$'\n'*}" || return 1
	grep -q '^go:      go1' <<<"$v" && grep -q '^fips140: ' <<<"$v" || return 1
	if head=$(git rev-parse HEAD 2>/dev/null); then
		grep -q "^commit:  $head" <<<"$v" || { echo "want commit $head"; return 1; }
	fi
}
check "pspd version / --version: version, commit, Go, FIPS" version_ok

man_ok() {
	local f n=0
	for f in "$root"/usr/share/man/man8/*.8 "$root"/usr/share/man/man1/*.1; do
		MANWIDTH=80 man -l "$f" >"$root/page" 2>"$root/page.err" || { echo "$f"; cat "$root/page.err"; return 1; }
		[ ! -s "$root/page.err" ] || { echo "$f:"; cat "$root/page.err"; return 1; }
		grep -q '^NAME' "$root/page" || { echo "$f: no NAME section"; return 1; }
		n=$((n + 1))
	done
	[ "$n" -ge 10 ] || { echo "only $n pages"; return 1; }
	MANPATH=$root/usr/share/man man -w pspd | grep -qx "$root/usr/share/man/man8/pspd.8"
	MANPATH=$root/usr/share/man man -w pspctl | grep -qx "$root/usr/share/man/man1/pspctl.1"
	MANPATH=$root/usr/share/man man -w pspd-run | grep -q "$root"
}
check "man pages render (man -l) and man pspd / pspctl find them" man_ok

# systemd-analyze checks a unit's commands on the host's paths, so the
# installed unit is checked with its paths pointed into the scratch root;
# MANPATH lets it find the man pages its Documentation= names.
unit_ok() {
	sed "s|/usr/sbin/pspd|$pspd|g" "$root/usr/lib/systemd/system/pspd.service" >"$root/pspd.service"
	MANPATH=$root/usr/share/man systemd-analyze verify "$root/pspd.service" >"$root/verify" 2>&1 || { cat "$root/verify"; return 1; }
	[ ! -s "$root/verify" ] || { cat "$root/verify"; return 1; }
	grep -qx 'Type=notify' "$root/pspd.service" && grep -q '^ExecReload=.*pspd reload' "$root/pspd.service"
}
check "systemd-analyze verify of the installed unit" unit_ok

security_ok() {
	local score
	score=$(systemd-analyze security --offline=yes "$root/pspd.service" 2>&1 | sed -n 's/.*Overall exposure level for pspd.service: \([0-9.]*\).*/\1/p')
	echo "exposure $score"
	[ -n "$score" ] && awk -v s="$score" 'BEGIN { exit !(s <= 3.0) }'
}
check "systemd-analyze security: exposure at most 3.0" security_ok

check "sysusers.d entry creates group pspd" bash -c "grep -qx 'g pspd - -' '$root/usr/lib/sysusers.d/pspd.conf' && grep -q '^pspd:x:' '$root/etc/group'"
check "/etc/pspd/pspd.yaml is a conffile" bash -c "dpkg --root='$root' -s pspd | grep -q '^ /etc/pspd/pspd.yaml '"

example_ok() {
	"$pspd" genkey --identity "$root/etc/pspd/identity.pem" >/dev/null
	sed -e "s|/etc/pspd/identity.pem|$root/etc/pspd/identity.pem|" -e "s|/run/pspd/pspd.sock|$root/pspd.sock|" \
		"$root/etc/pspd/pspd.yaml" >"$root/example.yaml"
	"$pspd" check --config "$root/example.yaml"
}
check "the shipped example passes pspd check (with an identity)" example_ok

completion_ok() {
	bash -c "source '$root/usr/share/bash-completion/completions/pspctl' && complete -p pspctl" | grep -q __start_pspctl
	"$root/usr/bin/pspctl" __complete assoc '' | grep -q '^list\b'
	"$root/usr/bin/pspctl" __complete assoc '' | grep -q '^rotate\b'
}
check "bash completion for pspctl loads and completes subcommands" completion_ok

lifecycle_ok() {
	echo "# edited" >>"$root/etc/pspd/pspd.yaml"
	dpkg_root -r pspd
	[ ! -e "$pspd" ] && grep -q '^# edited' "$root/etc/pspd/pspd.yaml" || { echo "remove: binary left or conffile lost"; return 1; }
	dpkg_root -i "$deb"
	grep -q '^# edited' "$root/etc/pspd/pspd.yaml" || { echo "reinstall overwrote the edited conffile"; return 1; }
	dpkg_root -P pspd
	[ ! -e "$root/etc/pspd/pspd.yaml" ] || { echo "purge left the conffile"; return 1; }
}
check "remove keeps an edited conffile, reinstall keeps it, purge removes it" lifecycle_ok

rm -f "$log"
echo "package-test: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
