package contrib

import (
	"encoding/json"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"go.yaml.in/yaml/v3"
)

// exported is every metric name pspd's /metrics can carry: its own (the
// descriptors in internal/daemon/metrics.go) and the Go and process
// collectors' (gathered from the same collectors the daemon registers).
func exported(t *testing.T) map[string]bool {
	t.Helper()
	src, err := os.ReadFile("../internal/daemon/metrics.go")
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{"up": true} // Prometheus's own, per target
	for _, m := range regexp.MustCompile(`NewDesc\("(pspd_[a-z0-9_]+)"`).FindAllStringSubmatch(string(src), -1) {
		names[m[1]] = true
	}
	if len(names) < 5 {
		t.Fatalf("found only %v in metrics.go; has the way metrics are declared changed?", names)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		names[mf.GetName()] = true
	}
	return names
}

var metricRef = regexp.MustCompile(`\b(?:pspd|process|go)_[a-z0-9_]+\b|\bup\{`)

// checkExpr fails the test for a metric expr names that pspd does not export.
func checkExpr(t *testing.T, where, expr string, names map[string]bool) {
	t.Helper()
	refs := metricRef.FindAllString(expr, -1)
	if len(refs) == 0 {
		t.Errorf("%s: %q queries no pspd metric", where, expr)
	}
	for _, r := range refs {
		if r = strings.TrimSuffix(r, "{"); !names[r] {
			t.Errorf("%s: %q queries %s, which pspd does not export", where, expr, r)
		}
	}
}

type panel struct {
	ID         int    `json:"id"`
	Type       string `json:"type"`
	Title      string `json:"title"`
	Datasource *struct {
		UID string `json:"uid"`
	} `json:"datasource"`
	GridPos struct{ X, Y, W, H int } `json:"gridPos"`
	Targets []struct {
		RefID string `json:"refId"`
		Expr  string `json:"expr"`
	} `json:"targets"`
}

// TestDashboard: the Grafana dashboard parses, its panels fit the 24-column
// grid with unique ids, every panel queries through the datasource
// variable, and every query names metrics pspd exports.
func TestDashboard(t *testing.T) {
	b, err := os.ReadFile("pspd-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		UID           string  `json:"uid"`
		Title         string  `json:"title"`
		SchemaVersion int     `json:"schemaVersion"`
		Panels        []panel `json:"panels"`
		Templating    struct {
			List []struct {
				Name, Type string
			} `json:"list"`
		} `json:"templating"`
	}
	dec := json.NewDecoder(strings.NewReader(string(b)))
	if err := dec.Decode(&d); err != nil {
		t.Fatalf("pspd-dashboard.json: %v", err)
	}
	if d.UID == "" || d.Title == "" || d.SchemaVersion == 0 {
		t.Errorf("uid %q, title %q, schemaVersion %d: all are required", d.UID, d.Title, d.SchemaVersion)
	}
	vars := map[string]string{}
	for _, v := range d.Templating.List {
		vars[v.Name] = v.Type
	}
	if vars["datasource"] != "datasource" || vars["instance"] != "query" {
		t.Errorf("templating %v: want a datasource variable and an instance query", vars)
	}
	names := exported(t)
	ids := map[int]bool{}
	queries := 0
	for _, p := range d.Panels {
		where := "panel " + p.Title
		if ids[p.ID] {
			t.Errorf("%s: id %d used twice", where, p.ID)
		}
		ids[p.ID] = true
		if g := p.GridPos; g.W < 1 || g.X < 0 || g.X+g.W > 24 || g.H < 1 {
			t.Errorf("%s: gridPos %+v outside the 24-column grid", where, g)
		}
		if p.Type == "row" {
			continue
		}
		if p.Datasource == nil || p.Datasource.UID != "${datasource}" {
			t.Errorf("%s: datasource %+v, want uid ${datasource}", where, p.Datasource)
		}
		if len(p.Targets) == 0 {
			t.Errorf("%s: no query", where)
		}
		for _, tg := range p.Targets {
			checkExpr(t, where, tg.Expr, names)
			if !strings.Contains(tg.Expr, `instance=~"$instance"`) {
				t.Errorf("%s: %q ignores the instance variable", where, tg.Expr)
			}
			queries++
		}
	}
	if queries < 10 {
		t.Errorf("%d queries; the dashboard lost its panels", queries)
	}
}

// TestAlertRules: every rule has a severity and a summary and queries
// metrics pspd exports; promtool then checks the PromQL and runs the rule
// unit tests in pspd-alerts_test.yml. promtool comes with Debian's
// prometheus package (tests/deps.sh installs it); without it the test
// skips, except in CI.
func TestAlertRules(t *testing.T) {
	b, err := os.ReadFile("pspd-alerts.yml")
	if err != nil {
		t.Fatal(err)
	}
	var f struct {
		Groups []struct {
			Name  string
			Rules []struct {
				Alert       string
				Expr        string
				Labels      map[string]string
				Annotations map[string]string
			}
		}
	}
	if err := yaml.Unmarshal(b, &f); err != nil {
		t.Fatalf("pspd-alerts.yml: %v", err)
	}
	names := exported(t)
	n := 0
	for _, g := range f.Groups {
		for _, r := range g.Rules {
			n++
			if r.Alert == "" || r.Labels["severity"] == "" || r.Annotations["summary"] == "" {
				t.Errorf("rule %q: needs alert, labels.severity and annotations.summary", r.Alert)
			}
			checkExpr(t, "alert "+r.Alert, r.Expr, names)
		}
	}
	if n < 5 {
		t.Errorf("%d rules", n)
	}

	promtool, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("promtool missing in CI: tests/deps.sh installs Debian's prometheus package")
		}
		t.Skip("promtool not installed (apt-get install prometheus, or tests/deps.sh)")
	}
	for _, args := range [][]string{{"check", "rules", "pspd-alerts.yml"}, {"test", "rules", "pspd-alerts_test.yml"}} {
		if out, err := exec.Command(promtool, args...).CombinedOutput(); err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}
