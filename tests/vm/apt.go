package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
)

// The kernel source comes from trixie-backports, which the host (bookworm) does not list. A
// private apt configuration under the cache directory keeps the system's apt state untouched,
// and the mirror is whatever the machine already uses, so no host name lives in the project.
const (
	sourceSuite    = "trixie-backports"
	defaultKeyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
)

// mirror is one Debian archive the machine's apt configuration points at.
type mirror struct {
	URI      string
	SignedBy string
}

// findMirror reads the deb822 .sources files in dir and returns the first main Debian archive:
// a "deb" stanza whose suites are not the security ones.
func findMirror(dir string) (mirror, error) {
	files, err := filepath.Glob(filepath.Join(dir, "*.sources"))
	if err != nil {
		return mirror{}, err
	}
	sort.Strings(files)
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return mirror{}, fmt.Errorf("read apt sources: %w", err)
		}
		if m, ok := mirrorFromDeb822(string(b)); ok {
			return m, nil
		}
	}
	return mirror{}, fmt.Errorf("no Debian archive (Types: deb, non-security Suites) in %s/*.sources", dir)
}

func mirrorFromDeb822(text string) (mirror, bool) {
	for _, stanza := range strings.Split(text, "\n\n") {
		fields := map[string]string{}
		sc := bufio.NewScanner(strings.NewReader(stanza))
		for sc.Scan() {
			line := sc.Text()
			if strings.HasPrefix(line, "#") || strings.HasPrefix(line, " ") || strings.HasPrefix(line, "\t") {
				continue
			}
			k, v, ok := strings.Cut(line, ":")
			if !ok {
				continue
			}
			fields[strings.ToLower(strings.TrimSpace(k))] = strings.TrimSpace(v)
		}
		if fields["enabled"] == "no" || !slices.Contains(strings.Fields(fields["types"]), "deb") {
			continue
		}
		uris := strings.Fields(fields["uris"])
		suites := strings.Fields(fields["suites"])
		if len(uris) == 0 || len(suites) == 0 || strings.Contains(suites[0], "security") {
			continue
		}
		signed := fields["signed-by"]
		if !strings.HasPrefix(signed, "/") { // empty, or an inline key block
			signed = defaultKeyring
		}
		return mirror{URI: uris[0], SignedBy: signed}, true
	}
	return mirror{}, false
}

// privateApt runs apt-get/apt-cache against a configuration rooted at dir.
type privateApt struct {
	dir string
	log func(format string, args ...any)
}

func (a privateApt) options() []string {
	return []string{
		"-o", "Dir::Etc::SourceList=" + filepath.Join(a.dir, "sources.list"),
		"-o", "Dir::Etc::SourceParts=/nonexistent",
		"-o", "Dir::State::Lists=" + filepath.Join(a.dir, "lists"),
		"-o", "Dir::State::Status=" + filepath.Join(a.dir, "status"),
		"-o", "Dir::Cache=" + filepath.Join(a.dir, "cache"),
		// The private lists and cache are ours alone; the harness's own flock serialises runs.
		"-o", "Debug::NoLocking=1",
		// Files land in root-owned cache directories the _apt sandbox user cannot write.
		"-o", "APT::Sandbox::User=root",
	}
}

// update writes the private sources.list from the machine's mirror and refreshes the lists.
func (a privateApt) update(ctx context.Context, m mirror) error {
	for _, d := range []string{"lists/partial", "cache/archives/partial"} {
		if err := os.MkdirAll(filepath.Join(a.dir, d), 0o755); err != nil {
			return err
		}
	}
	if err := os.WriteFile(filepath.Join(a.dir, "status"), nil, 0o644); err != nil {
		return err
	}
	src := fmt.Sprintf("deb [signed-by=%s] %s %s main\n", m.SignedBy, m.URI, sourceSuite)
	if err := os.WriteFile(filepath.Join(a.dir, "sources.list"), []byte(src), 0o644); err != nil {
		return err
	}
	_, err := run(ctx, a.log, "", "apt-get", append(a.options(), "-q", "update")...)
	return err
}

// candidate returns the version apt would download for pkg.
func (a privateApt) candidate(ctx context.Context, pkg string) (string, error) {
	out, err := run(ctx, nil, "", "apt-cache", append(a.options(), "show", "--no-all-versions", pkg)...)
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(line, "Version: "); ok {
			return strings.TrimSpace(v), nil
		}
	}
	return "", fmt.Errorf("apt-cache show %s: no Version field", pkg)
}

// download fetches pkg's .deb into dir and returns its path.
func (a privateApt) download(ctx context.Context, pkg, dir string) (string, error) {
	if _, err := run(ctx, a.log, dir, "apt-get", append(a.options(), "-q", "download", pkg)...); err != nil {
		return "", err
	}
	debs, _ := filepath.Glob(filepath.Join(dir, pkg+"_*.deb"))
	if len(debs) == 0 {
		return "", errors.New("apt-get download " + pkg + ": no .deb written")
	}
	return newestDeb(debs)
}
