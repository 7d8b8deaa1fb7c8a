package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/pspd/pspd/internal/identitycmd"
	"github.com/pspd/pspd/internal/mancmd"
	"github.com/pspd/pspd/localapi"
	"github.com/pspd/pspd/localapi/client"
)

type cli struct {
	out    io.Writer
	now    func() time.Time
	socket string
	json   bool
}

func (c *cli) client() *client.Client { return client.New(c.socket) }

func newRoot(out io.Writer, now func() time.Time) *cobra.Command {
	c := &cli{out: out, now: now}
	root := &cobra.Command{
		Use:           "pspctl",
		Short:         "Inspect and control a running pspd",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(out)
	root.PersistentFlags().StringVar(&c.socket, "socket", localapi.DefaultSocket, "pspd's local API socket")
	root.PersistentFlags().BoolVar(&c.json, "json", false, "print JSON instead of a table")

	root.AddCommand(&cobra.Command{
		Use:   "status",
		Short: "Show the daemon's status",
		Args:  cobra.NoArgs,
		RunE:  c.status,
	})

	root.AddCommand(&cobra.Command{
		Use:   "reload",
		Short: "Make pspd read its configuration file again; fails with pspd's reason if it refuses",
		Args:  cobra.NoArgs,
		RunE:  c.reload,
	})

	peer := &cobra.Command{Use: "peer", Short: "Configured peers"}
	peer.AddCommand(&cobra.Command{Use: "list", Short: "List peers, their session state, for how long and why", Args: cobra.NoArgs, RunE: c.peerList})
	peer.AddCommand(&cobra.Command{Use: "show NAME", Short: "Show everything pspd knows of one peer", Args: cobra.ExactArgs(1), RunE: c.peerShow,
		ValidArgsFunction: c.completePeers})
	root.AddCommand(peer)

	var pingTo string
	var pingCount int
	pingCmd := &cobra.Command{
		Use:   "ping PEER",
		Short: "Time ICMP echo round trips through the peer's association (xfrm, userspace)",
		Long: "Time ICMP echo round trips through the peer's association (xfrm, userspace).\n\n" +
			"pspd sends the requests from this host to an address in the peer's prefixes (--to, or the peer's one\n" +
			"single-address prefix), and reads the association's packet counters before and after, which shows\n" +
			"whether the round trips went through it. The host at that address must answer ICMP echo.",
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: c.completePeers,
		RunE: func(cmd *cobra.Command, args []string) error {
			return c.ping(cmd, args[0], localapi.PingRequest{To: pingTo, Count: pingCount})
		},
	}
	pingCmd.Flags().StringVar(&pingTo, "to", "", "the address to ping, inside the peer's prefixes")
	pingCmd.Flags().IntVarP(&pingCount, "count", "c", 3, fmt.Sprintf("requests to send (at most %d)", localapi.MaxPingCount))
	root.AddCommand(pingCmd)

	root.AddCommand(&cobra.Command{
		Use:   "events",
		Short: "Follow pspd's events (associations, rekeys, peers, PSP devices) until interrupted",
		Args:  cobra.NoArgs,
		RunE:  c.events,
	})

	assoc := &cobra.Command{Use: "assoc", Short: "Associations (SA pairs)"}
	assoc.AddCommand(&cobra.Command{Use: "list", Short: "List associations; keys are never shown", Args: cobra.NoArgs, RunE: c.assocList})
	var rotPeer string
	var rotAll bool
	rotate := &cobra.Command{
		Use:   "rotate [ID | --peer NAME | --all]",
		Short: "Rekey associations make-before-break and report the new SPIs",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := localapi.RotateRequest{Peer: rotPeer, All: rotAll}
			if len(args) == 1 {
				req.ID = args[0]
			}
			if err := req.Validate(); err != nil {
				return fmt.Errorf("assoc rotate: give an association ID, --peer NAME or --all")
			}
			return c.assocRotate(cmd, req)
		},
	}
	rotate.ValidArgsFunction = c.completeAssocs
	rotate.Flags().StringVar(&rotPeer, "peer", "", "rekey every association with this peer")
	rotate.RegisterFlagCompletionFunc("peer", c.completePeers)
	rotate.Flags().BoolVar(&rotAll, "all", false, "rekey every association")
	assoc.AddCommand(rotate)
	root.AddCommand(assoc)

	dev := &cobra.Command{Use: "dev", Short: "Kernel PSP devices"}
	dev.AddCommand(&cobra.Command{Use: "list", Short: "List PSP devices", Args: cobra.NoArgs, RunE: c.devList})
	dev.AddCommand(&cobra.Command{Use: "rotate ID", Short: "Rotate a PSP device key now", Args: cobra.ExactArgs(1), RunE: c.devRotate})
	for _, verb := range []string{"assoc", "disassoc"} {
		var req localapi.AssocRequest
		short := "Let a netdev of another network namespace (a container's netkit or veth end) use a PSP device"
		if verb == "disassoc" {
			short = "Take back what dev assoc gave: new connections through the netdev get no PSP"
		}
		cmd := &cobra.Command{
			Use:   verb + " ID (--netns PATH | --pid PID) (--dev IFNAME | --ifindex N)",
			Short: short,
			Long: short + ".\n\n" +
				"The namespace is a name of ip netns (/run/netns/NAME), a file such as /proc/PID/ns/net, or a process whose namespace it is\n" +
				"(--pid, e.g. a container's init). Sockets of that namespace routed through the netdev can then be\n" +
				"upgraded with the device by a pspd running there. Needs Linux 7.3 (dev-assoc).",
			Args: cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error { return c.devAssoc(cmd, verb, args[0], req) },
		}
		cmd.Flags().StringVar(&req.NetNS, "netns", "", "the namespace: a file such as /proc/PID/ns/net, or a NAME of ip netns (/run/netns/NAME)")
		cmd.Flags().IntVar(&req.PID, "pid", 0, "a process in the namespace instead of --netns")
		cmd.Flags().StringVar(&req.Ifname, "dev", "", "the netdev's name in that namespace")
		cmd.Flags().Uint32Var(&req.Ifindex, "ifindex", 0, "the netdev's index in that namespace instead of --dev")
		dev.AddCommand(cmd)
	}
	root.AddCommand(dev)
	ident := &cobra.Command{
		Use:   "identity",
		Short: "Show this host's identity and its rotation",
		Long: "Show this host's identity and its rotation.\n\n" +
			"A rotation has three steps: rotate stages a new identity and publishes it to the fleet (pin it on static\n" +
			"peers as next_public_key); switch presents it and moves every session to it, make-before-break, showing\n" +
			"peers that refuse it the previous identity meanwhile; pspd drops the previous identity once every\n" +
			"session moved. drop ends the rotation at once: the staged identity before the switch, the previous after.",
		Args: cobra.NoArgs,
		RunE: c.identityShow,
	}
	for _, step := range []struct {
		step  localapi.IdentityStep
		short string
	}{
		{localapi.StepRotate, "Stage a new identity beside the current one and publish both"},
		{localapi.StepSwitch, "Present the staged identity and move every session to it"},
		{localapi.StepDrop, "End the rotation now: drop the previous identity (or, before the switch, the staged one)"},
	} {
		ident.AddCommand(&cobra.Command{Use: string(step.step), Short: step.short, Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, _ []string) error { return c.identityStep(cmd, step.step) }})
	}
	root.AddCommand(ident)
	root.AddCommand(identitycmd.Genkey(), identitycmd.Pubkey())
	root.AddCommand(mancmd.Command("1")) // hidden: make install writes the pages
	return root
}

// completePeers completes a peer name from the running daemon.
func (c *cli) completePeers(cmd *cobra.Command, args []string, _ string) ([]string, cobra.ShellCompDirective) {
	if len(args) > 0 {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	ps, err := c.client().Peers(cmd.Context())
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp | cobra.ShellCompDirectiveError
	}
	var names []string
	for _, p := range ps {
		names = append(names, p.Name+"\t"+p.State)
	}
	sort.Strings(names)
	return names, cobra.ShellCompDirectiveNoFileComp
}

// completeAssocs completes an association id from the running daemon.
func (c *cli) completeAssocs(cmd *cobra.Command, args []string, _ string) ([]string, cobra.ShellCompDirective) {
	if len(args) > 0 {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	as, err := c.client().Assocs(cmd.Context())
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp | cobra.ShellCompDirectiveError
	}
	var ids []string
	for _, a := range as {
		ids = append(ids, fmt.Sprintf("%s\tpeer %s, generation %d", a.ID, a.Peer, a.Generation))
	}
	sort.Strings(ids)
	return ids, cobra.ShellCompDirectiveNoFileComp
}

// explain turns transport and permission failures into what to do next.
func explain(err error) error {
	if client.IsAccessDenied(err) {
		return fmt.Errorf("%w (try sudo)", err)
	}
	return err
}

func (c *cli) emitJSON(v any) error {
	enc := json.NewEncoder(c.out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func (c *cli) table(header string, rows [][]string) error {
	tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, header)
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	return tw.Flush()
}

func (c *cli) status(cmd *cobra.Command, _ []string) error {
	st, err := c.client().Status(cmd.Context())
	if err != nil {
		return explain(err)
	}
	if c.json {
		return c.emitJSON(st)
	}
	fips := "off"
	if st.FIPS {
		fips = "on"
	}
	rows := [][]string{
		{"version", st.Version},
		{"public key", st.PublicKey},
		{"fingerprint", st.Fingerprint},
		{"listen", st.Listen},
		{"backends", strings.Join(st.Backends, ", ")},
		{"fips 140-3", fips},
		{"up since", fmt.Sprintf("%s (%s)", st.Started.UTC().Format(time.RFC3339), age(c.now(), st.Started))},
		{"peers", fmt.Sprintf("%d configured, %d up", st.Peers, st.PeersUp)},
		{"associations", strconv.Itoa(st.Assocs)},
	}
	if st.UserspaceIO != "" {
		rows = append(rows, []string{"userspace io", fmt.Sprintf("%s (%s)", st.UserspaceIO, st.UserspaceIOReason)})
	}
	if f := st.Fleet; f != nil {
		state := "connected"
		if !f.Connected {
			state = "unreachable"
			if f.Since.IsZero() {
				state = "not reached yet"
			}
		}
		if !f.Since.IsZero() {
			state += fmt.Sprintf(" since %s (%s)", f.Since.UTC().Format(time.RFC3339), age(c.now(), f.Since))
		}
		if f.Error != "" {
			state += ": " + f.Error
		}
		members := fmt.Sprintf("%d members", f.Members)
		if f.Members == 1 {
			members = "1 member"
		}
		rows = append(rows, []string{"fleet", fmt.Sprintf("node %s on %s, %s; %s in force", f.Node, f.Service, state, members)})
		for _, why := range f.LeftOut {
			rows = append(rows, []string{"left out", why})
		}
	}
	if st.Rotation != "" {
		rows = append(rows, []string{"identity rotation", string(st.Rotation) + " (pspctl identity)"})
	}
	if !st.LastReload.IsZero() {
		res := "applied"
		if st.LastReloadError != "" {
			res = "refused: " + st.LastReloadError
		}
		rows = append(rows, []string{"configuration", fmt.Sprintf("loaded %s (%s ago), %s", st.LastReload.UTC().Format(time.RFC3339), age(c.now(), st.LastReload), res)})
	}
	tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	for _, r := range rows {
		fmt.Fprintf(tw, "%s:\t%s\n", r[0], r[1])
	}
	return tw.Flush()
}

func (c *cli) identityShow(cmd *cobra.Command, _ []string) error {
	v, err := c.client().Identity(cmd.Context())
	if err != nil {
		return explain(err)
	}
	return c.printIdentity(v)
}

func (c *cli) identityStep(cmd *cobra.Command, step localapi.IdentityStep) error {
	v, err := c.client().ChangeIdentity(cmd.Context(), step)
	if err != nil {
		return explain(err)
	}
	return c.printIdentity(v)
}

func (c *cli) printIdentity(v localapi.Identity) error {
	if c.json {
		return c.emitJSON(v)
	}
	rows := [][]string{{"public key", v.PublicKey}, {"fingerprint", v.Fingerprint}}
	switch v.Phase {
	case localapi.RotationNone:
		rows = append(rows, []string{"rotation", "none"})
	case localapi.RotationStaged:
		rows = append(rows, []string{"rotation", "staged: pin the next key on every peer (next_public_key; a fleet publishes it), then pspctl identity switch"},
			[]string{"next key", v.Next})
	case localapi.RotationSwitched:
		state := "every session moved; the previous key goes at the next check"
		if len(v.NotMoved) > 0 {
			state = "waiting for " + strings.Join(v.NotMoved, ", ") + " (pspctl identity drop ends it now)"
		}
		rows = append(rows, []string{"rotation", "switched: " + state}, []string{"previous key", v.Previous})
	}
	tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	for _, r := range rows {
		fmt.Fprintf(tw, "%s:\t%s\n", r[0], r[1])
	}
	return tw.Flush()
}

func (c *cli) reload(cmd *cobra.Command, _ []string) error {
	r, err := c.client().Reload(cmd.Context())
	if err != nil {
		return explain(err)
	}
	if c.json {
		return c.emitJSON(r)
	}
	_, err = fmt.Fprintf(c.out, "%s reloaded\n", r.File)
	return err
}

func (c *cli) peerList(cmd *cobra.Command, _ []string) error {
	ps, err := c.client().Peers(cmd.Context())
	if err != nil {
		return explain(err)
	}
	if c.json {
		return c.emitJSON(ps)
	}
	sort.Slice(ps, func(i, j int) bool { return ps[i].Name < ps[j].Name })
	var rows [][]string
	for _, p := range ps {
		// An error from before the session now up is history: peer show
		// has it, the list does not.
		// FOR is how long the peer has been up, or not up: a peer that
		// cannot connect alternates between connecting and backoff.
		since := p.Since
		if p.State != "up" && !p.DownSince.IsZero() {
			since = p.DownSince
		}
		rows = append(rows, []string{p.Name, p.Endpoint, p.State, c.since(since), dash(p.Backend), dash(p.KeyExchange),
			c.ago(p.LastHandshake), humanBytes(p.BytesIn), humanBytes(p.BytesOut), dash(p.Cause)})
	}
	return c.table("PEER\tENDPOINT\tSTATE\tFOR\tBACKEND\tKEY EXCHANGE\tHANDSHAKE\tIN\tOUT\tCAUSE", rows)
}

func (c *cli) peerShow(cmd *cobra.Command, args []string) error {
	p, err := c.client().Peer(cmd.Context(), args[0])
	if err != nil {
		return explain(err)
	}
	if c.json {
		return c.emitJSON(p)
	}
	state := p.State
	if !p.Since.IsZero() {
		state += " for " + age(c.now(), p.Since)
	}
	rows := [][]string{
		{"peer", p.Name},
		{"endpoint", endpoint(p)},
		{"observed at", dash(p.Observed)},
		{"prefixes", dash(strings.Join(p.Prefixes, ", "))},
		{"fingerprint", p.Fingerprint},
	}
	if p.NextFingerprint != "" {
		rows = append(rows, []string{"next key", p.NextFingerprint + " (the peer's identity rotation)"})
	}
	if p.SessionFingerprint != "" && (p.NextFingerprint != "" || p.SessionFingerprint != p.Fingerprint) {
		rows = append(rows, []string{"session key", p.SessionFingerprint})
	}
	rows = append(rows, []string{"state", state})
	if n := p.NAT; n != nil {
		var sides []string
		if n.Behind {
			sides = append(sides, "this host behind a NAT (the peer sees it at "+dash(n.LocalObserved)+")")
		}
		if n.PeerBehind {
			sides = append(sides, "the peer behind a NAT")
		}
		rows = append(rows, []string{"nat", strings.Join(sides, "; ")})
	}
	if p.State != "up" && !p.DownSince.IsZero() {
		rows = append(rows, []string{"down for", age(c.now(), p.DownSince)})
	}
	if p.Cause != "" {
		rows = append(rows, []string{"cause", p.Cause})
	}
	if p.LastError != "" && (p.LastErrorOld || p.LastError != p.Cause) {
		e := p.LastError
		switch {
		case !p.LastErrorAt.IsZero() && p.LastErrorOld:
			e += fmt.Sprintf(" (%s ago, before the current session)", age(c.now(), p.LastErrorAt))
		case p.LastErrorOld:
			e += " (before the current session)"
		case !p.LastErrorAt.IsZero():
			e += fmt.Sprintf(" (%s ago)", age(c.now(), p.LastErrorAt))
		}
		rows = append(rows, []string{"last error", e})
	}
	rows = append(rows,
		[]string{"backend", dash(p.Backend)},
		[]string{"key exchange", dash(p.KeyExchange)},
	)
	if p.PSP != nil {
		v := strings.Join(p.PSP.Versions, ", ")
		if v == "" {
			v = "none enabled"
		}
		rows = append(rows, []string{"peer's psp", v + " (its devices, at the session's start)"})
	}
	rows = append(rows,
		[]string{"peer boot id", dash(p.PeerBootID)},
		[]string{"last up", c.at(p.LastUp)},
		[]string{"last handshake", c.at(p.LastHandshake)},
		[]string{"association", dash(p.Assoc)},
		[]string{"rekeys", strconv.FormatUint(p.Rekeys, 10)},
		[]string{"transfer", fmt.Sprintf("received %s in %d packets, sent %s in %d packets", humanBytes(p.BytesIn), p.PacketsIn, humanBytes(p.BytesOut), p.PacketsOut)},
		[]string{"last packet", c.lastPacket(p.Counters)},
		[]string{"drops", strconv.FormatUint(p.Drops, 10)},
	)
	if p.RTTMicros > 0 {
		rows = append(rows, []string{"rtt", (time.Duration(p.RTTMicros) * time.Microsecond).String() + " (key exchange path)"})
	}
	tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	for _, r := range rows {
		fmt.Fprintf(tw, "%s:\t%s\n", r[0], r[1])
	}
	return tw.Flush()
}

// events prints the event stream, one line per event: a JSON object with
// --json, else the time, the kind and the fields that are set.
func (c *cli) events(cmd *cobra.Command, _ []string) error {
	enc := json.NewEncoder(c.out)
	err := c.client().Events(cmd.Context(), func(e localapi.Event) error {
		if c.json {
			return enc.Encode(e)
		}
		f := []string{e.Time.UTC().Format(time.RFC3339), e.Kind.String()}
		add := func(k, v string) {
			if v != "" {
				f = append(f, k+"="+v)
			}
		}
		add("peer", e.Peer)
		add("assoc", e.Assoc)
		if e.Generation != 0 {
			add("gen", strconv.FormatUint(uint64(e.Generation), 10))
		}
		if e.RxSPI != 0 || e.TxSPI != 0 {
			add("rx", spi(e.RxSPI))
			add("tx", spi(e.TxSPI))
		}
		add("backend", e.Backend)
		if e.Device != 0 {
			add("device", strconv.FormatUint(uint64(e.Device), 10))
		}
		add("peer_boot_id", e.PeerBootID)
		if e.Reason != "" {
			add("reason", strconv.Quote(e.Reason))
		}
		if e.Detail != "" {
			f = append(f, "-- "+e.Detail)
		}
		_, err := fmt.Fprintln(c.out, strings.Join(f, " "))
		return err
	})
	if err != nil {
		return explain(err)
	}
	return nil
}

// since is how long ago t was, or "-".
func (c *cli) since(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return age(c.now(), t)
}

// ago is since with " ago".
func (c *cli) ago(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return age(c.now(), t) + " ago"
}

// lastPacket says how long ago traffic last went each way, as `wg show`
// says "latest handshake": the idle time, with which direction is silent.
func (c *cli) lastPacket(n localapi.Counters) string {
	if n.LastIn.IsZero() && n.LastOut.IsZero() {
		return "-"
	}
	return "received " + c.ago(n.LastIn) + ", sent " + c.ago(n.LastOut)
}

// endpoint is a peer's endpoint, with the name it was resolved from.
func endpoint(p localapi.Peer) string {
	if p.EndpointName == "" {
		return p.Endpoint
	}
	return p.EndpointName + " (" + p.Endpoint + ")"
}

// at is a time and how long ago it was, or "-".
func (c *cli) at(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return fmt.Sprintf("%s (%s ago)", t.UTC().Format(time.RFC3339), age(c.now(), t))
}

func (c *cli) assocList(cmd *cobra.Command, _ []string) error {
	as, err := c.client().Assocs(cmd.Context())
	if err != nil {
		return explain(err)
	}
	if c.json {
		return c.emitJSON(as)
	}
	sort.Slice(as, func(i, j int) bool { return as[i].ID < as[j].ID })
	var rows [][]string
	for _, a := range as {
		next, expiry := "-", "-"
		if !a.NextRekey.IsZero() {
			next = "in " + age(a.NextRekey, c.now())
		}
		if !a.HardExpiry.IsZero() {
			expiry = "in " + age(a.HardExpiry, c.now())
		}
		rows = append(rows, []string{a.ID, a.Peer, a.Backend, a.Suite, spi(a.RxSPI), spi(a.TxSPI),
			strconv.FormatUint(uint64(a.Generation), 10), age(c.now(), a.Created), next, expiry,
			traffic(a.BytesIn, a.PacketsIn), traffic(a.BytesOut, a.PacketsOut), strconv.FormatUint(a.Drops, 10)})
	}
	return c.table("ID\tPEER\tBACKEND\tSUITE\tRX SPI\tTX SPI\tGEN\tAGE\tNEXT REKEY\tHARD EXPIRY\tIN\tOUT\tDROPS", rows)
}

func (c *cli) assocRotate(cmd *cobra.Command, req localapi.RotateRequest) error {
	rs, err := c.client().Rotate(cmd.Context(), req)
	if err != nil {
		return explain(err)
	}
	if c.json {
		return c.emitJSON(rs)
	}
	var rows [][]string
	var failed int
	for _, r := range rs {
		res := "ok"
		if r.Error != "" {
			res, failed = r.Error, failed+1
		}
		rows = append(rows, []string{r.ID, r.Peer, spi(r.OldRxSPI) + " -> " + spi(r.RxSPI), spi(r.OldTxSPI) + " -> " + spi(r.TxSPI),
			strconv.FormatUint(uint64(r.Generation), 10), res})
	}
	if err := c.table("ID\tPEER\tRX SPI\tTX SPI\tGEN\tRESULT", rows); err != nil {
		return err
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d rotations failed; the old associations stay in use", failed, len(rs))
	}
	if len(rs) == 0 {
		return errors.New("no association matched")
	}
	return nil
}

func (c *cli) ping(cmd *cobra.Command, peer string, req localapi.PingRequest) error {
	r, err := c.client().Ping(cmd.Context(), peer, req)
	if err != nil {
		return explain(err)
	}
	if c.json {
		if err := c.emitJSON(r); err != nil {
			return err
		}
	} else {
		fmt.Fprintf(c.out, "PING %s at %s through %s (%s)\n", r.Peer, r.To, r.Assoc, r.Backend)
	}
	var rtts []time.Duration
	for _, rp := range r.Replies {
		if rp.Error != "" {
			if !c.json {
				fmt.Fprintf(c.out, "seq=%d %s\n", rp.Seq, rp.Error)
			}
			continue
		}
		d := time.Duration(rp.RTTMicros) * time.Microsecond
		rtts = append(rtts, d)
		if !c.json {
			fmt.Fprintf(c.out, "seq=%d rtt=%s\n", rp.Seq, d)
		}
	}
	if !c.json {
		fmt.Fprintf(c.out, "%d sent, %d received", len(r.Replies), len(rtts))
		if len(rtts) > 0 {
			var sum time.Duration
			for _, d := range rtts {
				sum += d
			}
			fmt.Fprintf(c.out, "; rtt min/avg/max %s/%s/%s", slices.Min(rtts), (sum / time.Duration(len(rtts))).Round(time.Microsecond), slices.Max(rtts))
		}
		fmt.Fprintf(c.out, "\nthe association carried %d packets out and %d in meanwhile\n", r.AssocPacketsOut, r.AssocPacketsIn)
	}
	switch {
	case len(rtts) == 0:
		return fmt.Errorf("no reply from %s: check that it answers ICMP echo and that the peer routes it (pspctl peer show %s)", r.To, r.Peer)
	case r.AssocPacketsOut < uint64(len(r.Replies)) || r.AssocPacketsIn < uint64(len(rtts)):
		return fmt.Errorf("the replies came, but the association carried fewer packets than the round trips: they did not all go through it")
	}
	return nil
}

func (c *cli) devList(cmd *cobra.Command, _ []string) error {
	ds, err := c.client().Devices(cmd.Context())
	if err != nil {
		return explain(err)
	}
	if c.json {
		return c.emitJSON(ds)
	}
	if len(ds) == 0 {
		_, err := fmt.Fprintln(c.out, "no PSP devices in pspd's network namespace (a NIC driver with PSP, or netdevsim, provides them)")
		return err
	}
	var rows [][]string
	for _, d := range ds {
		last := "-"
		if !d.LastRotation.IsZero() {
			last = age(c.now(), d.LastRotation) + " ago"
		}
		iface := d.Ifname
		if d.ByAssociation {
			iface = "(by association)"
		}
		rows = append(rows, []string{strconv.FormatUint(uint64(d.ID), 10), dash(iface), strings.Join(d.Capable, ","),
			dash(strings.Join(d.Enabled, ",")), strconv.FormatUint(d.Rotations, 10), last, dash(assocList(d.Assoc))})
	}
	return c.table("ID\tIFACE\tCAPABLE\tENABLED\tROTATIONS\tLAST ROTATION\tASSOCIATED", rows)
}

// assocList shows a device's associations: IFNAME@NETNS where pspd made
// them, IFNAME for a netdev of pspd's namespace, else what the kernel
// says.
func assocList(as []localapi.AssocDev) string {
	var parts []string
	for _, a := range as {
		switch {
		case a.NetNS != "":
			parts = append(parts, a.Ifname+"@"+a.NetNS)
		case a.Ifname != "":
			parts = append(parts, a.Ifname)
		case a.NSID < 0:
			parts = append(parts, fmt.Sprintf("ifindex %d", a.Ifindex))
		default:
			parts = append(parts, fmt.Sprintf("ifindex %d@nsid %d", a.Ifindex, a.NSID))
		}
	}
	return strings.Join(parts, ",")
}

func (c *cli) devAssoc(cmd *cobra.Command, verb, arg string, req localapi.AssocRequest) error {
	id, err := strconv.ParseUint(arg, 10, 32)
	if err != nil || id == 0 {
		return fmt.Errorf("dev %s: %q is not a device id (see pspctl dev list)", verb, arg)
	}
	if err := req.Validate(); err != nil {
		return fmt.Errorf("dev %s: give the namespace as --netns PATH or --pid PID, and the netdev in it as --dev IFNAME or --ifindex N (one of each)", verb)
	}
	do := c.client().AssocDevice
	if verb == "disassoc" {
		do = c.client().DisassocDevice
	}
	d, err := do(cmd.Context(), uint32(id), req)
	if err != nil {
		return explain(err)
	}
	if c.json {
		return c.emitJSON(d)
	}
	what := req.Ifname
	if what == "" {
		what = fmt.Sprintf("ifindex %d", req.Ifindex)
	}
	if verb == "assoc" {
		fmt.Fprintf(c.out, "%s in %s may use PSP device %d (%s)\n", what, req.Path(), d.ID, d.Ifname)
	} else {
		fmt.Fprintf(c.out, "%s in %s no longer uses PSP device %d (%s)\n", what, req.Path(), d.ID, d.Ifname)
	}
	fmt.Fprintf(c.out, "device %d is associated with: %s\n", d.ID, dash(assocList(d.Assoc)))
	return nil
}

func (c *cli) devRotate(cmd *cobra.Command, args []string) error {
	id, err := strconv.ParseUint(args[0], 10, 32)
	if err != nil || id == 0 {
		return fmt.Errorf("dev rotate: %q is not a device id (see pspctl dev list)", args[0])
	}
	d, err := c.client().RotateDevice(cmd.Context(), uint32(id))
	if err != nil {
		return explain(err)
	}
	if c.json {
		return c.emitJSON(d)
	}
	fmt.Fprintf(c.out, "device %d (%s) rotated; %d rotations so far\n", d.ID, d.Ifname, d.Rotations)
	return nil
}

func spi(v uint32) string { return fmt.Sprintf("%#08x", v) }

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// age formats the time from t to now the way `wg show` does, coarsely.
func age(now, t time.Time) string {
	d := now.Sub(t).Round(time.Second)
	if d < 0 {
		d = 0
	}
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm%02ds", int(d.Minutes()), int(d.Seconds())%60)
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh%02dm", int(d.Hours()), int(d.Minutes())%60)
	}
	return fmt.Sprintf("%dd", int(d.Hours()/24))
}

func traffic(bytes, packets uint64) string {
	return humanBytes(bytes) + "/" + strconv.FormatUint(packets, 10) + "p"
}

func humanBytes(b uint64) string {
	const unit = 1024
	if b < unit {
		return fmt.Sprintf("%dB", b)
	}
	div, exp := uint64(unit), 0
	for n := b / unit; n >= unit; n /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f%ciB", float64(b)/float64(div), "KMGTPE"[exp])
}
