#!/usr/bin/env bash
# Builds the Debian package from `make install` into a staging tree:
#   packaging/build-deb.sh [OUT]   writes OUT/pspd_VERSION_ARCH.deb (OUT: out)
# and prints its path. dpkg-deb, not nfpm: the staged tree is exactly what
# make install lays out, so the file list lives in one place (the Makefile)
# and the package needs nothing that Debian does not ship.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-out}
stage=$out/deb/root
rm -rf "$out/deb"
make --no-print-directory install OUT="$out" DESTDIR="$PWD/$stage" PREFIX=/usr SYSCONFDIR=/etc >/dev/null
version=$("$out/bin/pspd" version | sed -n '1s/^pspd //p')
arch=$(dpkg --print-architecture)
mkdir -p "$stage/DEBIAN"
cat >"$stage/DEBIAN/control" <<CONTROL
Package: pspd
Version: $version
Architecture: $arch
Maintainer: pspd developers <dev@pspd.invalid>
Section: net
Priority: optional
Recommends: systemd
Installed-Size: $(du -sk "$stage" | cut -f1)
Description: authenticated PSP, IPsec and userspace encryption between pinned peers
 pspd authenticates peers over QUIC with mutual TLS 1.3 and pinned P-256
 keys, derives per-association keys with the PSP key schedule and programs
 them into kernel PSP, kernel XFRM (ESP) or its own userspace data plane.
 pspctl inspects and steers it through a local API; members of group pspd
 may read its state.
CONTROL
echo /etc/pspd/pspd.yaml >"$stage/DEBIAN/conffiles"
install -m755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$stage/DEBIAN/"
deb=$out/pspd_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
