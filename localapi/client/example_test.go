package client_test

import (
	"context"
	"log"
	"net"
	"time"

	"github.com/pspd/pspd/localapi/client"
)

// An application upgrades a fresh connection to PSP before using it; the
// server at the other end does the same with its accepted connection and
// peer name "web-1".
func ExampleUpgrade() {
	c, err := net.Dial("tcp", "192.0.2.2:443")
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := client.Upgrade(ctx, c.(*net.TCPConn), "web-2")
	if err != nil {
		log.Fatal(err) // the connection may expect PSP already: do not use it
	}
	log.Printf("PSP %s on device %d", r.Version, r.Device)
}
