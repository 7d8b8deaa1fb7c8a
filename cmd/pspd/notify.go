package main

import (
	"fmt"
	"net"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// notifier tells systemd about pspd's state (sd_notify(3)): READY=1 once
// the API and control sockets are up, RELOADING=1 and READY=1 around a
// reload, STOPPING=1 on the way out, and a STATUS= line for systemctl
// status. It speaks the protocol itself (one datagram per message to
// $NOTIFY_SOCKET): it is ten lines, and go-systemd is not a dependency.
// Without NOTIFY_SOCKET (not started by systemd as Type=notify) it does
// nothing.
type notifier struct {
	addr *net.UnixAddr
}

func newNotifier() notifier {
	name := os.Getenv("NOTIFY_SOCKET")
	if name == "" {
		return notifier{}
	}
	if name[0] == '@' { // an abstract socket
		name = "\x00" + name[1:]
	}
	return notifier{addr: &net.UnixAddr{Name: name, Net: "unixgram"}}
}

// notify sends the variables, one "KEY=value" each.
func (n notifier) notify(vars ...string) error {
	if n.addr == nil {
		return nil
	}
	c, err := net.DialUnix("unixgram", nil, n.addr)
	if err != nil {
		return fmt.Errorf("sd_notify %s: %w", n.addr.Name, err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(strings.Join(vars, "\n"))); err != nil {
		return fmt.Errorf("sd_notify %s: %w", n.addr.Name, err)
	}
	return nil
}

// reloading is RELOADING=1 with the timestamp systemd (253 and later)
// wants beside it.
func (n notifier) reloading() error {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	return n.notify("RELOADING=1", fmt.Sprintf("MONOTONIC_USEC=%d", ts.Nano()/1000), "STATUS=reloading the configuration")
}
