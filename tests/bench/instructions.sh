#!/usr/bin/env bash
# Instructions per packet of the userspace codec (make bench-instructions):
# each benchmark runs under callgrind at two op counts, and the difference
# of the instruction totals over the difference of the counts is the cost
# of one op, whatever else the machine is doing. Go's asynchronous
# preemption signals trip callgrind, so they are off.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v valgrind >/dev/null || { echo "instructions: needs valgrind (apt-get install valgrind)" >&2; exit 1; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
go test -c -o "$dir/codec.test" ./userspace/codec
lo=2000 hi=12000
total() { # benchmark, op count
	GODEBUG=asyncpreemptoff=1 GOMAXPROCS=1 valgrind --tool=callgrind --callgrind-out-file="$dir/cg" \
		"$dir/codec.test" -test.run '^$' -test.bench "^$1\$" -test.benchtime "$2x" 2>&1 |
		sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
per() { local a z; a=$(total "$1" "$lo"); z=$(total "$1" "$hi"); echo $(( (z - a) / (hi - lo) )); }
bare=$(per BenchmarkBareSeal) seal=$(per BenchmarkSeal) both=$(per BenchmarkSealOpen)
echo "1400-byte packet, aes-gcm-256, geneve framing; instructions per packet:"
echo "  bare AES-GCM seal (baseline)  $bare"
echo "  codec seal                    $seal ($(awk "BEGIN{printf \"%.2f\", $seal/$bare}")x the baseline)"
echo "  codec open                    $((both - seal)) ($(awk "BEGIN{printf \"%.2f\", ($both-$seal)/$bare}")x the baseline)"
echo "  codec seal + open             $both"
