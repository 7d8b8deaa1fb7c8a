// Package mancmd gives pspd's commands a hidden "man DIR" subcommand that
// writes their roff man pages, one per command, from the commands' own
// definitions (cobra's doc generator), so that the pages cannot drift from
// --help. make install and the Debian package run it at build time.
package mancmd

import (
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"
)

// Command returns the hidden man command; section is the manual section
// of the root command's pages ("8" for the daemon, "1" for the CLI).
func Command(section string) *cobra.Command {
	return &cobra.Command{
		Use:    "man DIR",
		Short:  "write the man pages of every command to DIR",
		Hidden: true,
		Args:   cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			date, err := buildDate()
			if err != nil {
				return err
			}
			if err := os.MkdirAll(args[0], 0o755); err != nil {
				return fmt.Errorf("man: %w", err)
			}
			root := cmd.Root()
			// The generator documents cobra's own completion and help
			// commands too; they are not worth a page each.
			root.InitDefaultCompletionCmd()
			for _, c := range root.Commands() {
				if c.Name() == "completion" || c.Name() == "help" {
					c.Hidden = true
				}
			}
			root.DisableAutoGenTag = true
			hdr := &doc.GenManHeader{Section: section, Date: &date, Source: "pspd", Manual: "pspd manual"}
			if err := doc.GenManTree(root, hdr, args[0]); err != nil {
				return fmt.Errorf("man: %w", err)
			}
			return nil
		},
	}
}

// buildDate is SOURCE_DATE_EPOCH when set, so that a package built twice
// from one commit has the same pages.
func buildDate() (time.Time, error) {
	s := os.Getenv("SOURCE_DATE_EPOCH")
	if s == "" {
		return time.Now().UTC(), nil
	}
	sec, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return time.Time{}, fmt.Errorf("man: SOURCE_DATE_EPOCH %q: want seconds since 1970", s)
	}
	return time.Unix(sec, 0).UTC(), nil
}
