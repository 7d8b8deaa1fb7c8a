package main

import (
	"bytes"
	"compress/gzip"
	"debug/elf"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
)

// cpioWriter writes a newc ("070701") archive, the format the kernel unpacks into its rootfs.
// Parent directories are added on demand, so callers only name the files they want.
type cpioWriter struct {
	w     io.Writer
	ino   uint32
	paths map[string]bool
	err   error
}

func newCpio(w io.Writer) *cpioWriter {
	return &cpioWriter{w: w, paths: map[string]bool{"": true, ".": true}}
}

const (
	modeDir     = 0o040000
	modeFile    = 0o100000
	modeSymlink = 0o120000
)

func (c *cpioWriter) entry(name string, mode uint32, data []byte) {
	if c.err != nil {
		return
	}
	c.ino++
	nlink := uint32(1)
	if mode&0o170000 == modeDir {
		nlink = 2
	}
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name)+1, 0)
	var b bytes.Buffer
	b.WriteString(hdr)
	b.WriteString(name)
	b.WriteByte(0)
	pad4(&b)
	b.Write(data)
	pad4(&b)
	_, c.err = c.w.Write(b.Bytes())
}

func pad4(b *bytes.Buffer) {
	for b.Len()%4 != 0 {
		b.WriteByte(0)
	}
}

// clean turns an absolute in-image path into the relative form cpio entries use.
func clean(p string) string {
	return strings.TrimPrefix(path.Clean("/"+p), "/")
}

func (c *cpioWriter) mkdirAll(dir string) {
	dir = clean(dir)
	if c.paths[dir] {
		return
	}
	c.mkdirAll(path.Dir(dir))
	c.paths[dir] = true
	c.entry(dir, modeDir|0o755, nil)
}

// exists reports whether name was already written.
func (c *cpioWriter) exists(name string) bool { return c.paths[clean(name)] }

func (c *cpioWriter) file(name string, perm uint32, data []byte) {
	name = clean(name)
	c.mkdirAll(path.Dir(name))
	c.paths[name] = true
	c.entry(name, modeFile|perm, data)
}

func (c *cpioWriter) symlink(name, target string) {
	name = clean(name)
	c.mkdirAll(path.Dir(name))
	c.paths[name] = true
	c.entry(name, modeSymlink|0o777, []byte(target))
}

func (c *cpioWriter) close() error {
	c.entry("TRAILER!!!", 0, nil)
	return c.err
}

// hostFile copies a host file into the image at dst, with the shared libraries and program
// interpreter it needs (resolved from ELF DT_NEEDED and PT_INTERP), so dynamically linked host
// tools such as iproute2's ip work inside the VM.
func (c *cpioWriter) hostFile(src, dst string) error {
	data, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	c.file(dst, 0o755, data)
	deps, err := elfDeps(src)
	if err != nil {
		return err
	}
	for _, d := range deps {
		if c.exists(d) {
			continue
		}
		b, err := os.ReadFile(d)
		if err != nil {
			return fmt.Errorf("%s needs %s: %w", src, d, err)
		}
		c.file(d, 0o755, b)
	}
	return nil
}

// libDirs are the loader's built-in search directories on Debian amd64; the image has no
// ld.so.cache, so libraries go where the loader looks without one.
var libDirs = []string{"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/lib", "/usr/lib"}

// elfDeps returns the host paths of the program interpreter and the transitive shared-library
// closure of an ELF file (empty when static). The image keeps each at its host path.
func elfDeps(file string) ([]string, error) {
	seen := map[string]bool{}
	var out []string
	queue := []string{file}
	for len(queue) > 0 {
		cur := queue[0]
		queue = queue[1:]
		f, err := elf.Open(cur)
		if err != nil {
			return nil, fmt.Errorf("read ELF %s: %w", cur, err)
		}
		if cur == file {
			if interp := interpreter(f); interp != "" {
				out = append(out, interp)
				seen[path.Base(interp)] = true
			}
		}
		libs, err := f.ImportedLibraries()
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("read DT_NEEDED of %s: %w", cur, err)
		}
		for _, lib := range libs {
			if seen[lib] {
				continue
			}
			seen[lib] = true
			found := ""
			for _, d := range libDirs {
				if _, err := os.Stat(filepath.Join(d, lib)); err == nil {
					found = filepath.Join(d, lib)
					break
				}
			}
			if found == "" {
				return nil, fmt.Errorf("%s needs %s, not found in %s", cur, lib, strings.Join(libDirs, ":"))
			}
			out = append(out, found)
			queue = append(queue, found)
		}
	}
	return out, nil
}

func interpreter(f *elf.File) string {
	for _, p := range f.Progs {
		if p.Type != elf.PT_INTERP {
			continue
		}
		b, err := io.ReadAll(p.Open())
		if err != nil {
			return ""
		}
		return strings.TrimRight(string(b), "\x00")
	}
	return ""
}

// isStatic reports whether an ELF file runs without a program interpreter.
func isStatic(file string) (bool, error) {
	f, err := elf.Open(file)
	if err != nil {
		return false, err
	}
	defer f.Close()
	return interpreter(f) == "", nil
}

// image describes what goes into the initramfs.
type image struct {
	busybox string            // host path of a static busybox
	applets []string          // in-image paths to link to busybox (from busybox --list-full)
	tools   map[string]string // env name -> host path of a tool, copied to the same path with its libraries
	progs   map[string]string // env name -> host path of a program, copied into programDir
	tests   []testBinary
	init    []byte
}

type testBinary struct {
	name string // unique, used for the in-image path and the result markers
	path string // host path
}

// write produces the gzip-compressed newc archive.
func (im image) write(w io.Writer) error {
	zw, err := gzip.NewWriterLevel(w, gzip.BestSpeed)
	if err != nil {
		return err
	}
	c := newCpio(zw)
	for _, d := range []string{"/proc", "/sys", "/dev", "/run", "/tmp", "/root", "/etc", "/tests"} {
		c.mkdirAll(d)
	}
	c.symlink("/var/run", "/run")
	for _, f := range []string{"/etc/protocols", "/etc/services"} {
		if b, err := os.ReadFile(f); err == nil {
			c.file(f, 0o644, b)
		}
	}
	c.file("/etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\n"))
	c.file("/etc/group", 0o644, []byte("root:x:0:\n"))
	names := make([]string, 0, len(im.tools))
	for n := range im.tools {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if err := c.hostFile(im.tools[n], im.tools[n]); err != nil {
			return fmt.Errorf("initramfs: %w", err)
		}
	}
	names = names[:0]
	for n := range im.progs {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if err := c.hostFile(im.progs[n], programPath(im.progs[n])); err != nil {
			return fmt.Errorf("initramfs: program: %w", err)
		}
	}
	for _, tb := range im.tests {
		if err := c.hostFile(tb.path, "/tests/"+tb.name); err != nil {
			return fmt.Errorf("initramfs: test binary: %w", err)
		}
	}
	// Busybox last: its applet links fill only the paths the real tools did not take.
	bb, err := os.ReadFile(im.busybox)
	if err != nil {
		return err
	}
	c.file("/bin/busybox", 0o755, bb)
	for _, a := range im.applets {
		if !c.exists(a) {
			c.symlink(a, "/bin/busybox")
		}
	}
	c.file("/init", 0o755, im.init)
	if err := c.close(); err != nil {
		return err
	}
	return zw.Close()
}
