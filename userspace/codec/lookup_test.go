package codec

import (
	"slices"
	"testing"

	"github.com/pspd/pspd/internal/secret"
	"github.com/pspd/pspd/keyexchange/kdf"
)

func TestHasRX(t *testing.T) {
	c, err := New(Config{Framing: Geneve})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i, spi := range []kdf.SPI{256, 257} {
		k := make([]byte, kdf.AESGCM256.KeyLen())
		k[0] = byte(i + 1)
		key := secret.Own(k)
		if err := c.InstallRX(SA{SPI: spi, Suite: kdf.AESGCM256, Key: key}); err != nil {
			t.Fatal(err)
		}
		key.Wipe()
	}
	if !c.HasRX(256) || !c.HasRX(257) || c.HasRX(258) {
		t.Fatal("HasRX does not match the installed SAs")
	}
	if got := c.AppendRXSPIs(nil); !slices.Equal(got, []uint32{256, 257}) {
		t.Fatalf("AppendRXSPIs = %v", got)
	}
	c.RemoveRX(256)
	if c.HasRX(256) || !slices.Equal(c.AppendRXSPIs(nil), []uint32{257}) {
		t.Fatal("a removed SA is still listed")
	}
	before := c.Stats().Drops
	c.HasRX(999)
	c.AppendRXSPIs(nil)
	if c.Stats().Drops != before {
		t.Fatal("a look-up counted a drop")
	}
}
