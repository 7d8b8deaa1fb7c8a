// Command pspd is the pspd daemon (run, check), its key tools (genkey,
// pubkey) and version.
package main

import (
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/pspd/pspd/internal/daemon"
	"github.com/pspd/pspd/internal/identitycmd"
	"github.com/pspd/pspd/internal/mancmd"
)

func main() {
	if err := newRootCmd(os.Stdout, os.Stderr).Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "pspd:", err)
		os.Exit(1)
	}
}

func newRootCmd(stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:   "pspd",
		Short: "authenticated key exchange and PSP/XFRM/userspace encryption between pinned peers",
		Long: `pspd authenticates peers over QUIC with mutual TLS 1.3 and pinned P-256 keys,
derives per-association keys with the PSP key schedule and programs them into
kernel PSP, kernel XFRM (ESP) or its own userspace data plane.

The configuration is /etc/pspd/pspd.yaml (fields in /usr/share/doc/pspd/README.md);
this host's key is the file its identity field names, created by pspd genkey.
pspctl(1) inspects and steers the running daemon.`,
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       daemon.Version,
	}
	// Not a template: the text has no actions, and one function prints it.
	root.SetVersionTemplate(versionText())
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.AddCommand(identitycmd.Genkey(), identitycmd.Pubkey(), newRunCmd(), newCheckCmd(), newReloadCmd(), newVersionCmd(), mancmd.Command("8"))
	return root
}
