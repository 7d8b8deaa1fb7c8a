package netns

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pspd/pspd/userspace/wire"
)

// spray sends n forged UDP datagrams of one kind from src to dst through
// a raw socket, so the source address and port can be anyone's.
//
//	random   random bytes of random length (0..1400)
//	spi      a well-formed Geneve header with a random SPI
//	forged   a well-formed Geneve header with the given SPI and a counter
//	         far ahead of any real one, random ciphertext
//	esp-spi     ESP (IP protocol 50, no UDP) with a random SPI
//	esp-forged  ESP with the given SPI and a sequence number far ahead of
//	            any real one, random ciphertext and ICV
func spray(kind, src, dst string, n int, spi uint32) error {
	s, err := netip.ParseAddrPort(src)
	if err != nil {
		return err
	}
	d, err := netip.ParseAddrPort(dst)
	if err != nil {
		return err
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_RAW)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	to := &unix.SockaddrInet4{Addr: d.Addr().As4()}
	pkt := make([]byte, 20+8+1500)
	for i := range n {
		if esp, ok := strings.CutPrefix(kind, "esp-"); ok {
			// IP header, then SPI, sequence number and 200 random bytes.
			body := pkt[20 : 20+8+200]
			rand.Read(body)
			id := spi
			if esp == "spi" {
				id = binary.BigEndian.Uint32(body[100:]) | 0x100
			} else if esp != "forged" {
				return fmt.Errorf("unknown spray kind %q", kind)
			}
			binary.BigEndian.PutUint32(body[0:], id)
			binary.BigEndian.PutUint32(body[4:], 1<<31+uint32(i))
			ipHeader(pkt[:20], s.Addr(), d.Addr(), unix.IPPROTO_ESP, 20+len(body))
			if err := unix.Sendto(fd, pkt[:20+len(body)], 0, to); err != nil {
				return fmt.Errorf("packet %d: %w", i, err)
			}
			continue
		}
		var payload []byte
		switch kind {
		case "random":
			var l [2]byte
			rand.Read(l[:])
			payload = pkt[28 : 28+int(binary.BigEndian.Uint16(l[:]))%1400]
			rand.Read(payload)
		case "spi", "forged":
			payload = pkt[28 : 28+wire.GeneveHeaderLen+200]
			rand.Read(payload)
			id := spi
			if kind == "spi" {
				id = binary.BigEndian.Uint32(payload[100:]) | 1
			}
			wire.PutGeneve(payload, wire.IPv4, id, 1<<40+uint64(i))
		default:
			return fmt.Errorf("unknown spray kind %q", kind)
		}
		total := 28 + len(payload)
		ipHeader(pkt[:20], s.Addr(), d.Addr(), unix.IPPROTO_UDP, total)
		udp := pkt[20:28]
		binary.BigEndian.PutUint16(udp[0:], s.Port())
		binary.BigEndian.PutUint16(udp[2:], d.Port())
		binary.BigEndian.PutUint16(udp[4:], uint16(8+len(payload)))
		binary.BigEndian.PutUint16(udp[6:], 0)
		if err := unix.Sendto(fd, pkt[:total], 0, to); err != nil {
			return fmt.Errorf("datagram %d: %w", i, err)
		}
	}
	return nil
}

// ipHeader writes an IPv4 header for a raw send; the kernel fills in the
// checksum for IPPROTO_RAW.
func ipHeader(ip []byte, src, dst netip.Addr, proto uint8, total int) {
	ip[0], ip[1] = 0x45, 0
	binary.BigEndian.PutUint16(ip[2:], uint16(total))
	binary.BigEndian.PutUint32(ip[4:], 0)
	ip[8], ip[9] = 64, proto
	binary.BigEndian.PutUint16(ip[10:], 0)
	copy(ip[12:16], src.AsSlice())
	copy(ip[16:20], dst.AsSlice())
}

// Spray runs spray inside h.
func (h *Host) Spray(ctx context.Context, kind, src, dst string, n int, spi uint32) error {
	out, err := h.helper(ctx, "spray", kind, src, dst, strconv.Itoa(n), strconv.FormatUint(uint64(spi), 10)).CombinedOutput()
	if err != nil {
		return fmt.Errorf("spray %s: %v: %s", kind, err, out)
	}
	return nil
}

func httpGet(url string) error {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, err = io.Copy(stdout{}, resp.Body)
	return err
}

type stdout struct{}

func (stdout) Write(b []byte) (int, error) { return fmt.Print(string(b)) }

// Metrics fetches the Prometheus text of the daemon in h.
func (h *Host) Metrics(ctx context.Context) (string, error) {
	out, err := h.helper(ctx, "http-get", "http://"+MetricsAddr+"/metrics").Output()
	return string(out), err
}

// MetricValue finds one sample by name and label substring.
func MetricValue(text, name, labels string) (float64, bool) {
	for _, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(line, name+"{") && strings.Contains(line, labels) {
			f := strings.Fields(line)
			v, err := strconv.ParseFloat(f[len(f)-1], 64)
			return v, err == nil
		}
	}
	return 0, false
}
