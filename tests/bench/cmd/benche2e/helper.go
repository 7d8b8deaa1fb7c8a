package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"slices"
	"strings"
	"time"

	"github.com/pspd/pspd/tests/netns"
)

// helperEnv makes this binary, exec'd inside a namespace with the variable
// set, act as one traffic endpoint instead of running the benchmarks.
const helperEnv = "PBE_HELPER"

// maybeHelper runs the helper role named by helperEnv and exits, if set.
func maybeHelper() {
	role := os.Getenv(helperEnv)
	if role == "" {
		return
	}
	args := strings.Fields(os.Getenv(helperEnv + "_ARGS"))
	var err error
	if need := map[string]int{"rr-server": 1, "rr-client": 2, "first-sink": 1, "spray": 1}[role]; len(args) < need {
		role, err = "", fmt.Errorf("helper %s: want %d arguments in %s_ARGS, have %q", os.Getenv(helperEnv), need, helperEnv, args)
	}
	switch role {
	case "":
	case "rr-server":
		err = rrServer(args[0], os.Stdout)
	case "rr-client":
		var d time.Duration
		if d, err = time.ParseDuration(args[1]); err == nil {
			err = rrClient(args[0], d, os.Stdout)
		}
	case "first-sink":
		err = firstSink(args[0], os.Stdout)
	case "spray":
		err = spray(args[0])
	default:
		err = fmt.Errorf("unknown helper role %q", role)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// helper is a command that runs this binary as role inside h.
func helper(ctx context.Context, h *netns.Host, role string, args ...string) (*exec.Cmd, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := h.Command(ctx, self)
	cmd.Env = append(os.Environ(), helperEnv+"="+role, helperEnv+"_ARGS="+strings.Join(args, " "))
	return cmd, nil
}

// rrServer answers every byte it reads with one byte, one connection at a
// time, like netperf's TCP_RR with 1-byte messages.
func rrServer(addr string, w io.Writer) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	fmt.Fprintln(w, "listening")
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		buf := make([]byte, 1)
		for {
			if _, err := io.ReadFull(c, buf); err != nil {
				break
			}
			if _, err := c.Write(buf); err != nil {
				break
			}
		}
		c.Close()
	}
}

// rrReport is what rr-client prints: round-trip percentiles in microseconds.
type rrReport struct {
	N   int     `json:"n"`
	P50 float64 `json:"p50_us"`
	P99 float64 `json:"p99_us"`
}

// rrClient does 1-byte request/response round trips for d and prints an
// rrReport. Go sets TCP_NODELAY, so each request is one segment.
func rrClient(addr string, d time.Duration, w io.Writer) error {
	var c net.Conn
	var err error
	for range 50 {
		if c, err = net.DialTimeout("tcp", addr, time.Second); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		return err
	}
	defer c.Close()
	buf := []byte{'x'}
	rtts := make([]time.Duration, 0, 1<<16)
	end := time.Now().Add(d)
	c.SetDeadline(end.Add(5 * time.Second))
	for time.Now().Before(end) {
		t := time.Now()
		if _, err := c.Write(buf); err != nil {
			return err
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			return err
		}
		rtts = append(rtts, time.Since(t))
	}
	slices.Sort(rtts)
	us := func(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
	return json.NewEncoder(w).Encode(rrReport{N: len(rtts), P50: us(percentile(rtts, 50)), P99: us(percentile(rtts, 99))})
}

// firstSink waits for one datagram on port and prints the wall-clock time
// it arrived, in Unix nanoseconds, so the runner can measure from its own
// clock without counting this process's exit.
func firstSink(port string, w io.Writer) error {
	c, err := net.ListenPacket("udp", net.JoinHostPort("0.0.0.0", port))
	if err != nil {
		return err
	}
	defer c.Close()
	fmt.Fprintln(w, "listening")
	c.SetReadDeadline(time.Now().Add(90 * time.Second))
	buf := make([]byte, 64)
	if _, _, err := c.ReadFrom(buf); err != nil {
		return err
	}
	fmt.Fprintln(w, "arrived", time.Now().UnixNano())
	return nil
}

// spray sends a datagram to addr every millisecond until killed. Errors
// are expected while no tunnel or route exists yet and are ignored.
func spray(addr string) error {
	to, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return err
	}
	c, err := net.ListenPacket("udp", ":0")
	if err != nil {
		return err
	}
	defer c.Close()
	buf := []byte("pbe-probe")
	for {
		c.WriteTo(buf, to)
		time.Sleep(time.Millisecond)
	}
}

// percentile is the p-th percentile (nearest rank) of sorted values.
func percentile[T any](sorted []T, p float64) T {
	var zero T
	if len(sorted) == 0 {
		return zero
	}
	i := int(float64(len(sorted))*p/100+0.5) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}
