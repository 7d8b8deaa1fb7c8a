// Command servers builds the real servers the tests start, etcd and
// kube-apiserver, into /var/cache/pspd unless they are there, so that no
// test spends its own timeout building one (tests/deps.sh runs it).
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/pspd/pspd/internal/etcdtest"
	"github.com/pspd/pspd/internal/kubetest"
)

func main() {
	for _, s := range []struct {
		name  string
		build func(string) (string, error)
		dir   string
	}{
		{"etcd " + etcdtest.Version, etcdtest.Build, filepath.Join(etcdtest.CacheDir, etcdtest.Version)},
		{"kube-apiserver " + kubetest.Version, kubetest.Build, filepath.Join(kubetest.CacheDir, kubetest.Version)},
	} {
		start := time.Now()
		bin, err := s.build(s.dir)
		if err != nil {
			fmt.Fprintf(os.Stderr, "servers: %s: %v\n", s.name, err)
			os.Exit(1)
		}
		if d := time.Since(start); d > time.Second {
			fmt.Printf("servers: built %s in %v: %s\n", s.name, d.Round(time.Second), bin)
		}
	}
}
