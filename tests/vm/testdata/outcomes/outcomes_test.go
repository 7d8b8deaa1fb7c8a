// Package outcomes is a fixture for the harness's own test (TestVMReportsOutcomes): one test of
// every outcome, so the harness is shown to report failures, skips and crashes inside the VM as
// such. Outside the VM every test skips. It lives under testdata so ./... never runs it.
package outcomes

import (
	"os"
	"testing"
)

func inVM(t *testing.T) {
	if os.Getenv("PSPD_IN_VM") != "1" {
		t.Skip("fixture: only meaningful inside the VM")
	}
}

func TestPass(t *testing.T) { inVM(t) }

func TestSkip(t *testing.T) {
	inVM(t)
	t.Skip("fixture skip reason")
}

func TestFail(t *testing.T) {
	inVM(t)
	t.Run("ok", func(t *testing.T) {})
	t.Run("bad", func(t *testing.T) { t.Error("fixture failure message") })
}

// TestCrash runs last (source order) and ends the binary without a result line.
func TestCrash(t *testing.T) {
	inVM(t)
	os.Exit(3)
}
