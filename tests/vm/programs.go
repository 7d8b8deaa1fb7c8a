package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
)

// programs are the commands of the module under test that go into the image, so system tests
// can run real daemons in the VM, which has no Go toolchain to build them. Each is exported
// to the test binaries as env=/usr/local/bin/<name>.
var programs = map[string]string{
	"PSPD_BIN":   "./cmd/pspd",
	"PSPCTL_BIN": "./cmd/pspctl",
}

// libraries are C shared libraries of the module that go into programDir too, each built
// by the Makefile target of its name into the file; env=/usr/local/bin/<file>. A host
// without a C compiler ships none, and the tests that need one skip.
var libraries = map[string][2]string{
	"PSPD_PRELOAD_LIB": {"preload", "libpspd-preload.so"},
}

// programDir is where the programs sit in the image.
const programDir = "/usr/local/bin"

// programPath is where the program built at host path p sits in the image.
func programPath(p string) string { return path.Join(programDir, filepath.Base(p)) }

// buildPrograms compiles every entry of programs from the module at root into dir, static
// (CGO_ENABLED=0) and without symbol tables to keep the initramfs, which lives in guest RAM,
// small. It returns env → host path.
func buildPrograms(ctx context.Context, root, dir string) (map[string]string, error) {
	built := map[string]string{}
	for env, pkg := range programs {
		out := filepath.Join(dir, filepath.Base(pkg))
		cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", out, pkg)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("build %s for the VM: %v\n%s", pkg, err, b)
		}
		built[env] = out
	}
	for env, lib := range libraries {
		out := filepath.Join(dir, lib[1])
		cmd := exec.CommandContext(ctx, "make", "-s", lib[0], "PRELOAD="+out)
		cmd.Dir = root
		if b, err := cmd.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "vm: %s not shipped (make %s: %v): %s", lib[1], lib[0], err, b)
			continue
		}
		built[env] = out
	}
	return built, nil
}

func moduleRoot(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("not inside the pspd module (go env GOMOD is empty)")
	}
	return filepath.Dir(mod), nil
}
