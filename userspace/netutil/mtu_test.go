package netutil

import (
	"net/netip"
	"testing"
)

func TestInnerMTU(t *testing.T) {
	for _, c := range []struct {
		mtu      int
		outer    string
		overhead int
		want     int // 0: error
	}{
		{1500, "192.0.2.1", 48, 1500 - 20 - 8 - 48},
		{1500, "2001:db8::1", 48, 1500 - 40 - 8 - 48},
		{1500, "::ffff:192.0.2.1", 48, 1500 - 20 - 8 - 48},
		{9000, "192.0.2.1", 32, 9000 - 20 - 8 - 32},
		{600, "2001:db8::1", 48, 0},
	} {
		got, err := InnerMTU(c.mtu, netip.MustParseAddr(c.outer), c.overhead)
		if c.want == 0 {
			if err == nil {
				t.Errorf("InnerMTU(%d, %s, %d) = %d, want an error", c.mtu, c.outer, c.overhead, got)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("InnerMTU(%d, %s, %d) = %d, %v; want %d", c.mtu, c.outer, c.overhead, got, err, c.want)
		}
	}
	if _, err := InnerMTU(1500, netip.Addr{}, 48); err == nil {
		t.Error("zero outer address accepted")
	}
}
