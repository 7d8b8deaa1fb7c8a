// Package identitycmd holds the genkey and pubkey subcommands that pspd and
// pspctl both offer.
package identitycmd

import (
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/pspd/pspd/keyexchange/identity"
)

// Genkey creates an identity file and prints its public key.
func Genkey() *cobra.Command {
	var path string
	var force bool
	cmd := &cobra.Command{
		Use:   "genkey --identity FILE",
		Short: "create an ECDSA P-256 identity (PKCS#8 PEM, mode 0600) and print its public key",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if path == "" {
				return errors.New("genkey: --identity FILE is required")
			}
			id, err := identity.Generate()
			if err != nil {
				return err
			}
			if err := identity.WriteFile(path, id, force); err != nil {
				return err
			}
			_, err = fmt.Fprintln(cmd.OutOrStdout(), id.Public())
			return err
		},
	}
	cmd.Flags().StringVar(&path, "identity", "", "identity file to create")
	cmd.Flags().BoolVar(&force, "force", false, "atomically replace an existing identity file")
	return cmd
}

// Pubkey prints the public key of an identity file.
func Pubkey() *cobra.Command {
	var path string
	cmd := &cobra.Command{
		Use:   "pubkey --identity FILE",
		Short: "print the one-line base64 SPKI a peer pins",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if path == "" {
				return errors.New("pubkey: --identity FILE is required")
			}
			id, err := identity.Load(path)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintln(cmd.OutOrStdout(), id.Public())
			return err
		},
	}
	cmd.Flags().StringVar(&path, "identity", "", "identity file to read")
	return cmd
}
