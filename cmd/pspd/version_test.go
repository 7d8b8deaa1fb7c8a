package main

import (
	"bytes"
	"crypto/fips140"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/pspd/pspd/internal/daemon"
)

// TestVersion: pspd version and pspd --version print the same lines, with
// the version, a commit line, the Go version and the FIPS mode in force.
func TestVersion(t *testing.T) {
	sub, err := run(t, "version")
	if err != nil {
		t.Fatal(err)
	}
	flag, err := run(t, "--version")
	if err != nil {
		t.Fatal(err)
	}
	if sub != flag {
		t.Errorf("pspd version %q, pspd --version %q", sub, flag)
	}
	fips := "fips140: off"
	if fips140.Enabled() {
		fips = "fips140: on"
	}
	for _, want := range []string{"pspd " + daemon.Version + "\n", "\ncommit:  ", "\ngo:      " + runtime.Version() + " ", "\n" + fips} {
		if !strings.Contains(sub, want) {
			t.Errorf("version output %q lacks %q", sub, want)
		}
	}
}

// TestManPages: the hidden man command writes one page per command.
func TestManPages(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("SOURCE_DATE_EPOCH", "1700000000")
	if _, err := run(t, "man", dir); err != nil {
		t.Fatal(err)
	}
	for _, page := range []string{"pspd.8", "pspd-run.8", "pspd-check.8", "pspd-version.8", "pspd-genkey.8"} {
		b, err := os.ReadFile(filepath.Join(dir, page))
		if err != nil {
			t.Error(err)
			continue
		}
		if !bytes.HasPrefix(b, []byte(".nh\n.TH \"PSPD")) || !bytes.Contains(b, []byte("Nov 2023")) {
			t.Errorf("%s: not a roff page dated by SOURCE_DATE_EPOCH: %.80q", page, b)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "pspd-man.8")); err == nil {
		t.Error("the hidden man command got a page")
	}
}
