package netns

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// helperEnv makes a binary that calls MaybeHelper act as a traffic
// endpoint inside a namespace (`ip netns exec NS BINARY` with the
// variable set) instead of running its main job.
const helperEnv = "PSPD_NETNS_HELPER"

// MaybeHelper runs the helper role and exits if this process was started
// as one. Call it first in main and TestMain.
func MaybeHelper() {
	role := os.Getenv(helperEnv)
	if role == "" {
		return
	}
	args := strings.Fields(os.Getenv(helperEnv + "_ARGS"))
	var err error
	switch role {
	case "tcp-echo":
		err = tcpEcho(args[0])
	case "tcp-send":
		n, _ := strconv.Atoi(args[1])
		err = tcpSend(args[0], n, args[2])
	case "spray":
		n, _ := strconv.Atoi(args[3])
		spi, _ := strconv.ParseUint(args[4], 10, 32)
		err = spray(args[0], args[1], args[2], n, uint32(spi))
	case "http-get":
		err = httpGet(args[0])
	case "udp-sink":
		n, _ := strconv.Atoi(args[1])
		err = udpSink(args[0], n)
	case "udp-source":
		n, _ := strconv.Atoi(args[1])
		pps, _ := strconv.Atoi(args[2])
		err = udpSource(args[0], n, pps)
	default:
		err = fmt.Errorf("unknown helper role %q", role)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

func tcpEcho(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	fmt.Println("listening")
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(60 * time.Second))
	c, err := ln.Accept()
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = io.Copy(c, c)
	return err
}

// pattern is n bytes that repeat the canary, so a capture of the wire can
// be searched for it.
func pattern(n int, canary string) []byte {
	return bytes.Repeat([]byte(canary), n/len(canary)+1)[:n]
}

func tcpSend(addr string, n int, canary string) error {
	var c net.Conn
	var err error
	for range 50 { // the echo server may still be starting
		if c, err = net.DialTimeout("tcp", addr, 2*time.Second); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	data := pattern(n, canary)
	go func() {
		c.Write(data)
		c.(*net.TCPConn).CloseWrite()
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		return err
	}
	if sha256.Sum256(got) != sha256.Sum256(data) {
		return fmt.Errorf("echo returned %d bytes that differ from the %d sent", len(got), len(data))
	}
	fmt.Printf("ok %d bytes echoed\n", len(got))
	return nil
}

// helper runs this binary as a helper role inside h.
func (h *Host) helper(ctx context.Context, role string, args ...string) *exec.Cmd {
	self, _ := os.Executable()
	cmd := h.Command(ctx, self)
	cmd.Env = append(os.Environ(), helperEnv+"="+role, helperEnv+"_ARGS="+strings.Join(args, " "))
	return cmd
}

// EchoTCP sends n bytes of the canary pattern from client to an echo
// server at server's inner address and checks they come back intact.
func EchoTCP(ctx context.Context, client, server *Host, serverAddr string, n int, canary string) (time.Duration, error) {
	addr := net.JoinHostPort(serverAddr, "7777")
	srv := server.helper(ctx, "tcp-echo", addr)
	var srvOut bytes.Buffer
	srv.Stdout, srv.Stderr = &srvOut, &srvOut
	if err := srv.Start(); err != nil {
		return 0, err
	}
	defer func() {
		srv.Process.Kill()
		srv.Wait()
	}()
	start := time.Now()
	out, err := client.helper(ctx, "tcp-send", addr, strconv.Itoa(n), canary).CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("tcp echo %s → %s: %v: %s (server: %s)", client.Name, addr, err, bytes.TrimSpace(out), bytes.TrimSpace(srvOut.Bytes()))
	}
	return time.Since(start), nil
}

// udpSink counts sequence-numbered datagrams until it has n or the
// stream has been quiet for two seconds, then prints "received R of N".
func udpSink(addr string, n int) error {
	c, err := net.ListenPacket("udp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	fmt.Println("listening")
	seen := make([]bool, n)
	got := 0
	buf := make([]byte, 2048)
	c.SetReadDeadline(time.Now().Add(60 * time.Second))
	for got < n {
		m, _, err := c.ReadFrom(buf)
		if err != nil {
			break
		}
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		if m < 8 {
			continue
		}
		seq := int(binary.BigEndian.Uint64(buf))
		if seq < n && !seen[seq] {
			seen[seq] = true
			got++
		}
	}
	fmt.Printf("received %d of %d\n", got, n)
	return nil
}

// udpSource sends n datagrams numbered 0..n-1 at pps per second.
func udpSource(addr string, n, pps int) error {
	c, err := net.Dial("udp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	buf := make([]byte, 512)
	tick := time.NewTicker(time.Second / time.Duration(pps))
	defer tick.Stop()
	for i := range n {
		<-tick.C
		binary.BigEndian.PutUint64(buf, uint64(i))
		if _, err := c.Write(buf); err != nil {
			return fmt.Errorf("datagram %d: %w", i, err)
		}
	}
	return nil
}

// UDPSend sends n numbered datagrams at pps from client to server's inner
// address, with nobody listening: for paths that cannot carry a reply.
func UDPSend(ctx context.Context, client *Host, serverAddr string, n, pps int) error {
	addr := net.JoinHostPort(serverAddr, "7778")
	if out, err := client.helper(ctx, "udp-source", addr, strconv.Itoa(n), strconv.Itoa(pps)).CombinedOutput(); err != nil {
		return fmt.Errorf("udp source: %v: %s", err, out)
	}
	return nil
}

// UDPStream sends n numbered datagrams at pps from client to server's
// inner address, runs during() meanwhile, and returns how many arrived.
func UDPStream(ctx context.Context, client, server *Host, serverAddr string, n, pps int, during func() error) (int, error) {
	addr := net.JoinHostPort(serverAddr, "7778")
	sink := server.helper(ctx, "udp-sink", addr, strconv.Itoa(n))
	var out bytes.Buffer
	sink.Stdout, sink.Stderr = &out, &out
	if err := sink.Start(); err != nil {
		return 0, err
	}
	defer sink.Process.Kill()
	for i := 0; i < 100 && !bytes.Contains(out.Bytes(), []byte("listening")); i++ {
		time.Sleep(20 * time.Millisecond)
	}
	src := client.helper(ctx, "udp-source", addr, strconv.Itoa(n), strconv.Itoa(pps))
	srcOut, srcErr := make(chan []byte, 1), make(chan error, 1)
	go func() {
		o, err := src.CombinedOutput()
		srcOut <- o
		srcErr <- err
	}()
	duringErr := during()
	if err := <-srcErr; err != nil {
		return 0, fmt.Errorf("udp source: %v: %s", err, <-srcOut)
	}
	if err := sink.Wait(); err != nil {
		return 0, fmt.Errorf("udp sink: %v: %s", err, out.Bytes())
	}
	var got, want int
	if _, err := fmt.Sscanf(strings.TrimSpace(out.String()[strings.LastIndex(out.String(), "received"):]), "received %d of %d", &got, &want); err != nil {
		return 0, fmt.Errorf("udp sink said %q", out.String())
	}
	return got, duringErr
}
