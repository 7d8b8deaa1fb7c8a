package main

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// userHZ is the unit of /proc/stat's CPU times: the kernel reports them in
// USER_HZ, which is 100 on every architecture Linux exports it for.
const userHZ = 100

// busyFields are the columns of /proc/stat's "cpu" line counted as busy
// (0 is the label): user, nice, system, irq and softirq. Not idle or
// iowait; not steal, time the hypervisor gave to others; not guest and
// guest_nice, which user and nice already include. Nice counts so that a
// benchmark run under nice(1) still measures itself.
var busyFields = []int{1, 2, 3, 6, 7}

// parseCPUBusy reads the aggregate "cpu" line of /proc/stat (all CPUs) and
// returns its busy time.
func parseCPUBusy(stat []byte) (time.Duration, error) {
	line, _, _ := bytes.Cut(stat, []byte("\n"))
	f := strings.Fields(string(line))
	if len(f) < 8 || f[0] != "cpu" {
		return 0, fmt.Errorf("/proc/stat: first line %q is not the all-CPU total", line)
	}
	var ticks uint64
	for _, i := range busyFields {
		v, err := strconv.ParseUint(f[i], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/stat: column %d of %q: %w", i, line, err)
		}
		ticks += v
	}
	return time.Duration(ticks) * time.Second / userHZ, nil
}

// cpuBusy is the machine's busy CPU time since boot, over all CPUs.
func cpuBusy() (time.Duration, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	return parseCPUBusy(b)
}

// cpuPerGbit is busy CPU time over the data carried in it: CPU-seconds
// per Gbit, which is the same number as CPUs kept busy per Gbit/s. Zero
// when either is missing.
func cpuPerGbit(busy time.Duration, bytes float64) float64 {
	if busy <= 0 || bytes <= 0 {
		return 0
	}
	return busy.Seconds() / (bytes * 8 / 1e9)
}
