package daemon

import (
	"context"
	"fmt"
	"time"

	"github.com/pspd/pspd/localapi"
	"github.com/pspd/pspd/policy"
)

// reloadResult is the outcome of the latest configuration load.
type reloadResult struct {
	at  time.Time
	err error // nil: applied
}

// Reload applies a new configuration file or refuses it whole, with the
// reason (see reload), and keeps the outcome for /metrics and the API.
// The fleet's members join the file's peers.
func (d *Daemon) Reload(next *policy.Config) error {
	d.fmu.Lock()
	var err error
	if d.fleet != nil {
		err = d.applyMembers(next)
	} else {
		err = d.reload(next, nil)
	}
	if err == nil {
		d.mu.Lock()
		d.file = next
		d.mu.Unlock()
	}
	d.fmu.Unlock()
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

// ReloadConfig reads the configuration file the daemon runs with again
// and reloads it: the API's reload, and cmd/pspd's on SIGHUP. The
// ReloadObserver hears of both.
func (d *Daemon) ReloadConfig(context.Context) (localapi.Reloaded, error) {
	d.lmu.Lock()
	defer d.lmu.Unlock()
	if d.reloads != nil {
		d.reloads.Reloading()
	}
	d.mu.Lock()
	file := d.cfg.File
	d.mu.Unlock()
	next, err := policy.Load(file)
	if err != nil {
		err = fmt.Errorf("reload refused, nothing applied: %w", err)
		d.rmu.Lock()
		d.reloaded = reloadResult{at: time.Now(), err: err}
		d.rmu.Unlock()
	} else {
		err = d.Reload(next)
	}
	if d.reloads != nil {
		d.reloads.Reloaded(err)
	}
	if err != nil {
		return localapi.Reloaded{}, localapi.Refused(err)
	}
	return localapi.Reloaded{File: file, Time: d.lastReload().at}, nil
}
