// Command demo is `make demo`: two network namespaces joined by veth, a
// pspd in each with fresh identities, an association between them, a TCP
// exchange through it, both sides' `pspctl assoc list`, then cleanup.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"time"

	"github.com/pspd/pspd/tests/netns"
)

func main() {
	netns.MaybeHelper()
	backend := flag.String("backend", "userspace", "backend both daemons use")
	keep := flag.Bool("keep", false, "leave the namespaces and daemons running until interrupted")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := demo(ctx, *backend, *keep); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func step(format string, args ...any) { fmt.Printf("==> "+format+"\n", args...) }

func demo(ctx context.Context, backend string, keep bool) error {
	dir, err := os.MkdirTemp("", "pspd-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	root, err := os.Getwd()
	if err != nil {
		return err
	}
	step("building pspd and pspctl")
	lab, err := netns.NewLab(ctx, "pspdemo-", root, dir)
	if err != nil {
		return err
	}
	defer lab.Close()

	step("two hosts (network namespaces pspdemo-a, pspdemo-b) on a switched underlay 192.0.2.1 <-> 192.0.2.2; starting pspd in each (%s backend)", backend)
	start := time.Now()
	p, err := lab.TwoHosts(ctx, backend)
	if err != nil {
		return err
	}
	as, err := p.WaitAssoc(ctx, 1)
	if err != nil {
		return err
	}
	step("association up in %v: a receives on %#08x, b receives on %#08x", time.Since(start).Round(time.Millisecond), as[0].RxSPI, as[1].RxSPI)

	const canary = "pspd-demo-canary-"
	stopCap, err := p.Capture(ctx)
	if err != nil {
		return err
	}
	step("sending 1 MiB over TCP from a (%s) to an echo server on b (%s) through the tunnel", p.Inner[0], p.Inner[1])
	took, err := netns.EchoTCP(ctx, p.A.Host, p.B.Host, p.Inner[1], 1<<20, canary)
	if err != nil {
		return err
	}
	wire, err := stopCap()
	if err != nil {
		return err
	}
	if wire.Contains(canary) {
		return fmt.Errorf("the plaintext canary appeared on the underlay: traffic is not encrypted")
	}
	step("1 MiB echoed intact in %v; the %d-byte capture of the underlay never shows the plaintext", took.Round(time.Millisecond), wire.Size())

	for _, d := range []*netns.Daemon{p.A, p.B} {
		out, err := d.Ctl(ctx, "assoc", "list")
		if err != nil {
			return err
		}
		step("pspctl assoc list on %s:\n%s", d.Host.Name, out)
	}
	if keep {
		step("running until interrupted; try: ip netns exec pspdemo-a %s --socket %s status", lab.Pspctl, p.A.Socket)
		<-ctx.Done()
	}
	step("cleaning up")
	return nil
}
