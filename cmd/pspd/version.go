package main

import (
	"crypto/fips140"
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/spf13/cobra"

	"github.com/pspd/pspd/internal/daemon"
)

// commit is set with -ldflags "-X main.commit=..." by builds that have no
// VCS stamp (a source tarball); go build in a clone stamps it itself.
var commit string

// versionText is what pspd version and pspd --version print.
func versionText() string {
	rev, modified := commit, ""
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			switch {
			case s.Key == "vcs.revision" && rev == "":
				rev = s.Value
			case s.Key == "vcs.modified" && s.Value == "true":
				modified = " (modified)"
			}
		}
	}
	if rev == "" {
		rev = "unknown"
	}
	fips := "off (GODEBUG=fips140=on turns it on)"
	if fips140.Enabled() {
		fips = "on"
	}
	return fmt.Sprintf("pspd %s\ncommit:  %s%s\ngo:      %s %s/%s\nfips140: %s\n",
		daemon.Version, rev, modified, runtime.Version(), runtime.GOOS, runtime.GOARCH, fips)
}

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "print pspd's version, commit, Go version and FIPS 140-3 mode",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, err := fmt.Fprint(cmd.OutOrStdout(), versionText())
			return err
		},
	}
}
