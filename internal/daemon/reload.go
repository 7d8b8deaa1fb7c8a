package daemon

import (
	"time"

	"github.com/pspd/pspd/policy"
)

// reloadResult is the outcome of the latest configuration load.
type reloadResult struct {
	at  time.Time
	err error // nil: applied
}

// Reload applies a new configuration or refuses it whole, with the
// reason (see reload), and keeps the outcome for /metrics and the API.
func (d *Daemon) Reload(next *policy.Config) error {
	err := d.reload(next)
	d.rmu.Lock()
	d.reloaded = reloadResult{at: time.Now(), err: err}
	d.rmu.Unlock()
	return err
}

func (d *Daemon) lastReload() reloadResult {
	d.rmu.Lock()
	defer d.rmu.Unlock()
	return d.reloaded
}
