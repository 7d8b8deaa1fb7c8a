package main

import (
	"fmt"
	"strconv"
	"strings"
)

// Outcomes of one in-VM test, as `go test -v` prints them.
const (
	pass = "PASS"
	fail = "FAIL"
	skip = "SKIP"
)

// testResult is one test or subtest seen in a binary's -test.v output.
type testResult struct {
	name     string // last element of the full name
	full     string
	outcome  string // pass, fail, skip, or "" if the binary never reported one
	output   []string
	children []*testResult
}

// binaryResult is everything one test binary printed between its START and EXIT markers.
type binaryResult struct {
	name   string
	exit   int // -1 without an EXIT marker
	output []string
	tests  []*testResult

	byName  map[string]*testResult
	current *testResult
	closed  bool // current has printed its --- line; only indented lines still belong to it
}

// runResult is the parsed ttyS1 stream of one boot.
type runResult struct {
	booted   bool
	done     bool
	binaries []*binaryResult
}

func parseRun(text string) *runResult {
	r := &runResult{}
	var cur *binaryResult
	for _, line := range strings.Split(strings.ReplaceAll(text, "\r", ""), "\n") {
		// A test that ends without a newline leaves the marker mid-line.
		if i := strings.Index(line, marker); i > 0 {
			if cur != nil {
				cur.line(line[:i])
			}
			line = line[i:]
		}
		rest, isMarker := strings.CutPrefix(line, marker)
		if !isMarker {
			if cur != nil {
				cur.line(line)
			}
			continue
		}
		f := strings.Fields(rest)
		switch {
		case len(f) == 1 && f[0] == "BOOTED":
			r.booted = true
		case len(f) == 1 && f[0] == "DONE":
			r.done = true
			cur = nil
		case len(f) == 2 && f[0] == "START":
			cur = &binaryResult{name: f[1], exit: -1, byName: map[string]*testResult{}}
			r.binaries = append(r.binaries, cur)
		case len(f) == 3 && f[0] == "EXIT" && cur != nil && f[1] == cur.name:
			if rc, err := strconv.Atoi(f[2]); err == nil {
				cur.exit = rc
			}
			cur = nil
		}
	}
	return r
}

func (b *binaryResult) line(line string) {
	b.output = append(b.output, line)
	trimmed := strings.TrimLeft(line, " ")
	for _, verb := range []string{"=== RUN", "=== PAUSE", "=== CONT", "=== NAME"} {
		if name, ok := strings.CutPrefix(trimmed, verb+" "); ok {
			b.current, b.closed = b.test(strings.TrimSpace(name)), false
			return
		}
	}
	for _, outcome := range []string{pass, fail, skip} {
		if rest, ok := strings.CutPrefix(trimmed, "--- "+outcome+": "); ok {
			name, _, _ := strings.Cut(rest, " (")
			t := b.test(name)
			t.outcome = outcome
			b.current, b.closed = t, true
			return
		}
	}
	if b.current == nil || (b.closed && !strings.HasPrefix(line, " ")) {
		return
	}
	b.current.output = append(b.current.output, line)
}

// test finds or creates the node for a full test name, creating parents as needed.
func (b *binaryResult) test(full string) *testResult {
	if t, ok := b.byName[full]; ok {
		return t
	}
	t := &testResult{full: full, name: full}
	if i := strings.LastIndex(full, "/"); i > 0 {
		parent := b.test(full[:i])
		t.name = full[i+1:]
		parent.children = append(parent.children, t)
	} else {
		b.tests = append(b.tests, t)
	}
	b.byName[full] = t
	return t
}

// counts returns how many tests (subtests included) ended in each outcome.
func (b *binaryResult) counts() map[string]int {
	c := map[string]int{}
	var walk func([]*testResult)
	walk = func(ts []*testResult) {
		for _, t := range ts {
			c[t.outcome]++
			walk(t.children)
		}
	}
	walk(b.tests)
	return c
}

// problems lists what is wrong with the binary's run beyond individual test failures: a crash,
// a hang, or nothing run at all. Each of these must fail the run, never pass it.
func (b *binaryResult) problems() []string {
	var p []string
	c := b.counts()
	switch {
	case b.exit == -1:
		p = append(p, "no exit marker: the binary hung or the VM died while it ran; last output:\n"+tail(strings.Join(b.output, "\n"), 30))
	case b.exit != 0 && c[fail] == 0:
		p = append(p, fmt.Sprintf("exited %d without a failing test (panic, crash or bad flag); last output:\n%s", b.exit, tail(strings.Join(b.output, "\n"), 30)))
	case b.exit == 0 && c[fail] > 0:
		p = append(p, fmt.Sprintf("exited 0 but reported %d failing tests", c[fail]))
	}
	if len(b.tests) == 0 && b.exit != -1 {
		p = append(p, "ran no tests (check the -run filter and that the package has tests)")
	}
	if c[""] > 0 && b.exit != -1 {
		p = append(p, fmt.Sprintf("%d tests started but never reported an outcome", c[""]))
	}
	return p
}
