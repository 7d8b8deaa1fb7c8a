package genl

import (
	"encoding/hex"
	"strings"
	"testing"

	"github.com/mdlayher/genetlink"
)

// FuzzDecode feeds arbitrary attribute bytes to every reply and
// notification decoder: they must return an error or a well-formed value,
// never panic.
func FuzzDecode(f *testing.F) {
	for _, s := range []string{devReply7, devReply9, rxAssocReply, attrID7, "", "0400", "ffff0100",
		attrID7 + " 0c000300 0100000000000000 06000400 0100 0000",
		attrID7 + " 30000380 24000100 " + key32 + " 08000200 02000000",
		"20000380 14000100 " + key16, "08000100 00000000"} {
		b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, uint8(1))
		f.Add(b, uint8(7))
	}
	f.Fuzz(func(t *testing.T, b []byte, cmd uint8) {
		if d, err := decodeDevice(b); err == nil && d.ID == 0 {
			t.Fatal("device with id 0 accepted")
		}
		if id, err := decodeDevID(b); err == nil && id == 0 {
			t.Fatal("dev id 0 accepted")
		}
		if r, err := decodeRxAssoc(b); err == nil {
			if r.DevID == 0 || r.Key.SPI.KeyID() == 0 || (r.Key.Key.Len() != 16 && r.Key.Key.Len() != 32) {
				t.Fatalf("malformed rx-assoc accepted: dev %d spi %v keylen %d", r.DevID, r.Key.SPI, r.Key.Key.Len())
			}
		}
		if s, err := decodeStats(b); err == nil && s.DevID == 0 {
			t.Fatal("stats with dev-id 0 accepted")
		}
		if ev, ok, err := decodeEvent(genetlink.Message{Header: genetlink.Header{Command: cmd}, Data: b}); err == nil && ok && ev.DevID == 0 {
			t.Fatalf("event %v with dev id 0 accepted", ev.Kind)
		}
	})
}
