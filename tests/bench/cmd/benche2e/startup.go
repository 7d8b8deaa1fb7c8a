package main

import (
	"context"
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/pspd/pspd/tests/netns"
)

// startupSample is how long pspd takes to carry traffic: from starting
// both daemons, and from a SIGKILL of one daemon (restarted at once) for
// each side of the key exchange. Which side initiates depends on the
// keys, and a restarted responder waits before dialling itself.
type startupSample struct {
	Cold      time.Duration // start of both daemons → first datagram delivered
	Initiator time.Duration // kill -9 of the initiator → first datagram after its restart
	Responder time.Duration // the same for the responder
}

// probePort is where first-sink listens.
const probePort = "7801"

// startup measures e's pspd pair, which must be up. A sender in a sprays a
// datagram at b's inner address every millisecond; a sink in b reports
// when the first one arrives. Only the tunnel routes the inner address, so
// the first arrival is the first protected packet delivered.
func startup(ctx context.Context, e *env) (startupSample, error) {
	var s startupSample
	p := e.pair
	spray, err := helper(ctx, e.client, "spray", net.JoinHostPort(e.addr, probePort))
	if err != nil {
		return s, err
	}
	if err := spray.Start(); err != nil {
		return s, err
	}
	defer bgKill(spray)

	p.A.Stop()
	p.B.Stop()
	sink, err := firstArrival(ctx, e)
	if err != nil {
		return s, err
	}
	t0 := time.Now()
	if err := p.A.Start(ctx); err != nil {
		return s, err
	}
	if err := p.B.Start(ctx); err != nil {
		return s, err
	}
	at, err := sink()
	if err != nil {
		return s, fmt.Errorf("cold start: %w", err)
	}
	s.Cold = at.Sub(t0)

	as, err := p.WaitAssoc(ctx, 1)
	if err != nil {
		return s, err
	}
	// The receive SPI carries the role of the side that allocated it.
	bRole := kdf.SPI(as[1].RxSPI).Role()
	for _, d := range []*netns.Daemon{p.B, p.A} {
		took, err := restart(ctx, e, d)
		if err != nil {
			return s, err
		}
		if (d == p.B) == (bRole == kdf.Initiator) {
			s.Initiator = took
		} else {
			s.Responder = took
		}
	}
	return s, nil
}

// restart kills d with SIGKILL, starts it again at once and returns the
// time from the kill to the first datagram delivered. The sink starts
// after the kill: until then the old association still delivers.
func restart(ctx context.Context, e *env, d *netns.Daemon) (time.Duration, error) {
	t0 := time.Now()
	d.Kill()
	sink, err := firstArrival(ctx, e)
	if err != nil {
		return 0, err
	}
	if err := d.Start(ctx); err != nil {
		return 0, err
	}
	at, err := sink()
	if err != nil {
		return 0, fmt.Errorf("restart of %s after kill -9: %w", d.Host.Name, err)
	}
	return at.Sub(t0), nil
}

// firstArrival starts a first-sink in e's server; wait returns when the
// first datagram arrived there.
func firstArrival(ctx context.Context, e *env) (wait func() (time.Time, error), err error) {
	sink, err := helper(ctx, e.server, "first-sink", probePort)
	if err != nil {
		return nil, err
	}
	var out syncBuffer
	if err := startListening(sink, &out); err != nil {
		return nil, err
	}
	return func() (time.Time, error) {
		err := sink.Wait()
		line := string(out.Bytes())
		i := strings.Index(line, "arrived ")
		if err != nil || i < 0 {
			return time.Time{}, fmt.Errorf("first-sink: %v: %s\n--- a:\n%s\n--- b:\n%s", err, line, e.pair.A.Tail(10), e.pair.B.Tail(10))
		}
		ns, err := strconv.ParseInt(strings.TrimSpace(line[i+len("arrived "):]), 10, 64)
		if err != nil {
			return time.Time{}, fmt.Errorf("first-sink said %q", line)
		}
		return time.Unix(0, ns), nil
	}, nil
}

// bgKill ends a helper the runner started.
func bgKill(cmd *exec.Cmd) {
	if cmd != nil && cmd.Process != nil {
		cmd.Process.Kill()
		cmd.Wait()
	}
}
