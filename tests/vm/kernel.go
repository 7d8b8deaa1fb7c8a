package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// kernel builds (or finds in the cache) a bzImage from Debian's kernel source and the fragment.
//
// Cache layout under dir:
//
//	debs/<pkg>_<version>_all.deb     the downloaded source package
//	src/<version>/linux-source-*/    the unpacked tree (kept: rebuilds after a fragment change are incremental)
//	build/<version>/                 the O= build directory
//	<version>-<sha256(fragment)[:12]>/bzImage, config, build.log
//	apt/                             the private apt configuration
//	lock                             flock held while downloading or building
type kernel struct {
	dir      string
	pkg      string
	fragment []byte
	refresh  bool // ask apt for a newer source version even if one is cached
	jobs     int
	log      func(format string, args ...any)
}

// unavailableError means a prerequisite of the harness is missing on this machine (a tool, the
// network, write access to the cache), as opposed to the harness or the kernel being wrong.
// With PSPD_VM=auto the first kind skips and the second fails.
type unavailableError struct{ reason string }

func (e *unavailableError) Error() string { return e.reason }

func unavailable(format string, args ...any) error {
	return &unavailableError{reason: fmt.Sprintf(format, args...)}
}

func fragmentHash(fragment []byte) string {
	sum := sha256.Sum256(fragment)
	return hex.EncodeToString(sum[:])[:12]
}

func (k kernel) imageDir(version string) string {
	return filepath.Join(k.dir, version+"-"+fragmentHash(k.fragment))
}

// cachedDeb returns the newest cached source package and its version, or "" if none.
func (k kernel) cachedDeb() (path, version string, err error) {
	debs, _ := filepath.Glob(filepath.Join(k.dir, "debs", k.pkg+"_*.deb"))
	if len(debs) == 0 {
		return "", "", nil
	}
	path, err = newestDeb(debs)
	if err != nil {
		return "", "", err
	}
	return path, debVersion(path), nil
}

// debVersion extracts the version from apt's <name>_<version>_<arch>.deb file name.
func debVersion(path string) string {
	parts := strings.Split(filepath.Base(path), "_")
	if len(parts) != 3 {
		return ""
	}
	return strings.ReplaceAll(parts[1], "%3a", ":")
}

func newestDeb(debs []string) (string, error) {
	best := debs[0]
	for _, d := range debs[1:] {
		err := exec.Command("dpkg", "--compare-versions", debVersion(d), "gt", debVersion(best)).Run()
		var exit *exec.ExitError
		switch {
		case err == nil:
			best = d
		case errors.As(err, &exit):
		default:
			return "", fmt.Errorf("compare versions of %s: %w", d, err)
		}
	}
	return best, nil
}

// ensure returns the path of a bzImage built from the fragment, building it if needed.
func (k kernel) ensure(ctx context.Context) (string, error) {
	if !k.refresh {
		if _, version, err := k.cachedDeb(); err == nil && version != "" {
			img := filepath.Join(k.imageDir(version), "bzImage")
			if _, err := os.Stat(img); err == nil {
				return img, nil
			}
		}
	}
	if err := os.MkdirAll(k.dir, 0o755); err != nil {
		return "", unavailable("kernel cache %s is not writable: %v (set PSPD_VM_CACHE)", k.dir, err)
	}
	unlock, err := lockFile(ctx, filepath.Join(k.dir, "lock"), k.log)
	if err != nil {
		return "", err
	}
	defer unlock()

	deb, version, err := k.source(ctx)
	if err != nil {
		return "", err
	}
	imgDir := k.imageDir(version)
	img := filepath.Join(imgDir, "bzImage")
	if _, err := os.Stat(img); err == nil {
		return img, nil // another run built it while we waited for the lock
	}
	if err := needTools("build the kernel", "make", "gcc", "flex", "bison", "bc", "dpkg-deb", "tar", "xz", "perl"); err != nil {
		return "", err
	}
	if _, err := os.Stat("/usr/include/gelf.h"); err != nil {
		return "", unavailable("cannot build the kernel: libelf-dev is not installed (/usr/include/gelf.h missing)")
	}
	src, err := k.unpack(ctx, deb, version)
	if err != nil {
		return "", err
	}
	if err := k.build(ctx, src, version, imgDir); err != nil {
		return "", err
	}
	return img, nil
}

// source returns the cached .deb, downloading it through the private apt configuration when
// there is none or a refresh was asked for.
func (k kernel) source(ctx context.Context) (deb, version string, err error) {
	deb, version, err = k.cachedDeb()
	if err != nil || (deb != "" && !k.refresh) {
		return deb, version, err
	}
	if err := needTools("fetch the kernel source", "apt-get", "apt-cache", "dpkg"); err != nil {
		return "", "", err
	}
	m, err := findMirror("/etc/apt/sources.list.d")
	if err != nil {
		return "", "", unavailable("cannot fetch %s: %v", k.pkg, err)
	}
	apt := privateApt{dir: filepath.Join(k.dir, "apt"), log: k.log}
	k.log("vm: apt-get update (private configuration, %s %s)", m.URI, sourceSuite)
	if err := apt.update(ctx, m); err != nil {
		return "", "", unavailable("cannot fetch %s: %v", k.pkg, err)
	}
	want, err := apt.candidate(ctx, k.pkg)
	if err != nil {
		return "", "", unavailable("cannot fetch %s: %v", k.pkg, err)
	}
	if want == version {
		return deb, version, nil
	}
	debs := filepath.Join(k.dir, "debs")
	if err := os.MkdirAll(debs, 0o755); err != nil {
		return "", "", err
	}
	k.log("vm: downloading %s %s", k.pkg, want)
	got, err := apt.download(ctx, k.pkg, debs)
	if err != nil {
		return "", "", unavailable("cannot fetch %s: %v", k.pkg, err)
	}
	return got, debVersion(got), nil
}

// unpack extracts the kernel tarball shipped inside the .deb. A marker file records a complete
// unpack; the tree is kept so a fragment change rebuilds incrementally.
func (k kernel) unpack(ctx context.Context, deb, version string) (string, error) {
	root := filepath.Join(k.dir, "src", version)
	marker := filepath.Join(root, ".unpacked")
	if _, err := os.Stat(marker); err != nil {
		k.log("vm: unpacking %s", filepath.Base(deb))
		start := time.Now()
		if err := os.RemoveAll(root); err != nil {
			return "", err
		}
		if err := os.MkdirAll(root, 0o755); err != nil {
			return "", err
		}
		if _, err := run(ctx, nil, root, "sh", "-c", `dpkg-deb --fsys-tarfile "$1" | tar -x --wildcards '*/linux-source-*.tar.xz'`, "sh", deb); err != nil {
			return "", fmt.Errorf("unpack %s: %w", deb, err)
		}
		tarballs, _ := filepath.Glob(filepath.Join(root, "usr/src/linux-source-*.tar.xz"))
		if len(tarballs) != 1 {
			return "", fmt.Errorf("unpack %s: want one usr/src/linux-source-*.tar.xz, found %d", deb, len(tarballs))
		}
		if _, err := run(ctx, nil, root, "tar", "-xJf", tarballs[0]); err != nil {
			return "", fmt.Errorf("unpack %s: %w", tarballs[0], err)
		}
		if err := os.RemoveAll(filepath.Join(root, "usr")); err != nil {
			return "", err
		}
		if err := os.WriteFile(marker, nil, 0o644); err != nil {
			return "", err
		}
		k.log("vm: unpacked in %s", time.Since(start).Round(time.Second))
	}
	trees, _ := filepath.Glob(filepath.Join(root, "linux-source-*"))
	if len(trees) != 1 {
		return "", fmt.Errorf("kernel source in %s: want one linux-source-* directory, found %d (delete %s to unpack again)", root, len(trees), marker)
	}
	return trees[0], nil
}

func (k kernel) build(ctx context.Context, src, version, imgDir string) error {
	out := filepath.Join(k.dir, "build", version)
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	if err := os.MkdirAll(imgDir, 0o755); err != nil {
		return err
	}
	frag := filepath.Join(imgDir, "kernel.config")
	if err := os.WriteFile(frag, k.fragment, 0o644); err != nil {
		return err
	}
	o := "O=" + out
	start := time.Now()
	steps := [][]string{
		{"make", "-C", src, o, "tinyconfig"},
		{filepath.Join(src, "scripts/kconfig/merge_config.sh"), "-m", "-O", out, filepath.Join(out, ".config"), frag},
		{"make", "-C", src, o, "olddefconfig"},
	}
	for _, s := range steps {
		if _, err := run(ctx, nil, src, s[0], s[1:]...); err != nil {
			return fmt.Errorf("configure kernel: %w", err)
		}
	}
	config, err := os.ReadFile(filepath.Join(out, ".config"))
	if err != nil {
		return err
	}
	if err := verifyConfig(k.fragment, config); err != nil {
		os.RemoveAll(imgDir) // nothing was built for this fragment; leave no half entry
		return fmt.Errorf("kernel %s: %w", version, err)
	}
	k.log("vm: building bzImage for %s with -j%d (first build takes several minutes)", version, k.jobs)
	logPath := filepath.Join(imgDir, "build.log")
	logText, err := run(ctx, nil, src, "nice", "-n", "10", "make", "-C", src, o, fmt.Sprintf("-j%d", k.jobs), "bzImage")
	_ = os.WriteFile(logPath, []byte(logText), 0o644)
	if err != nil {
		return fmt.Errorf("build kernel (full log in %s): %w", logPath, err)
	}
	took := time.Since(start).Round(time.Second)
	k.log("vm: kernel built in %s", took)
	if err := os.WriteFile(filepath.Join(imgDir, "config"), config, 0o644); err != nil {
		return err
	}
	_ = os.WriteFile(filepath.Join(imgDir, "build-time"), []byte(took.String()+"\n"), 0o644)
	// bzImage appears last and atomically: its presence is what marks the cache entry complete.
	return copyFile(filepath.Join(out, "arch/x86/boot/bzImage"), filepath.Join(imgDir, "bzImage"))
}

// verifyConfig checks that every CONFIG_ line of the fragment survived olddefconfig, and names
// each one that did not: a dropped option would otherwise only show up as a confusing test
// failure inside the VM.
func verifyConfig(fragment, config []byte) error {
	have := parseConfig(config)
	var bad []string
	for sym, want := range orderedConfig(fragment) {
		got := have[sym]
		switch {
		case want == "n" && (got == "" || got == "n"):
		case want == got:
		case got == "":
			bad = append(bad, fmt.Sprintf("%s=%s (olddefconfig dropped it: missing dependency, or the option no longer exists)", sym, want))
		default:
			bad = append(bad, fmt.Sprintf("%s=%s (olddefconfig set it to %s)", sym, want, got))
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("tests/vm/kernel.config lines not honoured by the kernel config:\n  %s", strings.Join(bad, "\n  "))
	}
	return nil
}

// orderedConfig yields the fragment's symbols in file order, so errors read like the file.
func orderedConfig(b []byte) func(yield func(sym, val string) bool) {
	return func(yield func(sym, val string) bool) {
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			if sym, val, ok := configLine(sc.Text()); ok && !yield(sym, val) {
				return
			}
		}
	}
}

func parseConfig(b []byte) map[string]string {
	m := map[string]string{}
	for sym, val := range orderedConfig(b) {
		m[sym] = val
	}
	return m
}

// configLine parses "CONFIG_X=v" and "# CONFIG_X is not set" (as "n").
func configLine(line string) (sym, val string, ok bool) {
	line = strings.TrimSpace(line)
	if rest, found := strings.CutPrefix(line, "# "); found {
		if s, f := strings.CutSuffix(rest, " is not set"); f && strings.HasPrefix(s, "CONFIG_") {
			return s, "n", true
		}
		return "", "", false
	}
	if !strings.HasPrefix(line, "CONFIG_") {
		return "", "", false
	}
	return strings.Cut(line, "=")
}

// lockFile takes an exclusive flock, so concurrent runs wait for one build instead of racing.
func lockFile(ctx context.Context, path string, log func(string, ...any)) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, unavailable("kernel cache lock %s: %v", path, err)
	}
	waited := false
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		if !waited {
			log("vm: waiting for another run holding %s", path)
			waited = true
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("waiting for %s: %w", path, ctx.Err())
		case <-time.After(500 * time.Millisecond):
		}
	}
	return func() {
		syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		f.Close()
	}, nil
}

func needTools(purpose string, tools ...string) error {
	var missing []string
	for _, t := range tools {
		if _, err := exec.LookPath(t); err != nil {
			missing = append(missing, t)
		}
	}
	if len(missing) > 0 {
		return unavailable("cannot %s: %s not found in PATH (bash .ci/run installs what is missing)", purpose, strings.Join(missing, ", "))
	}
	return nil
}

// run executes a command and returns its combined output; on failure the error carries the
// command line and the tail of its output.
func run(ctx context.Context, log func(string, ...any), dir, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	// make's compiler children outlive a killed make; kill the whole process group on cancel.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	var buf bytes.Buffer
	cmd.Stdout = &buf
	cmd.Stderr = &buf
	if log != nil {
		log("vm: %s %s", name, strings.Join(args, " "))
	}
	if err := cmd.Run(); err != nil {
		return buf.String(), fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, tail(buf.String(), 30))
	}
	return buf.String(), nil
}

func tail(s string, lines int) string {
	all := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}

// copyFile writes dst atomically (temp file + rename) with src's permission bits.
func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(dst), ".tmp-"+filepath.Base(dst))
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := io.Copy(tmp, in); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(st.Mode().Perm()); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), dst)
}
