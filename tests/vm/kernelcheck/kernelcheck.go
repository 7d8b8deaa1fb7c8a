// Package kernelcheck holds the test VM's self-test: tests that pass only in a kernel that has
// every feature pspd's in-kernel tests rely on (the psp genl family, netdevsim with ESP
// offload, ESP with rfc4106(gcm(aes)), AF_XDP, TUN) and the mounts /init promises. The
// harness runs it on every boot, so a kernel.config change that loses a feature fails here
// with the feature's name instead of somewhere deep in another package's tests.
//
// Outside the VM (PSPD_IN_VM unset) every test skips.
package kernelcheck
