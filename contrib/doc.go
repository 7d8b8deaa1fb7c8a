// Package contrib holds what operators install beside pspd: the systemd
// unit, the example configuration, Prometheus alert rules and a Grafana
// dashboard. It has no code; its tests check that those files parse and
// query only metrics pspd exports.
package contrib
