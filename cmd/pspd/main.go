// Command pspd is the pspd daemon and its key tools. So far it has the
// identity subcommands (genkey, pubkey); the daemon subcommands are added
// beside them.
package main

import (
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"
)

func main() {
	if err := newRootCmd(os.Stdout, os.Stderr).Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "pspd:", err)
		os.Exit(1)
	}
}

func newRootCmd(stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:           "pspd",
		Short:         "authenticated key exchange and PSP/XFRM/userspace encryption between pinned peers",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.AddCommand(newGenkeyCmd(), newPubkeyCmd())
	return root
}
